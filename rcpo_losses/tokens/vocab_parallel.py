"""Per-token log-probs and entropies when the vocabulary is split across ranks (tensor-parallel LM heads).

Each rank of ``process_group`` holds a contiguous slice of the vocabulary, in rank order: the
logits ``[N, V_r]``, or the LM head's weight ``[V_r, H]`` (Megatron's vocabulary-parallel
head). The one-pass statistics of a slice are ``(lse_r, H_r)`` and, on the rank that holds
the target, ``z_t``. They combine exactly, by the algebra of the online softmax update:

    M = max_r lse_r,   a_r = exp(lse_r - M),   S = sum_r a_r
    lse = M + log S,   H = log S + sum_r a_r (H_r - (lse_r - M)) / S,   log p_t = z_t - lse

(``q_r = a_r / S`` is the probability mass of slice ``r``; ``H = sum_r q_r H_r - sum_r q_r log q_r``.)
A slice whose logits of a row are all ``-inf`` (a masked part of the vocabulary) has no mass:
``a_r = 0``, whatever its (undefined) ``lse_r`` and ``H_r``. Each rank computes its slice's
statistics with its own negative placeholder :data:`LOCAL_IGNORE` for ignored rows, so any
``ignore_index`` (0 included) means the same as in the unsharded call.
So the forward needs one all-reduce (max) of an ``[N]`` vector and one (sum) of a ``[3, N]``
stack, plus a ``[P]`` one for the slices' offsets; no ``[N, V]`` gather. The outputs are the
same on every rank; the backward assumes that every rank back-propagates the same loss
(Megatron's convention) and needs no communication for the logits or the weight slice: each
rank's slice gradient comes from its own ``(lse_r, H_r, z_t)`` gradients through the local
one-pass backward. The replicated hidden states of the fused path get the sum of the ranks'
partial gradients (one all-reduce of ``[N, H]``, as the input of a column-parallel linear does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..checks import check_target_ids


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: identity (every rank holds the same loss)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Forward: identity (a replicated input). Backward: all-reduce (sum) of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_ranks(x: Tensor, group) -> Tensor:
    """``x`` unchanged; in the backward, its gradient summed over the ranks of ``group``."""
    return _CopyToRanks.apply(x, group)


# The ignore_index of each rank's slice statistics: negative, so that no local id (0 included) is taken for it.
LOCAL_IGNORE = -1


def vocab_offset(local_size: int, group, device: torch.device, rows: int) -> tuple[int, int]:
    """``(offset, total)``: where this rank's vocabulary slice starts, and the full vocabulary size.

    The same all-reduce carries each rank's number of token ``rows``: if they differ, every rank
    raises ``ValueError`` (a collective on mismatched shapes would abort the process or hang).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(2, world, dtype=torch.int64, device=device)
    sizes[0, rank] = local_size
    sizes[1, rank] = rows
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    counts = sizes[1].tolist()
    if len(set(counts)) > 1:
        raise ValueError(
            f"targets: the ranks of process_group hold {counts} rows (rank {rank}: {rows}); every rank must pass "
            "the same targets, and its vocabulary slice of the same tokens"
        )
    return int(sizes[0, :rank].sum()), int(sizes[0].sum())


def local_targets(
    targets: Tensor, offset: int, size: int, ignore_index: int, dead: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(local ids, owned)``: targets in this rank's slice, shifted to it; other valid rows get id 0
    (their statistics are still needed; only the target logit is masked out). Ignored rows, and the
    ``dead`` rows whose slice is all ``-inf``, get :data:`LOCAL_IGNORE` (no statistics, no gradient)."""
    valid = targets != ignore_index
    owned = valid & (targets >= offset) & (targets < offset + size)
    local = torch.where(owned, targets - offset, 0)
    skip = ~valid if dead is None else ~valid | dead
    return torch.where(skip, LOCAL_IGNORE, local), owned


def combine(
    logp_r: Tensor, ent_r: Tensor, lse_r: Tensor, owned: Tensor, valid: Tensor, group, dead: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Global ``(logp, entropy)`` ``[N]`` from each rank's slice statistics (see the module docstring).

    ``logp_r = z_t - lse_r`` where this rank ``owned`` the target; ``valid``: the target is not ignored;
    ``dead``: this rank's slice of the row is all ``-inf`` (no mass; a target there has log-prob ``-inf``).
    """
    zero = torch.zeros((), dtype=lse_r.dtype, device=lse_r.device)
    live = valid if dead is None else valid & ~dead
    lse_r = torch.where(live, lse_r, zero)  # ignored rows, masked slices: any lse (NaN included) -> 0
    ent_r = torch.where(live, ent_r, zero)
    m = torch.where(live, lse_r.detach(), -torch.inf)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)  # a shift: lse does not depend on it
    m = torch.where(m > -torch.inf, m, zero)  # rows without a live slice (ignored ones)
    d = lse_r - m
    a = torch.where(live, torch.exp(d), zero)
    z_t = torch.where(owned, logp_r + lse_r, zero)
    if dead is not None:
        z_t = torch.where(owned & dead, -torch.inf, z_t)
    s, w, z_t = _SumOverRanks.apply(torch.stack([a, a * (ent_r - d), z_t]), group)
    log_s = torch.log(s)
    logp = torch.where(valid, z_t - (m + log_s), zero)
    ent = torch.where(valid, log_s + w / s, zero)
    return logp, ent


def full_vocab_stats(
    slice_stats: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]],
    targets: Tensor,
    size: int,
    ignore_index: int,
    validate: bool,
    dead: Tensor,
    group,
) -> tuple[Tensor, Tensor]:
    """Global ``(logp, entropy)`` ``[N]`` of ``[N]`` global ``targets``, from this rank's slice of ``size`` ids.

    ``slice_stats(local_targets, LOCAL_IGNORE)`` gives the slice's ``(logp_r, entropy_r, lse_r)``;
    ``dead``: the rows whose slice is all ``-inf``. With ``validate``, the targets are checked
    against the full vocabulary.
    """
    offset, total = vocab_offset(size, group, targets.device, targets.shape[0])
    check_target_ids(targets, total, ignore_index, validate)
    local, owned = local_targets(targets, offset, size, ignore_index, dead)
    return combine(*slice_stats(local, LOCAL_IGNORE), owned, targets != ignore_index, group, dead)
