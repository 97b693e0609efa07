"""The plumbing every public loss shares: checks, implicit rewards, pairwise batches.

Each entry point returns the rewards together with the ranks in which every invalid row
is all-``IGNORE`` (``ranks.mask_invalid_rows``): with ``validate=False`` and under
``torch.compile`` such a row reaches the backends as an empty row, so that both give it
loss 0 and gradient 0, and the mean leaves it out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks
from .ranks import (
    UNRANKED,
    check_finite,
    check_rank_tensor,
    check_ranks,
    in_assortment,
    list_length,
    mask_invalid_rows,
    mask_rows,
)
from .rewards import compute_dtype, implicit_rewards


def masked_ranks(ranks: Tensor, validate: bool) -> Tensor:
    """``ranks`` after ``check_ranks``: as they are when every row was checked, else invalid rows masked."""
    return ranks if checks.should_sync(validate) else mask_invalid_rows(ranks)


def _check_rewards_finite(r: Tensor, ranks: Tensor, beta: float, inputs, where) -> None:
    """The eq. 2 rewards are finite on the assortment; if not, name the inputs at fault.

    ``inputs(b, j)`` gives ``[(name, value), ...]``, the user's own policy and reference
    arguments at slot ``j`` of row ``b``, and ``where(b, j)`` how to index them in a message.
    """
    bad = in_assortment(ranks) & ~torch.isfinite(r.detach())
    if not bad.any():  # the one sync of a valid call
        return
    b, j = (int(v) for v in bad.nonzero()[0])
    named = [(name, float(x)) for name, x in inputs(b, j) if x is not None]
    for name, v in named:
        if not math.isfinite(v):
            raise ValueError(f"{name}{where(b, j, v)}")
    diff = named[0][0] if len(named) == 1 else f"({named[0][0]} - {named[1][0]})"
    values = ", ".join(f"{name} = {v}" for name, v in named)
    raise ValueError(
        f"beta * {diff}: the reward of row {b}, slot {j} overflows {r.dtype} ({values}, beta = {beta}); "
        "log-probs and beta must keep the rewards finite"
    )


def rewards_from_logps(
    policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor, beta: float, reduction: str, validate: bool
) -> tuple[Tensor, Tensor]:
    """Check a ``[B, S]`` loss call; return its eq. 2 rewards and the ranks with invalid rows masked."""
    check_ranks(ranks, validate)
    checks.check_score_tensor("policy_logps", policy_logps, ranks)
    if ref_logps is not None:
        checks.check_score_tensor("ref_logps", ref_logps, ranks)
    checks.check_beta(beta, compute_dtype(policy_logps, ref_logps))
    checks.check_reduction(reduction)
    r = implicit_rewards(policy_logps, ref_logps, beta=beta)
    if checks.should_sync(validate):

        def inputs(b, j):
            return [("policy_logps", policy_logps[b, j]), ("ref_logps", None if ref_logps is None else ref_logps[b, j])]

        def where(b, j, v):
            rank = int(ranks[b, j])
            return f"[{b}]: slot {j} is in the assortment (rank {rank}) but holds {v}; mark padding slots IGNORE"

        _check_rewards_finite(r, ranks, beta, inputs, where)
    return r, masked_ranks(ranks, validate)


def checked_rewards(rewards: Tensor, ranks: Tensor, reduction: str, validate: bool) -> tuple[Tensor, Tensor]:
    """Check a ``*_from_rewards`` call; return the rewards in the compute dtype and the masked ranks."""
    check_ranks(ranks, validate)
    checks.check_score_tensor("rewards", rewards, ranks)
    checks.check_reduction(reduction)
    r = rewards.to(compute_dtype(rewards))
    if checks.should_sync(validate):
        check_finite("rewards", r, ranks)  # fp16/bf16 rewards are finite in fp32 too
    return r, masked_ranks(ranks, validate)


def clean_rewards(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Rewards in fp32 (fp64), with padding slots set to 0.

    ``torch.where`` rather than a product: padding may hold NaN or inf, and the gradient
    of ``where`` sends exactly zero to the slots it does not select.
    """
    r = rewards.to(compute_dtype(rewards))
    return torch.where(in_assortment(ranks), r, torch.zeros((), dtype=r.dtype, device=r.device))


def pairwise_rewards(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    beta: float,
    reduction: str,
    validate: bool,
) -> tuple[Tensor, Tensor]:
    """Check a chosen/rejected ``[B]`` call; return ``[B, 2]`` rewards and ranks ``[0, UNRANKED]``."""
    checks.check_pair("policy_chosen_logps", policy_chosen)
    checks.check_pair("policy_rejected_logps", policy_rejected, policy_chosen)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("ref_chosen_logps, ref_rejected_logps: pass both or neither")
    policy = torch.stack([policy_chosen, policy_rejected], dim=-1)
    ref = None
    if ref_chosen is not None:
        checks.check_pair("ref_chosen_logps", ref_chosen, policy_chosen)
        checks.check_pair("ref_rejected_logps", ref_rejected, policy_chosen)
        ref = torch.stack([ref_chosen, ref_rejected], dim=-1)
    checks.check_beta(beta, compute_dtype(policy, ref))
    checks.check_reduction(reduction)
    ranks = torch.tensor([0, UNRANKED], device=policy.device).expand(policy.shape[0], 2)
    r = implicit_rewards(policy, ref, beta=beta)
    if checks.should_sync(validate):

        def inputs(b, j):
            side = ("chosen", "rejected")[j]
            return [(f"policy_{side}_logps", policy[b, j]), (f"ref_{side}_logps", None if ref is None else ref[b, j])]

        def where(b, j, v):
            return f"[{b}]: must be finite, got {v}"

        _check_rewards_finite(r, ranks, beta, inputs, where)
    return r, ranks


def discrete_ranks(ranks: Tensor, validate: bool) -> Tensor:
    """Single-best feedback: exactly one ranked response per row.

    Checked when validating; otherwise a row with ``k != 1`` is masked to all-``IGNORE``
    (loss 0, left out of the mean), like any other invalid row.
    """
    check_rank_tensor(ranks)
    k = list_length(ranks)
    if checks.should_sync(validate) and (k != 1).any():
        b = int((k != 1).nonzero()[0, 0])
        raise ValueError(
            f"ranks[{b}]: single-best (discrete) feedback needs k = 1, got k = {int(k[b])}; "
            "use the *_topk loss for top-k lists"
        )
    return ranks if checks.should_sync(validate) else mask_rows(ranks, k == 1)
