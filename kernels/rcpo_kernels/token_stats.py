"""Per-token target log-prob and entropy in one online-softmax pass over the vocabulary.

For one row ``z`` of ``V`` logits and its target token ``t``:

    lse  = log sum_v exp(z_v)
    logp = z_t - lse
    H    = -sum_v p_v log p_v = lse - sum_v p_v z_v,      p = softmax(z)

The forward kernel (one program per row) reads the row once, in blocks of ``BLOCK_V``,
and keeps three running scalars, relative to the running max ``m``:

    m = max_v z_v,   s = sum_v exp(z_v - m),   w = sum_v exp(z_v - m) (z_v - m)

When a block raises the max from ``m`` to ``m'`` (``d = m - m' <= 0``), every old term
is rescaled: ``exp(z - m') = exp(d) exp(z - m)`` and ``(z - m') = (z - m) + d``, so

    s' = exp(d) s + sum_block exp(z - m')
    w' = exp(d) (w + d s) + sum_block exp(z - m') (z - m')

which is exact algebra, not an approximation. At the end ``lse = m + log s`` and
``H = log s - w / s``: ``s >= 1`` (the max contributes ``exp(0)``) and ``w <= 0``, so
``H`` is a sum of two non-negative terms and keeps its relative accuracy even when the
logits are large (no ``lse - E[z]`` cancellation).

The backward kernel (one program per row and block of ``V``) recomputes
``log p = z - lse`` from the saved ``lse`` and writes

    dL/dz_v = g_logp (1{v = t} - p_v) - g_H p_v (log p_v + H) + g_lse p_v

in the logits' dtype: one read of the logits, one write of the gradient. (``g_lse`` is the
gradient of the ``lse`` output, which the vocabulary-parallel path differentiates.)

Optionally the logits are transformed right after the load, inside the same pass
(``TRANSFORM``: 0 none, 1 ``z' = k z``, 2 ``z' = (c / T) tanh((a / c) z)``, Gemma-2's
soft-capping with a scale and a temperature); the statistics are those of ``z'``, and the
backward multiplies the gradient by ``dz'/dz = (a / T) (1 - tanh^2)``, recomputed from the
raw logits. The three constants come in a small tensor of the accumulator's dtype, so that
fp64 logits get fp64 constants.

All arithmetic is fp32 (fp64 for fp64 logits); bf16/fp16 are converted right after the
load. Rows whose target is ``ignore_index`` read nothing and get 0 outputs and a 0
gradient. Registered as custom ops in ``rcpo_losses.ops.token_stats``. Specification (the PyTorch
twin): ``rcpo_losses.reference.token_stats`` (``token_stats_reference``; the chunked CPU path
``TokenStats``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# One block of a row per loop iteration (forward) or per program (backward): 8 KiB of bf16
# at 8 warps, 16 elements a thread. Not autotuned (no GPU was at hand when it was written).
MAX_BLOCK_V = 4096
MIN_BLOCK_V = 16


TRANSFORM_NONE = tl.constexpr(0)
TRANSFORM_SCALE = tl.constexpr(1)
TRANSFORM_SOFTCAP = tl.constexpr(2)


@triton.jit
def _tanh(x):
    """``tanh`` from one ``exp`` of ``-2 |x|`` (never overflows); ``libdevice`` does not run interpreted."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _transform(z, params_ptr, TRANSFORM: tl.constexpr):
    """``z'``: the logits after the scale (1) or soft-cap (2) transform; ``params = (k_in, k_out, k_grad)``."""
    if TRANSFORM == TRANSFORM_SOFTCAP:
        z = _tanh(z * tl.load(params_ptr)) * tl.load(params_ptr + 1)
    elif TRANSFORM == TRANSFORM_SCALE:
        z = z * tl.load(params_ptr)
    return z


@triton.jit
def _online_update(m, s, w, z):
    """Fold one block ``z`` (masked lanes hold -inf) into the running ``(m, s, w)``."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # A finite reference point: while every logit seen is -inf, m_new is -inf too.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)
    # e * (z - m_ref) -> 0 as e -> 0; written out so that -inf lanes give 0, not 0 * -inf.
    ez = tl.where(e > 0, e * (z - m_ref), 0.0)
    # Rescale the old terms; when nothing was summed yet (s = 0, m = -inf) there is nothing to rescale.
    w_old = tl.where(s > 0, alpha * (w + (m - m_ref) * s), 0.0)
    return m_new, s * alpha + tl.sum(e, axis=0), w_old + tl.sum(ez, axis=0)


@triton.jit
def _finalize(m, s, w):
    """``(lse, H)`` from the running max, sum of exp and sum of exp times shifted logit."""
    log_s = tl.log(s)
    return m + log_s, log_s - w / s


@triton.jit
def _target_logit(row_ptr, t, valid, V, params_ptr, ACC: tl.constexpr, TRANSFORM: tl.constexpr):
    """``z'_t`` for a valid row; NaN for a target outside ``[0, V)`` (never read out of bounds)."""
    in_range = valid & (t >= 0) & (t < V)
    z = tl.load(row_ptr + tl.where(in_range, t, 0), mask=in_range, other=float("nan")).to(ACC)
    return _transform(z, params_ptr, TRANSFORM)


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    params_ptr,
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    w = tl.zeros([], ACC)
    # Ignored rows run no iterations, so their logits are never read.
    n_cols = tl.where(valid, V, 0)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(ACC)
        if TRANSFORM == TRANSFORM_SOFTCAP:  # the cap maps the masked lanes' -inf to -c / T: put it back
            z = tl.where(cols < V, _transform(z, params_ptr, TRANSFORM), float("-inf"))
        else:
            z = _transform(z, params_ptr, TRANSFORM)
        m, s, w = _online_update(m, s, w, z)
    lse, ent = _finalize(m, s, w)
    logp = _target_logit(row_ptr, t, valid, V, params_ptr, ACC, TRANSFORM) - lse
    out_ty = logp_ptr.dtype.element_ty
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0).to(out_ty))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0).to(out_ty))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0).to(out_ty))


@triton.jit
def _grad_block(z, is_target, lse, ent, g_logp, g_ent, g_lse):
    """``g_logp (onehot - p) - g_ent p (log p + H) + g_lse p`` for one block of a row."""
    log_p = z - lse
    p = tl.exp(log_p)
    # p = 0 (a -inf or underflowed logit) contributes exactly 0; avoids 0 * inf.
    g = tl.where(p > 0, -p * (g_logp - g_lse + g_ent * (log_p + ent)), 0.0)
    return g + tl.where(is_target, g_logp, 0.0)


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    g_logp_ptr,
    g_ent_ptr,
    g_lse_ptr,
    grad_ptr,
    params_ptr,
    stride_row,
    stride_grad_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = cols < V
    t = tl.load(targets_ptr + row)
    valid = t != ignore_index
    # Ignored rows read no logits (every lane masked) and write zeros.
    z = tl.load(logits_ptr + row * stride_row + cols, mask=in_v & valid, other=float("-inf")).to(ACC)
    lse = tl.load(lse_ptr + row).to(ACC)
    ent = tl.load(ent_ptr + row).to(ACC)
    g_logp = tl.load(g_logp_ptr + row).to(ACC)
    g_ent = tl.load(g_ent_ptr + row).to(ACC)
    g_lse = tl.load(g_lse_ptr + row).to(ACC)
    if TRANSFORM == TRANSFORM_SOFTCAP:
        # dz'/dz = (a / T) (1 - tanh^2); masked lanes (-inf) get z' = -c / T and a 0 store-masked gradient.
        th = _tanh(z * tl.load(params_ptr))
        g = _grad_block(th * tl.load(params_ptr + 1), cols == t, lse, ent, g_logp, g_ent, g_lse)
        g = g * (tl.load(params_ptr + 2) * (1.0 - th * th))
    elif TRANSFORM == TRANSFORM_SCALE:
        g = _grad_block(z * tl.load(params_ptr), cols == t, lse, ent, g_logp, g_ent, g_lse) * tl.load(params_ptr + 2)
    else:
        g = _grad_block(z, cols == t, lse, ent, g_logp, g_ent, g_lse)
    g = tl.where(valid, g, 0.0)
    tl.store(grad_ptr + row * stride_grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_v)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-token outputs: fp64 for fp64 logits, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_v(V: int, block_v: int) -> int:
    if block_v:
        if block_v & (block_v - 1):
            raise ValueError(f"block_v: must be a power of two, got {block_v}")
        return block_v
    return min(MAX_BLOCK_V, max(MIN_BLOCK_V, triton.next_power_of_2(V)))


def _num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else 8


@functools.lru_cache(maxsize=64)
def _transform_params(
    softcap: float, logit_scale: float, temperature: float, dtype: torch.dtype, device: torch.device
) -> tuple[int, torch.Tensor]:
    """``(TRANSFORM, params)`` for ``softcap`` (0: none), ``logit_scale``, ``temperature``; params cached per device.

    Cached so that a launch does not copy three floats to the device (a host sync on CUDA).
    """
    a, c, T = logit_scale, softcap, temperature
    if c:
        kind, values = 2, (a / c, c / T, a / T)
    elif a != 1 or T != 1:
        kind, values = 1, (a / T, a / T, a / T)
    else:
        kind, values = 0, (1.0, 1.0, 1.0)
    return kind, torch.tensor(values, dtype=out_dtype(dtype), device=device)


def token_stats_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    block_v: int = 0,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``logits`` ``[N, V]`` with unit column stride, ``targets`` ``[N]`` int.

    Returns ``(logp, entropy, lse)``, each ``[N]`` in fp32 (fp64 for fp64 logits), of the
    transformed logits (``softcap=0``: no cap).
    """
    N, V = logits.shape
    assert logits.stride(1) == 1 or V == 1, "logits must have unit stride along V"
    dtype = out_dtype(logits.dtype)
    logp = torch.empty(N, dtype=dtype, device=logits.device)
    ent = torch.empty(N, dtype=dtype, device=logits.device)
    lse = torch.empty(N, dtype=dtype, device=logits.device)
    if N == 0:
        return logp, ent, lse
    bv = _block_v(V, block_v)
    kind, params = _transform_params(softcap, logit_scale, temperature, logits.dtype, logits.device)
    _token_stats_fwd_kernel[(N,)](
        logits,
        targets,
        logp,
        ent,
        lse,
        params,
        logits.stride(0),
        V,
        ignore_index,
        BLOCK_V=bv,
        ACC=_acc(logits.dtype),
        TRANSFORM=kind,
        num_warps=_num_warps(bv),
    )
    return logp, ent, lse


def token_stats_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ent: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor,
    ignore_index: int,
    block_v: int = 0,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    g_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: the ``[N, V]`` gradient w.r.t. the raw logits, in the logits' dtype.

    ``g_lse``: the ``[N]`` gradient of the ``lse`` output (None: 0).
    """
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0 or V == 0:
        return grad
    bv = _block_v(V, block_v)
    kind, params = _transform_params(softcap, logit_scale, temperature, logits.dtype, logits.device)
    _token_stats_bwd_kernel[(N, triton.cdiv(V, bv))](
        logits,
        targets,
        lse,
        ent,
        g_logp,
        g_ent,
        torch.zeros_like(g_logp) if g_lse is None else g_lse,
        grad,
        params,
        logits.stride(0),
        grad.stride(0),
        V,
        ignore_index,
        BLOCK_V=bv,
        ACC=_acc(logits.dtype),
        TRANSFORM=kind,
        num_warps=_num_warps(bv),
    )
    return grad
