"""PyTorch twin of the Triton kernel ``rcpo_losses.kernels.mnl``: the MNL (Plackett-Luce) top-k NLL.

:func:`mnl_topk_nll` is the specification that the kernel is tested against, the CPU path
of :func:`rcpo_losses.mnl_topk` and the other MNL losses, and the double backward of the
kernel's custom op (:mod:`rcpo_losses.ops.choice`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import clean_rewards
from ..ranks import UNRANKED


def mnl_topk_nll(rewards: Tensor, ranks: Tensor) -> Tensor:
    r"""Per-row negative log-likelihood of top-k lists under MNL (reference implementation).

    .. math::
        \ell_b = \sum_{i=1}^{k} \Big[\log \sum_{j \in R_i} e^{r_j} - r_{y_i}\Big],
        \qquad R_i = \{y_i, \dots, y_k\} \cup U

    which is eq. 8 (Theorem 2; Theorem 1 for ``k = 1``). ``R_i`` are the responses not
    yet picked at stage ``i``: the masked reverse logsumexp of Plackett-Luce. A stage
    whose ``R_i`` is ``{y_i}`` alone adds exactly 0, so ``k = n`` and ``k = n - 1`` agree.
    Each stage is computed shifted by its pick, ``log(1 + sum_{j in R_i, j != y_i}
    exp(r_j - r_{y_i}))``, so that it keeps its relative accuracy when it is tiny.

    Shape:
        - rewards: ``(B, S)`` float; padding slots may hold anything.
        - ranks: ``(B, S)`` int.
        - output: ``(B,)`` in fp32 (fp64 for fp64 rewards).
    """
    r = clean_rewards(rewards, ranks)
    S = r.shape[-1]
    k = (ranks >= 0).sum(-1, keepdim=True)
    # On the CPU the sync is free: only the stages some row has (k = 2 of S = 5: 2 of 5) are
    # formed, which is 2-3x faster and exactly the same (the others would each add 0).
    on_cpu = r.device.type == "cpu" and not torch.compiler.is_compiling()
    stages = max(int(k.max()), 1) if on_cpu and k.numel() else S
    stage = torch.arange(stages, device=r.device)
    active = stage < k  # [B, stages]: stage i exists in row b
    # picked[b, i] = r_{y_{i+1}}, at the slot ranked i (a compare and argmax: several times faster than a sort
    # on the CPU; a stage that does not exist picks slot 0 and is masked out below)
    pick = (ranks[:, None, :] == stage[:, None]).to(torch.uint8).argmax(-1)
    picked = r.gather(-1, pick)
    # others[b, i, j]: response j is in R_i and is not the pick of stage i
    rank = ranks[:, None, :]
    others = ((rank > stage[:, None]) | (rank == UNRANKED)) & active[:, :, None]
    return torch.where(active, _log1p_sum_exp(r[:, None, :] - picked[:, :, None], others), 0.0).sum(-1)


def _log1p_sum_exp(d: Tensor, mask: Tensor) -> Tensor:
    r"""``log(1 + sum_{mask} exp(d))`` over the last dim, to relative accuracy.

    The MNL stage ``logsumexp_{R_i} r - r_{y_i}`` shifted by the pick: with
    ``c = max(0, max d)``, it is ``c + log(exp(-c) + sum exp(d - c))``, and ``log1p`` of the
    sum when ``c = 0``. So a well-separated pair keeps the relative accuracy of
    ``-logsigmoid`` (``9.4e-14`` at a margin of 30, not 0). No member: 0.
    """
    c = torch.where(mask, d, -torch.inf).amax(-1).clamp(min=0.0).detach()
    s = torch.where(mask, d - c[..., None], -torch.inf).exp().sum(-1)
    return torch.where(c > 0, c + torch.log(torch.exp(-c) + s), torch.log1p(s))
