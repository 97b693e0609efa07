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

#: Bytes of rewards in the register tile ``[ROWS, BLOCK_S]`` of one program (when rows are
#: many): 512 fp32 or 256 fp64 elements, 4 warps.
TILE_BYTES = 2048
#: Bytes of rewards per thread, ``num_warps = tile bytes / (32 * BYTES_PER_THREAD)`` (1 to 16):
#: one 128-bit load, 4 fp32 or 2 fp64 elements. Chosen from the compiler's report
#: (docs/kernels.md, benchmarks/static_report.py): no config spills on sm_80/90/100 or gfx942,
#: and fp32 at S <= 16 keeps 40+ warps resident per SM on sm_90.
BYTES_PER_THREAD = 16
#: Widest row that the kernels take in one block (the losses run the PyTorch reference above it).
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
def contiguous_span(B, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """``CONTIG`` tiles: the element offsets of this program's ``ROWS * BLOCK_S`` span, and its mask.

    One flat span rather than ``[ROWS, BLOCK_S]`` offsets: a thread's elements may then run
    across rows, so even ``S = 2`` gets 128-bit accesses (when ``B`` is a multiple of 16).
    """
    flat = tl.program_id(0).to(tl.int64) * (ROWS * BLOCK_S) + tl.arange(0, ROWS * BLOCK_S)
    return flat, flat < B.to(tl.int64) * BLOCK_S


@triton.jit
def load_block(
    ptr,
    rows,
    cols,
    in_bounds,
    B,
    stride_b,
    stride_s,
    other,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CONTIG: tl.constexpr,
):
    """The ``[ROWS, BLOCK_S]`` tile of a ``[B, S]`` tensor; out of bounds reads ``other``."""
    if CONTIG:
        flat, mask = contiguous_span(B, ROWS, BLOCK_S)
        return tl.reshape(tl.load(ptr + flat, mask=mask, other=other), (ROWS, BLOCK_S))
    offs = rows[:, None] * stride_b + cols[None, :] * stride_s
    return tl.load(ptr + offs, mask=in_bounds, other=other)


@triton.jit
def load_tile(
    r_ptr,
    ranks_ptr,
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
    """This program's tile: indices and masks, ranks (int32), the assortment mask and the rewards.

    Slots past the end of a row or of the batch read as ``IGNORE``. The rewards are loaded
    with the bounds mask only (a data-dependent mask would keep the load scalar), then
    padding is replaced by 0 before any arithmetic: padding may hold NaN or inf, and the
    ``tl.where`` keeps it out of every later expression.

    ``CONTIG`` (``S == BLOCK_S``, rewards and ranks contiguous): the tile is one contiguous
    span of each tensor, loaded as such (``contiguous_span``).
    """
    rows, cols, row_ok, in_bounds = row_block(tl.program_id(0), B, S, ROWS, BLOCK_S)
    rank = load_block(ranks_ptr, rows, cols, in_bounds, B, stride_kb, stride_ks, IGNORE, ROWS, BLOCK_S, CONTIG)
    rank = rank.to(tl.int32)
    valid = (rank >= 0) | (rank == UNRANKED)
    x = load_block(r_ptr, rows, cols, in_bounds, B, stride_rb, stride_rs, 0.0, ROWS, BLOCK_S, CONTIG)
    return rows, cols, row_ok, in_bounds, rank, valid, tl.where(valid, x, 0.0)


@triton.jit
def load_row_scalars(ptr, rows, row_ok, stride):
    """One value per row (upstream gradient, Mallows weight); ``stride`` may be 0 (expanded)."""
    return tl.load(ptr + rows * stride, mask=row_ok, other=0.0)


@triton.jit
def store_tile(
    ptr, value, rows, cols, in_bounds, B, S, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, CONTIG: tl.constexpr
):
    """Store a tile into a contiguous ``[B, S]`` tensor."""
    if CONTIG:
        flat, mask = contiguous_span(B, ROWS, BLOCK_S)
        tl.store(ptr + flat, tl.reshape(value, (ROWS * BLOCK_S,)), mask=mask)
    else:
        tl.store(ptr + rows[:, None] * S + cols[None, :], value, mask=in_bounds)


def block_config(B: int, S: int, itemsize: int = 4) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_S, num_warps)`` for a ``[B, S]`` problem with rewards of ``itemsize`` bytes."""
    block_s = max(2, triton.next_power_of_2(S))
    rows = max(1, min(TILE_BYTES // (block_s * itemsize), triton.next_power_of_2(max(B, 1))))
    num_warps = max(1, min(16, rows * block_s * itemsize // (32 * BYTES_PER_THREAD)))
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


def launch_rows(kernel, rewards: torch.Tensor, ranks: torch.Tensor, *args) -> None:
    """Run ``kernel[grid](*args, ROWS, BLOCK_S, CONTIG, num_warps)`` over the row blocks of ``rewards [B, S]``.

    ``CONTIG`` when ``S == BLOCK_S`` and ``rewards`` and ``ranks`` are contiguous: the tile
    is then one contiguous span of each tensor (and of the gradient the kernel writes).
    """
    B, S = rewards.shape
    check_block(S)
    if B == 0:
        return
    rows, block_s, num_warps = block_config(B, S, rewards.element_size())
    contig = block_s == S and rewards.is_contiguous() and ranks.is_contiguous()
    with device_guard(rewards):
        kernel[(triton.cdiv(B, rows),)](
            *args, ROWS=rows, BLOCK_S=block_s, CONTIG=contig, num_warps=num_warps, **register_limit(num_warps)
        )


def register_limit(num_warps: int) -> dict:
    """``maxnreg``: the registers a thread may use at ``num_warps`` (NVIDIA only; ROCm has no such option).

    It limits nothing the block size does not limit already, but without it ptxas may
    spill a register or two across the stage loop to reach the next occupancy step
    (seen on sm_80/90/100 for fp64 MNL); with it, the same register count and no spill.
    """
    if torch.version.hip is not None:
        return {}
    return {"maxnreg": min(255, 65536 // (32 * num_warps)) // 8 * 8}
