"""Multinomial logit (MNL) choice model: Plackett-Luce over top-k lists (paper section 3.1).

``mnl_topk_nll`` is the specification: the plain PyTorch reference that the Triton
kernel (``rcpo_losses.kernels.mnl``) is tested against, and the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _api, _backend
from .ranks import UNRANKED
from .reduction import reduce_rows


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
    r = _api.clean_rewards(rewards, ranks)
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


def _rows(rewards: Tensor, ranks: Tensor, backend: str) -> Tensor:
    if _backend.use_choice_kernel(backend, rewards):
        from .choice_ops import mnl_topk_rows

        return mnl_topk_rows(rewards, ranks)
    return mnl_topk_nll(rewards, ranks)


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
    r, ranks = _api.checked_rewards(rewards, ranks, reduction, validate)
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
    r, ranks = _api.rewards_from_logps(policy_logps, ref_logps, ranks, beta, reduction, validate)
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
    ranks = _api.discrete_ranks(ranks, validate)
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
    r, ranks = _api.pairwise_rewards(
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
    r, ranks = _api.checked_rewards(rewards, ranks, "none", validate)
    return -mnl_topk_nll(r, ranks)
