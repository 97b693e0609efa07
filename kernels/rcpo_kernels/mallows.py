"""Fused sigmoid-smoothed Mallows-RMJ top-k loss: forward and backward, one launch each.

Specification (the PyTorch twin): ``w_b * rcpo_losses.reference.mallows.mallows_rmj_topk_sum``. Per row ``b`` with
``n`` responses and ``k`` picks, every non-top slot ``j`` is compared with its
predecessor ``p(j)`` in the top-k list:

* ranked ``j`` with ``rank_j >= 1``: ``p(j)`` is the item ranked ``rank_j - 1``, weight ``n - rank_j``;
* unranked ``j``: ``p(j)`` is the last pick (rank ``k - 1``), weight 1;

    loss_b = w_b * s_b,   s_b = sum_j weight_j * sigmoid(r_j - r_{p(j)})
    dloss_b / dr_j = w_b * [c_j - sum_{l : p(l) = j} c_l],   c_j = weight_j * sigmoid'(r_j - r_{p(j)})
    dloss_b / dw_b = s_b

The predecessor's reward is gathered, and the gradient scattered back to the
predecessor, inside the register tile: a loop over the ranks ``t < k`` (up to the largest
``k`` of the block) picks the reward of the rank-``t`` item with a masked row sum and
hands it to the slots whose predecessor has rank ``t``; the backward runs the same loop
in reverse to sum, per predecessor, the ``c_l`` of the slots that point at it. No
atomics, no index tensor in memory; bitwise reproducible.

``sigmoid`` is evaluated from ``e = exp(-|z|)`` (never overflows):
``sigmoid(z) = 1 / (1 + e)`` for ``z >= 0``, ``e / (1 + e)`` below, and
``sigmoid'(z) = e / (1 + e)^2``, exact also where ``sigmoid`` rounds to 1.

Rewards come in fp32 or fp64 and the arithmetic runs in that dtype. Padding never
reaches a result (it is zeroed after the load) and gets a gradient of exactly 0. A row
without a ranked response (invalid; the public losses drop it) gets loss 0 and gradient 0.
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
def _predecessors(rank, valid, dtype):
    """Rank of each slot's predecessor (-1: none) and the weight of its comparison."""
    n = tl.sum(valid.to(tl.int32), axis=1)
    k = tl.sum((rank >= 0).to(tl.int32), axis=1)
    unranked = (rank == UNRANKED) & (k[:, None] >= 1)
    pred_rank = tl.where(rank >= 1, rank - 1, tl.where(unranked, k[:, None] - 1, -1))
    weight = tl.where(rank >= 1, n[:, None] - rank, unranked.to(tl.int32))
    return pred_rank, weight.to(dtype), tl.max(k, axis=0)


@triton.jit
def _gather_predecessor(x, rank, pred_rank, k_max):
    """``x_pred[b, j] = x[b, p(j)]`` (0 where ``j`` has no predecessor)."""
    x_pred = tl.zeros(x.shape, dtype=x.dtype)
    for t in range(0, k_max):
        x_t = tl.sum(tl.where(rank == t, x, 0.0), axis=1)
        x_pred += tl.where(pred_rank == t, x_t[:, None], 0.0)
    return x_pred


@triton.jit
def _scatter_to_predecessor(c, rank, pred_rank, k_max):
    """``out[b, j] = sum_{l : p(l) = j} c[b, l]``: the adjoint of ``_gather_predecessor``."""
    out = tl.zeros(c.shape, dtype=c.dtype)
    for t in range(0, k_max):
        c_t = tl.sum(tl.where(pred_rank == t, c, 0.0), axis=1)
        out += tl.where(rank == t, c_t[:, None], 0.0)
    return out


@triton.jit
def _sigmoid_and_slope(z):
    """``sigmoid(z)`` and ``sigmoid'(z)``, stable for any finite ``z``."""
    e = tl.exp(-tl.abs(z))
    hi = 1.0 / (1.0 + e)  # sigmoid(|z|)
    lo = e * hi  # sigmoid(-|z|)
    return tl.where(z >= 0, hi, lo), hi * lo


@triton.jit
def mallows_rmj_topk_fwd_kernel(
    r_ptr,
    ranks_ptr,
    w_ptr,
    loss_ptr,
    B,
    S,
    stride_rb,
    stride_rs,
    stride_kb,
    stride_ks,
    stride_w,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    rows, cols, row_ok, in_bounds, rank, valid, x = load_tile(
        r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS, BLOCK_S, CONTIG
    )
    w = load_row_scalars(w_ptr, rows, row_ok, stride_w).to(x.dtype)
    pred_rank, weight, k_max = _predecessors(rank, valid, x.dtype)
    sig, _ = _sigmoid_and_slope(x - _gather_predecessor(x, rank, pred_rank, k_max))
    total = tl.sum(weight * sig, axis=1)
    tl.store(loss_ptr + rows, w * total, mask=row_ok)


@triton.jit
def mallows_rmj_topk_bwd_kernel(
    grad_out_ptr,
    r_ptr,
    ranks_ptr,
    w_ptr,
    grad_r_ptr,
    grad_w_ptr,
    B,
    S,
    stride_g,
    stride_rb,
    stride_rs,
    stride_kb,
    stride_ks,
    stride_w,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    rows, cols, row_ok, in_bounds, rank, valid, x = load_tile(
        r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS, BLOCK_S, CONTIG
    )
    w = load_row_scalars(w_ptr, rows, row_ok, stride_w).to(x.dtype)
    g = load_row_scalars(grad_out_ptr, rows, row_ok, stride_g).to(x.dtype)
    pred_rank, weight, k_max = _predecessors(rank, valid, x.dtype)
    sig, slope = _sigmoid_and_slope(x - _gather_predecessor(x, rank, pred_rank, k_max))
    tl.store(grad_w_ptr + rows, g * tl.sum(weight * sig, axis=1), mask=row_ok)
    c = weight * slope * (g * w)[:, None]
    grad = c - _scatter_to_predecessor(c, rank, pred_rank, k_max)
    store_tile(grad_r_ptr, tl.where(valid, grad, 0.0), rows, cols, in_bounds, B, S, ROWS, BLOCK_S, CONTIG)


def mallows_rmj_topk_fwd(rewards: torch.Tensor, ranks: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row ``w_b * s_b`` ``[B]`` of fp32/fp64 ``rewards [B, S]``, integer ``ranks``, ``w [B]``."""
    B, S = rewards.shape
    loss = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    launch_rows(
        mallows_rmj_topk_fwd_kernel,
        rewards,
        ranks,
        rewards,
        ranks,
        w,
        loss,
        B,
        S,
        *rewards.stride(),
        *ranks.stride(),
        w.stride(0),
    )
    return loss


def mallows_rmj_topk_bwd(
    grad_out: torch.Tensor, rewards: torch.Tensor, ranks: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``([B, S], [B])`` of ``sum_b grad_out[b] * w_b * s_b`` w.r.t. rewards and ``w``."""
    B, S = rewards.shape
    grad_r = torch.empty((B, S), dtype=rewards.dtype, device=rewards.device)
    grad_w = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    launch_rows(
        mallows_rmj_topk_bwd_kernel,
        rewards,
        ranks,
        grad_out,
        rewards,
        ranks,
        w,
        grad_r,
        grad_w,
        B,
        S,
        grad_out.stride(0),
        *rewards.stride(),
        *ranks.stride(),
        w.stride(0),
    )
    return grad_r, grad_w
