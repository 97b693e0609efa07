"""Mallows-RMJ choice model: rank-based, robust to ordinal noise (paper section 3.2, app. C-D).

Every Mallows-RMJ objective is a weighted sum over comparisons of each non-top response
with its predecessor in the top-k list:

* ranked ``y_{i+1}`` against ``y_i``, weight ``n - i`` (``i = 1..k-1``);
* each unranked ``u`` against the last pick ``y_k``, weight 1.

That structure, and the smoothed distance that the Triton kernel ``rcpo_losses.kernels.mallows``
fuses, are in its PyTorch twin :mod:`rcpo_losses.reference.mallows` (``comparisons``,
``mallows_rmj_topk_sum``, re-exported here). This module holds the public losses (checks,
rewards, the dispersion weight, the reduction) and the exact likelihood of eq. 11, which reads
the same comparisons through a step function. The per-row loss is computed by the op
:func:`rcpo_losses.ops.choice.mallows_rmj_topk_rows_any`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, inputs
from .ops.choice import mallows_rmj_topk_rows_any
from .ranks import assortment_size
from .reduction import reduce_rows
from .reference.mallows import Comparisons, comparisons, mallows_rmj_topk_sum

__all__ = [
    "Comparisons",
    "comparisons",
    "log_q_factorial_ratio",
    "mallows_rmj_discrete",
    "mallows_rmj_log_likelihood",
    "mallows_rmj_pairwise",
    "mallows_rmj_topk",
    "mallows_rmj_topk_from_rewards",
    "mallows_rmj_topk_sum",
]


def _weight(neg_log_phi: float | Tensor, like: Tensor) -> Tensor:
    # dtype at construction: a Python float must not round through fp32 on its way to fp64
    return torch.as_tensor(neg_log_phi, dtype=like.dtype, device=like.device).expand(like.shape[0])


def _rows(rewards: Tensor, ranks: Tensor, neg_log_phi: float | Tensor, backend: str) -> Tensor:
    return mallows_rmj_topk_rows_any(rewards, ranks, _weight(neg_log_phi, rewards), backend)


def mallows_rmj_topk_from_rewards(
    rewards: Tensor,
    ranks: Tensor,
    *,
    neg_log_phi: float | Tensor = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Mallows-RMJ top-k loss of arbitrary rewards: the choice-model layer of
    :func:`mallows_rmj_topk`.

    .. math::
        \mathcal{L} = -\log\phi \Big[\sum_{i=1}^{k-1} (n - i)\, \sigma(r_{y_{i+1}} - r_{y_i})
        + \sum_{j \in U} \sigma(r_j - r_{y_k})\Big]  \quad\text{(Theorem 4, app. D)}

    Shape:
        - rewards, ranks: ``(B, S)``; neg_log_phi: float or ``(B,)``.
        - output: scalar, or ``(B,)`` for ``reduction="none"``.
    """
    r, ranks = inputs.checked_rewards(rewards, ranks, reduction, validate)
    checks.check_neg_log_phi(neg_log_phi, ranks, validate, r.dtype)
    return reduce_rows(_rows(r, ranks, neg_log_phi, backend), ranks, reduction)


def mallows_rmj_topk(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    ranks: Tensor,
    *,
    beta: float = 0.1,
    neg_log_phi: float | Tensor = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Mallows-RMJ-PO-Top-k (Theorem 4, sigmoid-smoothed as in appendix D).

    .. math::
        \mathcal{L} = -\log\phi(x) \Big[\sum_{i=1}^{k-1} (|S| - i)\,
        \sigma\big(r_{y_{i+1}} - r_{y_i}\big) + \sum_{y_j \in S \setminus \{y_1..y_k\}}
        \sigma\big(r_{y_j} - r_{y_k}\big)\Big]

    with ``r = beta * (policy_logps - ref_logps)`` (eq. 2). Replacing ``sigma`` by the
    step ``1{z > 0}`` gives eq. 12, the exact negative log-likelihood of eq. 11 up to a
    constant. ``k = 1`` is Mallows-RMJ-PO-Discrete (eq. 10), ``|S| = 2`` the pairwise
    objective (eq. 14).

    Args:
        neg_log_phi: the dispersion weight ``-log phi(x) >= 0``, a float or a ``[B]``
            tensor (see :func:`entropy_dispersion`). A weight, not a parameter: it gets a
            gradient only if it requires one.
        Others as in :func:`mnl_topk`.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; neg_log_phi: float or ``(B,)``.
        - output: scalar in fp32 (fp64 for fp64 inputs), or ``(B,)`` for ``"none"``.
    """
    r, ranks = inputs.rewards_from_logps(policy_logps, ref_logps, ranks, beta, reduction, validate)
    checks.check_neg_log_phi(neg_log_phi, ranks, validate, r.dtype)
    return reduce_rows(_rows(r, ranks, neg_log_phi, backend), ranks, reduction)


def mallows_rmj_discrete(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    ranks: Tensor,
    *,
    beta: float = 0.1,
    neg_log_phi: float | Tensor = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Mallows-RMJ-PO-Discrete: the best response out of an assortment (Theorem 3, eq. 10).

    .. math:: \mathcal{L} = -\log\phi(x) \sum_{y_i \in S \setminus \{y_w\}} \sigma(r_{y_i} - r_{y_w})

    :func:`mallows_rmj_topk` restricted to ``k = 1`` (checked when ``validate``).

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar or ``(B,)``.
    """
    ranks = inputs.discrete_ranks(ranks, validate)
    return mallows_rmj_topk(
        policy_logps,
        ref_logps,
        ranks,
        beta=beta,
        neg_log_phi=neg_log_phi,
        reduction=reduction,
        backend=backend,
        validate=validate,
    )


def mallows_rmj_pairwise(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    neg_log_phi: float | Tensor = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""Mallows-RMJ-PO-Pairwise on chosen/rejected pairs (Theorem 5, eq. 14, smoothed).

    .. math:: \mathcal{L} = -\log\phi(x)\, \sigma(r_l - r_w)

    Shape:
        - each log-prob input: ``(B,)``; output: scalar, or ``(B,)`` for ``"none"``.
    """
    r, ranks = inputs.pairwise_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, reduction, validate
    )
    checks.check_neg_log_phi(neg_log_phi, ranks, validate, r.dtype)
    return reduce_rows(_rows(r, ranks, neg_log_phi, backend), None, reduction)  # pairs: every row valid


def log_q_factorial_ratio(n: Tensor, m: Tensor, neg_log_phi: Tensor, size: int) -> Tensor:
    r"""``log psi(n, phi) - log psi(m, phi) = sum_{i=m+1..n} log [i]_phi`` for ``m <= n``.

    ``[i]_phi = 1 + phi + ... + phi^(i-1) = (1 - phi^i) / (1 - phi)`` (eq. 11), written with
    ``expm1`` so that it stays accurate as ``phi -> 1``, where ``[i]_phi -> i``.

    Shape:
        - n, m: ``(B,)`` int, at most ``size``; neg_log_phi: ``(B,)`` float; output ``(B,)``.
    """
    i = torch.arange(1, size + 1, device=n.device, dtype=neg_log_phi.dtype)
    w = neg_log_phi[:, None]
    q_int = torch.expm1(-i * w) / torch.expm1(-w).where(w > 0, 1.0)
    log_q = torch.where(w > 0, torch.log(q_int.where(w > 0, 1.0)), torch.log(i))
    take = (i > m[:, None]) & (i <= n[:, None])
    return torch.where(take, log_q, 0.0).sum(-1)


def mallows_rmj_log_likelihood(
    rewards: Tensor, ranks: Tensor, neg_log_phi: float | Tensor, *, validate: bool = True
) -> Tensor:
    r"""Exact log-probability of each row's top-k list under Mallows-RMJ (eq. 11).

    .. math::
        \log P(\mu^k \mid S) = \log\frac{\psi(n-k, \phi)}{\psi(n, \phi)} + d(\mu^k, S)\log\phi,
        \quad \psi(n, \phi) = \prod_{i=1}^{n} (1 + \phi + \dots + \phi^{i-1})

    The central ranking ``mu_0`` orders responses by reward, highest first; equal
    rewards are ordered by slot index, so that ``mu_0`` is a strict ranking and the
    probabilities of all top-k lists of a row sum to 1.

    Shape:
        - rewards, ranks: ``(B, S)``; neg_log_phi: float or ``(B,)``.
        - output: ``(B,)`` fp32 (fp64 for fp64 rewards).
    """
    r, ranks = inputs.checked_rewards(rewards, ranks, "none", validate)
    checks.check_neg_log_phi(neg_log_phi, ranks, validate, r.dtype)
    r = inputs.clean_rewards(r, ranks)
    w = _weight(neg_log_phi, r)
    c = comparisons(r, ranks)
    slot = torch.arange(r.shape[-1], device=r.device)
    above = (r > c.r_pred) | ((r == c.r_pred) & (slot < c.pred_slot))  # mu_0 puts j above its predecessor
    d = (c.weight * above).sum(-1)
    n = assortment_size(ranks)
    k = (ranks >= 0).sum(-1)
    return -log_q_factorial_ratio(n, n - k, w, r.shape[-1]) - w * d
