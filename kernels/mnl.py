"""Fused MNL (Plackett-Luce) top-k loss: forward and backward, one launch each.

Specification: ``rcpo_losses.mnl.mnl_topk_nll``. Per row ``b`` with ``k`` picks,

    loss_b = sum_{i<k} [ logsumexp_{j in R_i} r_j - r_{y_i} ],   R_i = {j : rank_j >= i} ∪ U
    dloss_b / dr_j = sum_{i<k, j in R_i} softmax_{R_i}(r)_j - [j ranked]

The kernels never build the ``[B, S, S]`` stage-by-item mask of the reference: a loop
over the stages ``i`` (up to the largest ``k`` of the block) recomputes the membership
``j in R_i`` from the ranks held in registers, so each stage costs one masked max, one
exp, one sum and one log over the ``[ROWS, BLOCK_S]`` tile. Every stage takes its own
max, so each logsumexp is exact to rounding whatever the spread of the rewards. The
backward recomputes the stages (nothing but the inputs is saved) and turns each stage's
exponentials into softmax probabilities. No atomics: the sums run in a fixed order, and
results are bitwise reproducible.

Rewards come in fp32 or fp64 and the arithmetic runs in that dtype; ranks in any integer
dtype (read as int32). Padding (``IGNORE``) is never loaded and gets a gradient of
exactly 0. A row without a ranked response (invalid; the public losses drop it) gets
loss 0 and gradient 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .choice_common import (
    UNRANKED,
    launch_rows,
    load_row_scalars,
    load_tile,
    store_tile,
)


@triton.jit
def _stage_members(rank, i):
    """``j in R_i``: still available at stage ``i`` (ranked at or after ``i``, or unranked)."""
    return (rank >= i) | (rank == UNRANKED)


@triton.jit
def _masked_exp_sum(x, member):
    """Per row: ``m = max_{member} x``, ``e = exp(x - m)`` on members (0 elsewhere), ``s = sum e``.

    A row without members gets ``m = 0``, ``e = 0``, ``s = 0`` (no inf - inf).
    """
    m = tl.max(tl.where(member, x, float("-inf")), axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(tl.where(member, x - m[:, None], float("-inf")))
    return m, e, tl.sum(e, axis=1)


@triton.jit
def _stage_nll(x, rank, i, active):
    """``logsumexp_{R_i} r - r_{y_i}`` per row; 0 for rows whose list is shorter than ``i + 1``."""
    m, _, s = _masked_exp_sum(x, _stage_members(rank, i))
    lse = m + tl.log(tl.where(active, s, 1.0))
    picked = tl.sum(tl.where(rank == i, x, 0.0), axis=1)
    return tl.where(active, lse - picked, 0.0)


@triton.jit
def _stage_softmax(x, rank, i, active):
    """``softmax_{R_i}(r)`` over the tile; rows whose list is shorter than ``i + 1`` get 0."""
    _, e, s = _masked_exp_sum(x, _stage_members(rank, i))
    return tl.where(active[:, None], e / tl.where(active, s, 1.0)[:, None], 0.0)


@triton.jit
def mnl_topk_fwd_kernel(
    r_ptr,
    ranks_ptr,
    loss_ptr,
    B,
    S,
    stride_rb,
    stride_rs,
    stride_kb,
    stride_ks,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    rows, cols, row_ok, in_bounds, rank, valid, x = load_tile(
        r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS, BLOCK_S, CONTIG
    )
    k = tl.sum((rank >= 0).to(tl.int32), axis=1)
    loss = tl.zeros([ROWS], dtype=x.dtype)
    for i in range(0, tl.max(k, axis=0)):
        loss += _stage_nll(x, rank, i, i < k)
    tl.store(loss_ptr + rows, loss, mask=row_ok)


@triton.jit
def mnl_topk_bwd_kernel(
    grad_out_ptr,
    r_ptr,
    ranks_ptr,
    grad_r_ptr,
    B,
    S,
    stride_g,
    stride_rb,
    stride_rs,
    stride_kb,
    stride_ks,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    rows, cols, row_ok, in_bounds, rank, valid, x = load_tile(
        r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS, BLOCK_S, CONTIG
    )
    g = load_row_scalars(grad_out_ptr, rows, row_ok, stride_g).to(x.dtype)
    k = tl.sum((rank >= 0).to(tl.int32), axis=1)
    prob = tl.zeros([ROWS, BLOCK_S], dtype=x.dtype)
    for i in range(0, tl.max(k, axis=0)):
        prob += _stage_softmax(x, rank, i, i < k)
    grad = (prob - (rank >= 0).to(x.dtype)) * g[:, None]
    store_tile(grad_r_ptr, tl.where(valid, grad, 0.0), rows, cols, in_bounds, S, BLOCK_S, CONTIG)


def mnl_topk_fwd(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-row MNL top-k NLL ``[B]`` of fp32/fp64 ``rewards [B, S]`` and integer ``ranks [B, S]``."""
    B, S = rewards.shape
    loss = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    launch_rows(
        mnl_topk_fwd_kernel,
        rewards,
        ranks,
        rewards,
        ranks,
        loss,
        B,
        S,
        *rewards.stride(),
        *ranks.stride(),
    )
    return loss


def mnl_topk_bwd(grad_out: torch.Tensor, rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Gradient ``[B, S]`` (contiguous, rewards' dtype) of ``sum_b grad_out[b] * loss_b``."""
    B, S = rewards.shape
    grad = torch.empty((B, S), dtype=rewards.dtype, device=rewards.device)
    launch_rows(
        mnl_topk_bwd_kernel,
        rewards,
        ranks,
        grad_out,
        rewards,
        ranks,
        grad,
        B,
        S,
        grad_out.stride(0),
        *rewards.stride(),
        *ranks.stride(),
    )
    return grad
