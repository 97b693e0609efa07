"""The plumbing every public loss shares: checks, implicit rewards, pairwise batches."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from .ranks import UNRANKED, in_assortment
from .rewards import compute_dtype, implicit_rewards


def rewards_from_logps(
    policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor, beta: float, reduction: str, validate: bool
) -> Tensor:
    """Check a ``[B, S]`` loss call and return its eq. 2 rewards."""
    _checks.check_ranks(ranks, validate)
    _checks.check_scores("policy_logps", policy_logps, ranks, validate)
    if ref_logps is not None:
        _checks.check_scores("ref_logps", ref_logps, ranks, validate)
    _checks.check_positive("beta", beta)
    _checks.check_reduction(reduction)
    return implicit_rewards(policy_logps, ref_logps, beta=beta)


def checked_rewards(rewards: Tensor, ranks: Tensor, reduction: str, validate: bool) -> Tensor:
    """Check a ``*_from_rewards`` call and return the rewards in the compute dtype."""
    _checks.check_ranks(ranks, validate)
    _checks.check_scores("rewards", rewards, ranks, validate)
    _checks.check_reduction(reduction)
    return rewards.to(compute_dtype(rewards))


def clean_rewards(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Rewards in fp32 (fp64), with padding slots set to 0.

    ``torch.where`` rather than a product: padding may hold NaN or inf, and the gradient
    of ``where`` sends exactly zero to the slots it does not select.
    """
    r = rewards.to(compute_dtype(rewards))
    return torch.where(in_assortment(ranks), r, torch.zeros((), dtype=r.dtype, device=r.device))


def pairwise_batch(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Stack chosen/rejected ``[B]`` tensors into ``[B, 2]`` inputs with ranks ``[0, UNRANKED]``."""
    _checks.check_pair("policy_chosen_logps", policy_chosen, policy_chosen)
    _checks.check_pair("policy_rejected_logps", policy_rejected, policy_chosen)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("ref_chosen_logps, ref_rejected_logps: pass both or neither")
    policy = torch.stack([policy_chosen, policy_rejected], dim=-1)
    ref = None
    if ref_chosen is not None:
        _checks.check_pair("ref_chosen_logps", ref_chosen, policy_chosen)
        _checks.check_pair("ref_rejected_logps", ref_rejected, policy_chosen)
        ref = torch.stack([ref_chosen, ref_rejected], dim=-1)
    ranks = torch.tensor([0, UNRANKED], device=policy.device).expand(policy.shape[0], 2)
    return policy, ref, ranks


def check_discrete(ranks: Tensor, validate: bool) -> None:
    """Single-best feedback: exactly one ranked response per row."""
    if not _checks.should_sync(validate):
        return
    k = (ranks >= 0).sum(-1)
    if (k != 1).any():
        b = int((k != 1).nonzero()[0, 0])
        raise ValueError(
            f"ranks[{b}]: single-best (discrete) feedback needs k = 1, got k = {int(k[b])}; "
            "use the *_topk loss for top-k lists"
        )
