"""The fused LM-head op: per-token log-prob and entropy from hidden states and the head, chunk by chunk.

``rcpo_losses::fused_linear_token_stats`` (and ``..._backward``) compute, for ``c`` rows at a
time, the chunk's logits ``z = h @ W.T + b`` into one reused ``[c, V]`` buffer and then its
statistics: through the Triton token-stats op (``rcpo_losses.kernels.token_stats``) on CUDA,
through its PyTorch twin's chunk math (:func:`rcpo_losses.reference.token_stats.chunk_stats`,
:func:`~rcpo_losses.reference.token_stats.chunk_logits_grad`) elsewhere. The backward
recomputes each chunk's logits, turns them into the logits gradient and accumulates
``grad_W``/``grad_b`` in fp32 (fp64 for fp64). On the CPU (unless it takes the fp32-operand
path) the backward walks vocabulary tiles instead (``_backward_vocab_tiles``):
``grad_W[tile] = g.T @ h`` is one GEMM over the tokens and ``grad_h`` is accumulated in an
``[N, H]`` buffer, so there is no ``[V, H]`` fp32 one. :func:`fused_linear_stats_any` is what
:func:`rcpo_losses.fused_linear_token_stats` calls; the backend decisions (Triton, fp32
operands on a CPU without a fast bf16 GEMM) come from :mod:`rcpo_losses.ops.backend`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import no_double_backward
from ..reference.token_stats import (
    LogitTransform,
    Workspace,
    chunk_logits_grad,
    chunk_stats,
    combine_tiles,
    compute_dtype,
    tile_local_targets,
    tile_logits_grad,
    tile_stats,
    transform_from_args,
)
from .backend import cpu_compile, cpu_tile_step, cpu_vocab_tiles, fp32_matmul_operands, use_triton
from .token_stats import row_stats_like, token_stats, token_stats_backward, upstream_grads

# Default chunk: about N / ceil(V / H) rows, so that a chunk of logits holds about as many
# elements as the hidden states (the rule of Liger-Kernel's fused linear cross-entropy),
# rounded up to a power of two; at least MIN_CHUNK_ROWS rows (smaller matmuls run far below
# peak, on the CPU as on a GPU) and at most MAX_CHUNK_ELEMENTS logits (256 MiB of bf16).
MIN_CHUNK_ROWS = 128
MAX_CHUNK_ELEMENTS = 1 << 27


def default_chunk_rows(N: int, H: int, V: int) -> int:
    """Rows per chunk when ``chunk_size=None``: ``next_pow2(ceil(N / ceil(V / H)))``, clamped (see above)."""
    rows = -(-N // max(1, -(-V // max(H, 1))))
    rows = max(MIN_CHUNK_ROWS, 1 << max(0, rows - 1).bit_length())
    return max(1, min(rows, MAX_CHUNK_ELEMENTS // max(V, 1), N))


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``h @ weight.T + bias`` written into ``out`` (a reused ``[c, V]`` buffer)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, buf: Tensor, chunk: int, cast: bool):
    """Per chunk of ``chunk`` rows ``a:b``: ``(a, b, h, z)``, ``z = h @ weight.T + bias`` written into ``buf``.

    ``h`` is the chunk of ``hidden``, in fp32 where ``cast`` (the fp32-operand path).
    """
    N = hidden.shape[0]
    for a in range(0, N, chunk):
        b = min(a + chunk, N)
        h = hidden[a:b].float() if cast else hidden[a:b]
        yield a, b, h, _linear(h, weight, bias, buf[: b - a])


# torch.addmm(..., out_dtype=torch.float32) accumulates bf16/fp16 products straight into an
# fp32 tensor on CUDA (no [V, H] temporary); the CPU has no such kernel. Turned off at the
# first failure (an older torch, or a build without it), after which the fallback runs.
_ADDMM_OUT_DTYPE = [True]


def _accumulate_grad_weight(acc: Tensor, g: Tensor, h: Tensor, g_acc: Tensor | None) -> None:
    """``acc += g.T @ h``: ``acc`` ``[V, H]`` fp32 (fp64); ``g`` ``[c, V]``, ``h`` ``[c, H]`` in the parameters' dtype.

    ``g_acc``: the same gradient in ``acc``'s dtype when the chunk math made it (PyTorch path).
    """
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
        return
    if acc.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, g.t(), h, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    if g_acc is not None and not acc.is_cuda:
        # CPU: no bf16 x bf16 -> fp32 matmul. The fp32 gradient is at hand, and an fp32 addmm_
        # into the accumulator (with a [c, H] fp32 copy of h) measured faster there than a bf16
        # product per chunk added in fp32 (0.88 s against 1.24 s for 32 chunks of 128 x 32000 x 512).
        acc.addmm_(g_acc.t(), h.to(acc.dtype))
        return
    acc.add_(torch.mm(g.t(), h))  # one [V, H] temporary in the parameters' dtype, summed in fp32


def _matmul_operands(weight: Tensor, bias: Tensor | None, use_triton: bool) -> tuple[Tensor, Tensor | None, bool]:
    """``(weight, bias, cast)`` for the chunk matmuls: fp32 copies and ``cast=True`` where bf16 GEMMs are slow."""
    if use_triton or not fp32_matmul_operands(weight):
        return weight, bias, False
    return weight.float(), None if bias is None else bias.float(), True


# The CPU backward of the PyTorch path walks tiles of TILE_ROWS tokens x (TILE_ELEMENTS / rows)
# vocabulary columns, vocabulary outermost: each tile's weight gradient is one GEMM over all the
# tokens of the tile (written straight into grad_W when N <= TILE_ROWS), and the hidden-state
# gradient is accumulated over the vocabulary tiles in an [N, H] buffer (fp32 for bf16/fp16: the
# size of the hidden states, not the [V, H] weight). Token chunks (the CUDA and fp32-operand
# paths) would instead need a fp32 [V, H] accumulator, updated once per chunk, and an fp32 or small-K
# grad_W GEMM per chunk. Where it runs: rcpo_losses.ops.backend.cpu_vocab_tiles.
TILE_ROWS = 4096
TILE_ELEMENTS = 1 << 21


def _tile_shape(N: int, V: int) -> tuple[int, int]:
    rows = min(N, TILE_ROWS)
    return rows, max(1, min(V, TILE_ELEMENTS // max(rows, 1)))


def _forward_vocab_tiles(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    transform: LogitTransform | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward over vocabulary tiles (where: ``rcpo_losses.ops.backend.cpu_vocab_tiles``): ``(logp, entropy, lse)``.

    Each tile's logits come from one GEMM over up to ``TILE_ROWS`` tokens (a wide GEMM: at
    ``N = 2048`` this ran at twice the speed of 64-row chunks in bf16) and leave their row
    statistics (:func:`~rcpo_losses.reference.token_stats.tile_stats`) in a ``[4, K, N]`` table that
    :func:`~rcpo_losses.reference.token_stats.combine_tiles` merges at the end. The entropy is
    always formed (its partial sums cost one multiply-add per logit).
    """
    N, V = hidden.shape[0], weight.shape[0]
    rows, cols = _tile_shape(N, V)
    stats = hidden.new_empty((4, -(-V // cols), N), dtype=dtype)
    z_buf = hidden.new_empty((rows, cols))
    step = cpu_tile_step(tile_stats, hidden.dtype)
    valid = targets != ignore_index
    for k, c0 in enumerate(range(0, V, cols)):
        c1 = min(c0 + cols, V)
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            b = None if bias is None else bias[c0:c1]
            z = _linear(hidden[r0:r1], weight[c0:c1], b, z_buf[: r1 - r0, : c1 - c0])
            stats[:, k, r0:r1] = step(z, tile_local_targets(targets[r0:r1], c0, valid[r0:r1]), transform)
    return combine_tiles(stats, valid)


def _backward_vocab_tiles(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    ent: Tensor,
    g_logp: Tensor,
    g_ent: Tensor | None,
    g_lse: Tensor | None,
    ignore_index: int,
    transform: LogitTransform | None,
    grad_h: Tensor | None,
    need_weight: bool,
    grad_b: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """The backward over vocabulary tiles (where: ``rcpo_losses.ops.backend.cpu_vocab_tiles``).

    Fills ``grad_h`` and ``grad_b``; returns ``(grad_h, grad_W)`` in the parameters' dtype.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = lse.dtype
    rows, cols = _tile_shape(N, V)
    low = weight.dtype != dtype  # bf16/fp16: the GEMMs run in that dtype, the tile math in fp32
    z_buf = hidden.new_empty((rows, cols))
    h_acc = None if grad_h is None else (torch.zeros((N, H), dtype=dtype) if low else grad_h.zero_())
    grad_w = weight.new_empty((V, H)) if need_weight else None
    w_acc = torch.empty((cols, H), dtype=dtype) if need_weight and rows < N else None
    valid = targets != ignore_index
    mask = None if bool(valid.all()) else valid  # free on the CPU, where this runs
    step = cpu_tile_step(tile_logits_grad, hidden.dtype)
    # eager: two reused fp32 scratch tiles (fresh 8 MiB temporaries per tile cost page faults), and the
    # logits' own buffer for the gradient in the GEMMs' dtype
    work = None
    if not cpu_compile(hidden.dtype):
        work = (*(hidden.new_empty((rows, cols), dtype=dtype) for _ in range(2)), z_buf)
    for c0 in range(0, V, cols):
        c1 = min(c0 + cols, V)
        w, W = c1 - c0, weight[c0:c1]
        if w_acc is not None:
            w_acc.zero_()
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            n, h = r1 - r0, hidden[r0:r1]
            z = _linear(h, W, None if bias is None else bias[c0:c1], z_buf[:n, :w])  # recompute the tile's logits
            rows_of = [None if x is None else x[r0:r1] for x in (valid, mask, lse, ent, g_logp, g_ent, g_lse)]
            ok, mask_r, lse_r, ent_r, gl, ge, gs = rows_of
            local = tile_local_targets(targets[r0:r1], c0, ok)
            g = step(z, local, mask_r, lse_r, ent_r, gl, ge, transform, gs, hidden.dtype, work)
            if grad_b is not None:
                grad_b[c0:c1] += g.sum(0, dtype=grad_b.dtype)
            if h_acc is not None:
                if low:
                    h_acc[r0:r1] += torch.mm(g, W)
                else:
                    h_acc[r0:r1].addmm_(g, W)
            if need_weight:
                if w_acc is None:
                    torch.mm(g.t(), h, out=grad_w[c0:c1])
                elif low:
                    w_acc[:w] += torch.mm(g.t(), h)
                else:
                    w_acc[:w].addmm_(g.t(), h)
        if w_acc is not None:
            grad_w[c0:c1] = w_acc[:w]
    if h_acc is not None and low:
        grad_h.copy_(h_acc)
    return grad_h, grad_w


# The CPU's default chunk (bf16 GEMMs or fp32; not the fp32-operand path) holds at most this many
# logits (8 MiB per fp32 buffer), at least 16 rows:
# 64 rows at V = 32000. Smaller buffers stay in cache: at N = 2048, H = 512, V = 32000 (bf16) this
# took 0.72 s for 30 MB above the inputs and gradients, against 0.87 s and 57 MB with 128-row chunks.
CPU_CHUNK_ELEMENTS = 1 << 21


def _resolve_chunk(chunk: int, N: int, H: int, V: int, cpu: bool = False) -> int:
    if chunk > 0:
        return min(chunk, max(N, 1))
    rows = default_chunk_rows(N, H, V)
    return max(1, min(rows, max(16, CPU_CHUNK_ELEMENTS // max(V, 1)), N)) if cpu else rows


@torch.library.custom_op("rcpo_losses::fused_linear_token_stats", mutates_args=())
def fused_linear_token_stats_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    chunk: int,
    use_triton: bool,
    entropy: bool,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)``, each ``[N]``, of the logits ``hidden @ weight.T + bias`` (``chunk=0``: auto).

    The statistics are of the transformed logits (see :class:`rcpo_losses.tokens.stats.LogitTransform`;
    ``softcap=0``: none).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    logp = hidden.new_zeros(N, dtype=dtype)
    ent = hidden.new_zeros(N, dtype=dtype)
    lse = hidden.new_zeros(N, dtype=dtype)
    if N == 0:
        return logp, ent, lse
    mm_weight, mm_bias, cast = _matmul_operands(weight, bias, use_triton)
    if cpu_vocab_tiles(hidden, use_triton, cast) and cpu_compile(hidden.dtype):
        transform = transform_from_args(softcap, logit_scale, temperature)
        logp, ent_all, lse = _forward_vocab_tiles(hidden, weight, bias, targets, ignore_index, transform, dtype)
        return logp, ent_all if entropy else ent, lse
    chunk = _resolve_chunk(chunk, N, H, V, cpu=not use_triton and not cast and hidden.device.type == "cpu")
    buf = hidden.new_empty((min(chunk, N), V), dtype=mm_weight.dtype)  # the one chunk of logits, reused
    chunks = _chunk_logits(hidden, mm_weight, mm_bias, buf, chunk, cast)
    if use_triton:
        for a, b, _, z in chunks:
            logp[a:b], ent_c, lse[a:b] = token_stats(
                z, targets[a:b], ignore_index, 0, softcap, logit_scale, temperature
            )
            if entropy:
                ent[a:b] = ent_c
        return logp, ent, lse
    transform = transform_from_args(softcap, logit_scale, temperature)
    work = Workspace(buf, chunk, dtype, transform, writable=True)
    for a, b, _, _ in chunks:
        z, log_p, p = work.rows(buf, 0, b - a)
        logp[a:b], ent[a:b], lse[a:b] = chunk_stats(z, log_p, p, targets[a:b], ignore_index, entropy)
    return logp, ent, lse


@fused_linear_token_stats_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, chunk, use_triton, entropy, *transform):
    return row_stats_like(hidden)


@torch.library.custom_op("rcpo_losses::fused_linear_token_stats_backward", mutates_args=())
def fused_linear_token_stats_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    ent: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    ignore_index: int,
    chunk: int,
    use_triton: bool,
    entropy: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    grad_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` of ``sum(grad_logp * logp + grad_entropy * entropy + grad_lse * lse)``.

    A gradient that is not needed (or ``bias`` is None) comes back as an empty ``[0]`` tensor.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = lse.dtype
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # contiguous whatever hidden's strides, as the fake says (empty_like would keep a transposed layout)
    grad_h = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    cast = not use_triton and fp32_matmul_operands(weight)
    tiles = N > 0 and (need_hidden or need_weight or need_bias) and cpu_vocab_tiles(hidden, use_triton, cast)
    grad_w = torch.zeros((V, H), dtype=acc_dtype, device=weight.device) if need_weight and not tiles else None
    need_bias = need_bias and bias is not None
    grad_b = torch.zeros(V, dtype=acc_dtype, device=weight.device) if need_bias else None
    if N and (need_hidden or need_weight or need_bias):
        valid = targets != ignore_index
        zero = torch.zeros((), dtype=dtype, device=lse.device)
        g_logp = torch.where(valid, grad_logp.to(dtype), zero)
        g_ent = torch.where(valid, grad_entropy.to(dtype), zero) if entropy else None
        g_lse = None if grad_lse is None else torch.where(valid, grad_lse.to(dtype), zero)
        chunk = _resolve_chunk(chunk, N, H, V, cpu=not use_triton and not cast and hidden.device.type == "cpu")
        if tiles:
            transform = transform_from_args(softcap, logit_scale, temperature)
            grad_h, grad_w_low = _backward_vocab_tiles(
                hidden,
                weight,
                bias,
                targets,
                lse,
                ent,
                g_logp,
                g_ent,
                g_lse,
                ignore_index,
                transform,
                grad_h if need_hidden else None,
                need_weight,
                grad_b,
            )
            grad_h = hidden.new_empty(0) if grad_h is None else grad_h
            grad_w = weight.new_empty(0) if grad_w_low is None else grad_w_low
            grad_b = hidden.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
            return grad_h, grad_w, grad_b
        mm_weight, mm_bias, cast = _matmul_operands(weight, bias, use_triton)
        buf = hidden.new_empty((min(chunk, N), V), dtype=mm_weight.dtype)
        if use_triton:
            g_ent_k = torch.zeros_like(g_logp) if g_ent is None else g_ent
        else:
            transform = transform_from_args(softcap, logit_scale, temperature)
            work = Workspace(buf, chunk, dtype, transform, writable=True)
        for a, b, h, z in _chunk_logits(hidden, mm_weight, mm_bias, buf, chunk, cast):  # the logits, recomputed
            g_acc = None
            if use_triton:
                g = token_stats_backward(
                    z,
                    targets[a:b],
                    lse[a:b],
                    ent[a:b],
                    g_logp[a:b],
                    g_ent_k[a:b],
                    ignore_index,
                    0,
                    softcap,
                    logit_scale,
                    temperature,
                    None if g_lse is None else g_lse[a:b],
                )
            else:
                zc, log_p, p = work.rows(buf, 0, b - a)
                g = chunk_logits_grad(
                    zc,
                    log_p,
                    p,
                    targets[a:b],
                    ignore_index,
                    lse[a:b],
                    ent[a:b],
                    g_logp[a:b],
                    None if g_ent is None else g_ent[a:b],
                    transform,
                    None if g_lse is None else g_lse[a:b],
                )
                if g.dtype != z.dtype:
                    g_acc, g = g, z.copy_(g)  # bf16/fp16: the logits buffer becomes the logits gradient
            if need_hidden:
                if cast:
                    grad_h[a:b] = torch.mm(g, mm_weight)  # one fp32 [c, H] temporary
                else:
                    torch.mm(g, weight, out=grad_h[a:b])
            if need_weight:
                _accumulate_grad_weight(grad_w, g, h, g_acc)
            if need_bias:
                grad_b.add_(g.sum(0, dtype=acc_dtype))
    grad_w = weight.new_empty(0) if grad_w is None else grad_w.to(weight.dtype)
    grad_b = hidden.new_empty(0) if grad_b is None else grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


@fused_linear_token_stats_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    lse,
    ent,
    grad_logp,
    grad_entropy,
    ignore_index,
    chunk,
    use_triton,
    entropy,
    need_hidden,
    need_weight,
    need_bias,
    *transform,
):
    grad_h = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(0)
    return grad_h, grad_w, grad_b


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, chunk, use_triton, entropy, *transform = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.args = (ignore_index, chunk, use_triton, entropy)
    ctx.transform = tuple(transform) + (0.0, 1.0, 1.0)[len(transform) :]  # defaults, if left out


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    saved = ctx.saved_tensors  # (hidden, weight, bias, targets, lse, ent): the backward op's first arguments
    _, _, bias, _, lse, _ = saved
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    g_logp, g_ent, g_lse = upstream_grads(lse, grad_logp, grad_entropy, grad_lse)
    grad_h, grad_w, grad_b = fused_linear_token_stats_backward_op(
        *saved, g_logp, g_ent, *ctx.args, need_hidden, need_weight, need_bias, *ctx.transform, g_lse
    )
    # None for targets, ignore_index, chunk, use_triton, entropy and the three transform floats
    return grad_h if need_hidden else None, grad_w if need_weight else None, grad_b if need_bias else None, *[None] * 8


fused_linear_token_stats_op.register_autograd(_backward, setup_context=_setup_context)
fused_linear_token_stats_backward_op.register_autograd(no_double_backward("fused_linear_token_stats"))


def fused_linear_stats_any(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    chunk: int,
    entropy: bool,
    transform: LogitTransform | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[N]`` of ``[N, H]`` hidden states through the head, on the backend that
    ``backend`` picks (:func:`rcpo_losses.ops.backend.use_triton`)."""
    args = () if transform is None else transform.args()
    return fused_linear_token_stats_op(
        hidden, weight, bias, targets, ignore_index, chunk, use_triton(backend, hidden), entropy, *args
    )
