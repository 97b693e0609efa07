"""Multinomial logit (MNL) choice model: Plackett-Luce over top-k lists (paper section 3.1).

The public losses: checks, eq. 2 rewards and the reduction around the per-row NLL, which the
op :func:`rcpo_losses.ops.choice.mnl_topk_rows_any` computes with the Triton kernel
``rcpo_losses.kernels.mnl`` or its PyTorch twin :func:`rcpo_losses.reference.mnl.mnl_topk_nll`
(the specification, re-exported here as ``rcpo_losses.mnl.mnl_topk_nll``).
"""

from __future__ import annotations

from torch import Tensor

from . import inputs
from .ops.choice import mnl_topk_rows_any
from .reduction import reduce_rows
from .reference.mnl import mnl_topk_nll

__all__ = [
    "mnl_discrete",
    "mnl_log_likelihood",
    "mnl_pairwise",
    "mnl_topk",
    "mnl_topk_from_rewards",
    "mnl_topk_nll",
]


def _rows(rewards: Tensor, ranks: Tensor, backend: str) -> Tensor:
    return mnl_topk_rows_any(rewards, ranks, backend)


def mnl_topk_from_rewards(
    rewards: Tensor, ranks: Tensor, *, reduction: str = "mean", backend: str = "auto", validate: bool = True
) -> Tensor:
    r"""MNL top-k loss of arbitrary rewards: the choice-model layer of :func:`mnl_topk`.

    .. math:: \mathcal{L} = \sum_{i=1}^{k} \Big[\log \sum_{j \in R_i} e^{r_j} - r_{y_i}\Big]
        \quad\text{(Theorem 2, eq. 8)}

    Use it for reward variants (SimPO, R-DPO: see :func:`implicit_rewards`).

    Shape:
        - rewards: ``(B, S)``; ranks: ``(B, S)`` int.
        - output: scalar, or ``(B,)`` for ``reduction="none"``.
    """
    r, ranks = inputs.checked_rewards(rewards, ranks, reduction, validate)
    return reduce_rows(_rows(r, ranks, backend), ranks, reduction)


def mnl_topk(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    ranks: Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""MNL-PO-Top-k: maximum likelihood of top-k lists under Plackett-Luce (Theorem 2).

    .. math::
        \mathcal{L} = -\sum_{i=1}^{k} \log \sigma\Big(-\log \sum_{y_j \in S \setminus
        \{y_1..y_i\}} \exp\big(r_{y_j} - r_{y_i}\big)\Big)
        = \sum_{i=1}^{k} \Big[\log \sum_{j \in R_i} e^{r_j} - r_{y_i}\Big]

    with ``r = beta * (policy_logps - ref_logps)`` (eq. 2) and ``R_i = {y_i..y_k} ∪ U``.
    ``k = 1`` is MNL-PO-Discrete (eq. 7); ``|S| = 2, k = 1`` is DPO (eq. 3).

    Args:
        policy_logps: summed log-probs of each response under the policy.
        ref_logps: the same under the reference model; ``None`` for reference-free.
        ranks: rank tensor (``0..k-1`` picks, ``UNRANKED``, ``IGNORE``).
        beta: KL strength of eq. 2, > 0.
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"``.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        validate: check values (one device sync); off, and always under torch.compile,
            only shapes and dtypes are checked.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``.
        - output: scalar in fp32 (fp64 for fp64 inputs), or ``(B,)`` for ``"none"``.
    """
    r, ranks = inputs.rewards_from_logps(policy_logps, ref_logps, ranks, beta, reduction, validate)
    return reduce_rows(_rows(r, ranks, backend), ranks, reduction)


def mnl_discrete(
    policy_logps: Tensor,
    ref_logps: Tensor | None,
    ranks: Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""MNL-PO-Discrete: the best response out of an assortment (Theorem 1, eq. 7).

    .. math::
        \mathcal{L} = -\log \sigma\Big(-\log \sum_{y_i \in S \setminus \{y_w\}}
        \exp(r_{y_i} - r_{y_w})\Big) = \log \sum_{j \in S} e^{r_j} - r_{y_w}

    :func:`mnl_topk` restricted to ``k = 1`` (checked when ``validate``); arguments as there.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar or ``(B,)``.
    """
    ranks = inputs.discrete_ranks(ranks, validate)
    return mnl_topk(policy_logps, ref_logps, ranks, beta=beta, reduction=reduction, backend=backend, validate=validate)


def mnl_pairwise(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    r"""DPO: MNL (Bradley-Terry) on chosen/rejected pairs (eq. 3).

    .. math:: \mathcal{L} = -\log \sigma(r_w - r_l)

    Takes ``[B]`` tensors in DPO's order (policy chosen, policy rejected, reference
    chosen, reference rejected); the reference pair may be omitted (reference-free).

    Shape:
        - each input: ``(B,)``; output: scalar, or ``(B,)`` for ``"none"``.
    """
    r, ranks = inputs.pairwise_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, reduction, validate
    )
    return reduce_rows(_rows(r, ranks, backend), None, reduction)  # pairs: every row valid


def mnl_log_likelihood(rewards: Tensor, ranks: Tensor, *, validate: bool = True) -> Tensor:
    r"""Exact log-probability of each row's top-k list under MNL (eq. 8).

    .. math::
        \log P(\mu^k \mid S) = \sum_{i=1}^k \Big[r_{y_i} - \log\Big(\sum_{j=i}^k e^{r_{y_j}}
        + \sum_{y_h \in U} e^{r_{y_h}}\Big)\Big]

    For evaluation: ``exp`` of it sums to 1 over all top-k lists of a row.

    Shape:
        - rewards, ranks: ``(B, S)``; output: ``(B,)`` fp32 (fp64 for fp64 rewards).
    """
    r, ranks = inputs.checked_rewards(rewards, ranks, "none", validate)
    return -mnl_topk_nll(r, ranks)
