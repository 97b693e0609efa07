"""Fused MNL (Plackett-Luce) top-k loss: forward and backward, one launch each.

Specification (the PyTorch twin): ``rcpo_losses.reference.mnl.mnl_topk_nll``. Per row ``b`` with ``k`` picks,

    loss_b = sum_{i<k} [ logsumexp_{j in R_i} r_j - r_{y_i} ],   R_i = {j : rank_j >= i} ∪ U
    dloss_b / dr_j = sum_{i<k, j in R_i} softmax_{R_i}(r)_j - [j ranked]

Each stage is computed shifted by its pick, ``log(1 + sum_{j in R_i, j != y_i}
exp(r_j - r_{y_i}))`` (``log1p`` when every other reward is below the pick's, else shifted
by the largest), so a tiny stage keeps its relative accuracy: a pair at a margin of 30
gives ``-logsigmoid(30) = 9.4e-14``, not 0. The pick's gradient ``p - 1`` is written as
``-sum_{others} p`` for the same reason.

The kernels never build the ``[B, S, S]`` stage-by-item mask of the reference: a loop
over the stages ``i`` (up to the largest ``k`` of the block) recomputes the membership
``j in R_i`` from the ranks held in registers, so each stage costs one masked max, one
exp, one sum and one log over the ``[ROWS, BLOCK_S]`` tile. The backward recomputes the
stages (nothing but the inputs is saved) and turns each stage's exponentials into softmax
probabilities. No atomics: the sums run in a fixed order, and results are bitwise
reproducible.

Rewards come in fp32 or fp64 and the arithmetic runs in that dtype; ranks in any integer
dtype (read as int32). Padding (``IGNORE``) never reaches a result and gets a gradient of
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
def _stage_others(rank, i):
    """``j in R_i, j != y_i``: still available at stage ``i`` and not its pick."""
    return (rank > i) | (rank == UNRANKED)


@triton.jit
def _log1p(s):
    """``log(1 + s)`` for ``s >= 0`` to relative accuracy, without libdevice (Goldberg's trick)."""
    u = 1.0 + s
    return tl.where(u == 1.0, s, tl.log(u) * (s / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _stage(x, rank, i):
    """Stage ``i`` shifted by its pick: per row ``c``, ``e = exp(r_j - r_{y_i} - c)`` on the others, ``z``.

    ``c = max(0, max_j r_j - r_{y_i})`` and ``z = exp(-c) + sum e``, so that the stage is
    ``c + log(z)``, which is ``log1p(sum e)`` when ``c = 0``.
    """
    others = _stage_others(rank, i)
    d = x - tl.sum(tl.where(rank == i, x, 0.0), axis=1)[:, None]
    c = tl.max(tl.where(others, d, 0.0), axis=1)  # max(0, max_others d)
    e = tl.exp(tl.where(others, d - c[:, None], float("-inf")))
    return c, e, tl.exp(-c) + tl.sum(e, axis=1)


@triton.jit
def _stage_nll(x, rank, i, active):
    """``logsumexp_{R_i} r - r_{y_i} = log(1 + sum_{others} exp(r_j - r_{y_i}))``; 0 past the row's list."""
    c, e, z = _stage(x, rank, i)
    nll = tl.where(c > 0, c + tl.log(z), _log1p(tl.sum(e, axis=1)))
    return tl.where(active, nll, 0.0)


@triton.jit
def _stage_grad(x, rank, i, active):
    """Gradient of stage ``i``: ``softmax_{R_i}`` on the others, minus their sum on the pick.

    The pick's ``p - 1`` is written as ``-sum_{others} p``: exact when ``p`` rounds to 1.
    """
    _, e, z = _stage(x, rank, i)
    q = tl.where(active[:, None], e / z[:, None], 0.0)
    return q - tl.where(rank == i, tl.sum(q, axis=1)[:, None], 0.0)


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
    k = tl.sum((rank >= 0).to(tl.int32), axis=1)
    grad = tl.zeros([ROWS, BLOCK_S], dtype=x.dtype)
    for i in range(0, tl.max(k, axis=0)):
        grad += _stage_grad(x, rank, i, i < k)
    grad = grad * load_row_scalars(grad_out_ptr, rows, row_ok, stride_g).to(x.dtype)[:, None]
    store_tile(grad_r_ptr, tl.where(valid, grad, 0.0), rows, cols, in_bounds, B, S, ROWS, BLOCK_S, CONTIG)


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
