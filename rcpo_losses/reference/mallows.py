"""PyTorch twin of the Triton kernel ``rcpo_losses.kernels.mallows``: the smoothed Mallows-RMJ distance.

Every Mallows-RMJ objective is a weighted sum over comparisons of each non-top response
with its predecessor in the top-k list:

* ranked ``y_{i+1}`` against ``y_i``, weight ``n - i`` (``i = 1..k-1``);
* each unranked ``u`` against the last pick ``y_k``, weight 1.

:func:`comparisons` builds that structure once; the smoothed loss (sigmoid,
:func:`mallows_rmj_topk_sum`) and the exact likelihood (step function,
:func:`rcpo_losses.mallows_rmj_log_likelihood`) both read it. :func:`mallows_rmj_topk_sum` is
the specification that the kernel is tested against, the CPU path of the Mallows losses and
the double backward of the kernel's custom op (:mod:`rcpo_losses.ops.choice`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..inputs import clean_rewards
from ..ranks import UNRANKED, assortment_size, order_by_rank


class Comparisons(NamedTuple):
    r_pred: Tensor  # [B, S] reward of each slot's predecessor in the top-k list
    pred_slot: Tensor  # [B, S] slot index of that predecessor
    weight: Tensor  # [B, S] (n - i) for ranked y_{i+1}, 1 for unranked, 0 for y_1 and padding


def comparisons(r: Tensor, ranks: Tensor) -> Comparisons:
    """Predecessor and weight of every slot in the Mallows-RMJ distance ``d(mu^k, S)`` (eq. 11)."""
    S = ranks.shape[-1]
    order = order_by_rank(ranks)
    k = (ranks >= 0).sum(-1, keepdim=True)
    n = assortment_size(ranks)[:, None]
    pred_rank = torch.where(ranks >= 1, ranks - 1, k - 1).clamp(0, S - 1)
    pred_slot = order.gather(-1, pred_rank)
    r_pred = r.gather(-1, pred_slot)
    weight = torch.where(ranks >= 1, n - ranks, (ranks == UNRANKED).long())
    return Comparisons(r_pred, pred_slot, weight.to(r.dtype))


def mallows_rmj_topk_sum(rewards: Tensor, ranks: Tensor) -> Tensor:
    r"""Per-row sigmoid-smoothed Mallows-RMJ distance (reference implementation).

    .. math::
        s_b = \sum_{i=1}^{k-1} (n - i)\, \sigma(r_{y_{i+1}} - r_{y_i})
            + \sum_{j \in U} \sigma(r_j - r_{y_k})

    the bracket of Theorem 4 (eq. 12) with the indicator ``1{z > 0}`` smoothed to
    ``sigmoid(z)`` (appendix D). The loss is ``-log(phi) * s_b``.

    Shape:
        - rewards, ranks: ``(B, S)``; output: ``(B,)`` fp32 (fp64 for fp64 rewards).
    """
    r = clean_rewards(rewards, ranks)
    c = comparisons(r, ranks)
    return (c.weight * torch.sigmoid(r - c.r_pred)).sum(-1)
