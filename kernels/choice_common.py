"""Pieces shared by the choice-model kernels (``mnl.py``, ``mallows.py``).

Both kernels work on a block of ``ROWS`` rows of a ``[B, S]`` problem at once: a 2D
register tile ``[ROWS, BLOCK_S]`` with ``BLOCK_S = next_power_of_2(S)``. For small ``S``
(2 to 16 responses, the usual case) many rows share a program, so loads are wide and
coalesced; for large ``S`` a program holds one row, as in the fused-softmax tutorial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rank codes (rcpo_losses.ranks): a pick is >= 0. A module global read inside @triton.jit
# must be a tl.constexpr instance; an annotation `X: tl.constexpr = -1` runs under the
# interpreter but the GPU compiler rejects it ("Cannot access global variable").
UNRANKED = tl.constexpr(-1)
IGNORE = tl.constexpr(-100)

#: Elements of the register tile ``[ROWS, BLOCK_S]`` one program works on.
TILE_ELEMENTS = 2048
#: Widest row that the kernels take in one block (``rcpo_losses.choice_ops`` falls back to
#: the PyTorch reference above it).
MAX_BLOCK_S = 4096


@triton.jit
def row_block(pid, B, S, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row and column indices of program ``pid``'s tile, with the out-of-bounds masks."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_S)
    row_ok = rows < B
    in_bounds = row_ok[:, None] & (cols < S)[None, :]
    return rows.to(tl.int64), cols, row_ok, in_bounds


@triton.jit
def load_ranks(ranks_ptr, rows, cols, in_bounds, stride_b, stride_s):
    """Ranks of the tile as int32; slots past the end of a row or of the batch read IGNORE."""
    offs = rows[:, None] * stride_b + cols[None, :] * stride_s
    return tl.load(ranks_ptr + offs, mask=in_bounds, other=IGNORE).to(tl.int32)


@triton.jit
def load_rewards(r_ptr, rows, cols, valid, stride_b, stride_s):
    """Rewards of the tile; padding (``valid`` False) reads 0 and its memory is never touched.

    Padding may hold NaN or inf: masking the load itself, not the value afterwards, keeps
    it out of every later expression.
    """
    offs = rows[:, None] * stride_b + cols[None, :] * stride_s
    return tl.load(r_ptr + offs, mask=valid, other=0.0)


@triton.jit
def load_tile(
    r_ptr, ranks_ptr, B, S, stride_rb, stride_rs, stride_kb, stride_ks, ROWS: tl.constexpr, BLOCK_S: tl.constexpr
):
    """This program's tile: indices and masks, ranks, the assortment mask and the rewards."""
    rows, cols, row_ok, in_bounds = row_block(tl.program_id(0), B, S, ROWS, BLOCK_S)
    rank = load_ranks(ranks_ptr, rows, cols, in_bounds, stride_kb, stride_ks)
    valid = (rank >= 0) | (rank == UNRANKED)
    x = load_rewards(r_ptr, rows, cols, valid, stride_rb, stride_rs)
    return rows, cols, row_ok, in_bounds, rank, valid, x


@triton.jit
def load_row_scalars(ptr, rows, row_ok, stride):
    """One value per row (upstream gradient, Mallows weight); ``stride`` may be 0 (expanded)."""
    return tl.load(ptr + rows * stride, mask=row_ok, other=0.0)


@triton.jit
def store_tile(ptr, value, rows, cols, in_bounds, stride_b):
    tl.store(ptr + rows[:, None] * stride_b + cols[None, :], value, mask=in_bounds)


def block_config(B: int, S: int) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_S, num_warps)`` for a ``[B, S]`` problem."""
    block_s = max(2, triton.next_power_of_2(S))
    rows = max(1, min(TILE_ELEMENTS // block_s, triton.next_power_of_2(max(B, 1))))
    tile = rows * block_s
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return rows, block_s, num_warps


def check_block(S: int) -> None:
    if S > MAX_BLOCK_S:
        raise ValueError(f"rewards: S = {S} slots is more than the kernels' one-block limit of {MAX_BLOCK_S}")


def device_guard(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def launch_rows(kernel, rewards: torch.Tensor, *args) -> None:
    """Run ``kernel[grid](*args, ROWS, BLOCK_S, num_warps)`` over the row blocks of ``rewards [B, S]``."""
    B, S = rewards.shape
    check_block(S)
    if B == 0:
        return
    rows, block_s, num_warps = block_config(B, S)
    with device_guard(rewards):
        kernel[(triton.cdiv(B, rows),)](*args, ROWS=rows, BLOCK_S=block_s, num_warps=num_warps)
