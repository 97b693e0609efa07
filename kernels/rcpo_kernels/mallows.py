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
in reverse to sum, per predecessor, the ``c_l`` of the slots that point at it (one helper,
``_route``, both ways). One kernel body does the forward and, with ``BACKWARD``, the backward. No
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
def _route(x, from_rank, to_rank, k_max):
    """``out[b, j] = sum_l x[b, l] [from_rank[b, l] = to_rank[b, j]]`` over the ranks ``t < k_max``.

    ``_route(x, rank, pred_rank)`` gathers the predecessor's value, ``x_pred[b, j] = x[b, p(j)]``
    (0 where ``j`` has none); ``_route(c, pred_rank, rank)`` is its adjoint, the scatter back
    ``out[b, j] = sum_{l : p(l) = j} c[b, l]``.
    """
    out = tl.zeros(x.shape, dtype=x.dtype)
    for t in range(0, k_max):
        x_t = tl.sum(tl.where(from_rank == t, x, 0.0), axis=1)
        out += tl.where(to_rank == t, x_t[:, None], 0.0)
    return out


@triton.jit
def _sigmoid_and_slope(z):
    """``sigmoid(z)`` and ``sigmoid'(z)``, stable for any finite ``z``."""
    e = tl.exp(-tl.abs(z))
    hi = 1.0 / (1.0 + e)  # sigmoid(|z|)
    lo = e * hi  # sigmoid(-|z|)
    return tl.where(z >= 0, hi, lo), hi * lo


@triton.jit
def mallows_rmj_topk_kernel(
    r_ptr,
    ranks_ptr,
    w_ptr,
    out_ptr,
    grad_out_ptr,
    grad_r_ptr,
    B,
    S,
    stride_rb,
    stride_rs,
    stride_kb,
    stride_ks,
    stride_w,
    stride_g,
    BACKWARD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    """Forward: ``out = w * s`` per row. ``BACKWARD``: ``out = g * s`` (the gradient of ``w``) and the rewards'
    gradient into ``grad_r_ptr``, for the upstream gradient ``g`` at ``grad_out_ptr`` (unused in the forward)."""
    rows, cols, row_ok, in_bounds, rank, valid, x = load_tile(
        r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS, BLOCK_S, CONTIG
    )
    w = load_row_scalars(w_ptr, rows, row_ok, stride_w).to(x.dtype)
    if BACKWARD:
        g = load_row_scalars(grad_out_ptr, rows, row_ok, stride_g).to(x.dtype)
    pred_rank, weight, k_max = _predecessors(rank, valid, x.dtype)
    sig, slope = _sigmoid_and_slope(x - _route(x, rank, pred_rank, k_max))
    total = tl.sum(weight * sig, axis=1)
    if BACKWARD:
        tl.store(out_ptr + rows, g * total, mask=row_ok)
        c = weight * slope * (g * w)[:, None]
        grad = c - _route(c, pred_rank, rank, k_max)
        store_tile(grad_r_ptr, tl.where(valid, grad, 0.0), rows, cols, in_bounds, B, S, ROWS, BLOCK_S, CONTIG)
    else:
        tl.store(out_ptr + rows, w * total, mask=row_ok)


def mallows_rmj_topk_fwd(rewards: torch.Tensor, ranks: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row ``w_b * s_b`` ``[B]`` of fp32/fp64 ``rewards [B, S]``, integer ``ranks``, ``w [B]``."""
    B, S = rewards.shape
    loss = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    # grad_out_ptr, grad_r_ptr and stride_g are not read in the forward: any pointer and stride do
    args = (rewards, ranks, w, loss, w, loss, B, S, *rewards.stride(), *ranks.stride(), w.stride(0), 0)
    launch_rows(mallows_rmj_topk_kernel, rewards, ranks, *args, False)  # BACKWARD=False
    return loss


def mallows_rmj_topk_bwd(
    grad_out: torch.Tensor, rewards: torch.Tensor, ranks: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``([B, S], [B])`` of ``sum_b grad_out[b] * w_b * s_b`` w.r.t. rewards and ``w``."""
    B, S = rewards.shape
    grad_r = torch.empty((B, S), dtype=rewards.dtype, device=rewards.device)
    grad_w = torch.empty(B, dtype=rewards.dtype, device=rewards.device)
    args = (rewards, ranks, w, grad_w, grad_out, grad_r, B, S, *rewards.stride(), *ranks.stride(), w.stride(0))
    launch_rows(mallows_rmj_topk_kernel, rewards, ranks, *args, grad_out.stride(0), True)  # BACKWARD=True
    return grad_r, grad_w
