"""Per-token log-probs and entropies straight from hidden states and the LM head, never holding the logits.

With ranked feedback every prompt brings ``|S|`` responses, so the LM head's output is the
largest tensor of a training step: 8 prompts x 5 responses x 2048 tokens at
``V = 128256`` is 21 GB of bf16 logits, and its gradient as much again.
:func:`fused_linear_token_stats` computes what the losses need from the logits (the
target log-prob and the entropy of every position) chunk by chunk over the tokens:

- forward, per chunk of ``c`` rows: ``z = h @ W.T + b`` (one ``[c, V]`` buffer, reused),
  then the one-pass log-prob/entropy statistics of the chunk (the Triton ``token_stats``
  op on CUDA, the chunked PyTorch path's :func:`rcpo_losses.tokens._chunk_stats`
  elsewhere). Only ``lse`` and the entropy per row, ``O(N)``, are kept;
- backward, per chunk: recompute ``z``, turn it into the logits gradient ``g`` (the
  ``token_stats_backward`` op, or :func:`rcpo_losses.tokens._chunk_logits_grad` in place),
  then ``grad_h[chunk] = g @ W``, ``grad_W += g.T @ h``, ``grad_b += g.sum(0)``, the last
  two accumulated in fp32 (fp64 for fp64) and cast to the parameters' dtype at the end.
  On the CPU (unless it takes the fp32-operand path below) the backward walks vocabulary
  tiles instead (``CPU_VOCAB_TILES``): ``grad_W[tile] = g.T @ h`` is one GEMM over the tokens
  and ``grad_h`` is accumulated in an ``[N, H]`` buffer, so there is no ``[V, H]`` fp32 one.

The model's logit transform (``softcap``, ``logit_scale``, ``temperature``) is applied to
each chunk in place, and its derivative in the backward. On a CPU whose bf16/fp16 GEMM is a
slow fallback (probed once, see ``CPU_FP32_MATMUL``) the chunk matmuls run on fp32 operands.
With ``process_group`` each rank holds a vocabulary slice of the head
(:mod:`rcpo_losses.vocab_parallel`).

So at most one chunk of logits (and, on CUDA, its gradient) is alive at a time. The
price is one extra matmul: the forward logits are recomputed in the backward (4 matmuls
of ``N H V`` instead of 3). Both passes are one ``torch.library.custom_op`` each
(``rcpo_losses::fused_linear_token_stats`` and ``..._backward``), with fake tensors and
an autograd formula, so ``torch.compile(fullgraph=True)`` keeps them as single opaque
nodes.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from . import _backend
from ._checks import check_positive_int, no_double_backward
from .tokens import (
    LogitTransform,
    ResponseTokenStats,
    _check_target_ids,
    _chunk_logits_grad,
    _chunk_stats,
    _completion_targets,
    _compute_dtype,
    _response_sums,
    _tile_logits_grad,
    _Workspace,
    transform_from_args,
)

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


# CPUs without a bf16/fp16 matrix unit (AVX2-only x86) run some bf16 products on a slow
# fallback: ``[128, 32000] @ [32000, 512]`` took 6.5 s there against 0.04 s in fp32. On such a
# CPU the PyTorch path does its chunk matmuls on fp32 operands (one fp32 copy of the weight and
# bias per pass, the size of the fp32 gradient accumulator; the hidden states converted one
# chunk at a time), which also makes the chunk's logits fp32 directly. None: probe (once per
# dtype and process); True/False: force it on or off.
CPU_FP32_MATMUL: bool | None = None


@functools.cache
def _slow_cpu_matmul(dtype: torch.dtype) -> bool:
    """Probe: is ``[128, 2048] @ [2048, 256]`` in ``dtype`` more than 4x slower than in fp32 on this CPU?

    The fallback's slowdown is 40x to 300x, so the margin absorbs the noise of a busy machine.
    Constant inputs: the probe does not touch the random number generator.
    """

    def best(a: Tensor, b: Tensor) -> float:
        torch.mm(a, b)  # warm-up (oneDNN builds its kernel on the first call)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.full((128, 2048), 0.5), torch.full((2048, 256), 0.25)
    return best(a.to(dtype), b.to(dtype)) > 4 * best(a, b)


def fp32_matmul_operands(x: Tensor) -> bool:
    """Whether the PyTorch chunk path should do the matmuls of ``x``'s dtype on fp32 operands (see above)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return _slow_cpu_matmul(x.dtype) if CPU_FP32_MATMUL is None else CPU_FP32_MATMUL


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
# grad_W GEMM per chunk. None: on for every CPU tensor that does not take the fp32-operand path;
# True/False: force it.
CPU_VOCAB_TILES: bool | None = None
TILE_ROWS = 4096
TILE_ELEMENTS = 1 << 21


def _vocab_tiles(x: Tensor, use_triton: bool, cast: bool) -> bool:
    if use_triton or cast or x.device.type != "cpu":
        return CPU_VOCAB_TILES is True and not use_triton and not cast
    return CPU_VOCAB_TILES is not False


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
    """The backward over vocabulary tiles (see ``CPU_VOCAB_TILES``): fills ``grad_h`` and ``grad_b``; returns
    ``(grad_h, grad_W)`` in the parameters' dtype."""
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = lse.dtype
    rows = min(N, TILE_ROWS)
    cols = max(1, min(V, TILE_ELEMENTS // rows))
    low = weight.dtype != dtype  # bf16/fp16: the GEMMs run in that dtype, the tile math in fp32
    z_low = hidden.new_empty((rows, cols)) if low else None
    log_p_buf, p_buf = (hidden.new_empty((rows, cols), dtype=dtype) for _ in range(2))
    # fp32/fp64: the GEMM writes the logits here; bf16/fp16: only a transform needs a compute-dtype copy
    z_buf = hidden.new_empty((rows, cols), dtype=dtype) if not low or transform is not None else None
    h_acc = None if grad_h is None else (torch.zeros((N, H), dtype=dtype) if low else grad_h.zero_())
    grad_w = weight.new_empty((V, H)) if need_weight else None
    w_acc = torch.empty((cols, H), dtype=dtype) if need_weight and rows < N else None
    for c0 in range(0, V, cols):
        c1 = min(c0 + cols, V)
        w, W = c1 - c0, weight[c0:c1]
        if w_acc is not None:
            w_acc.zero_()
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            n, h = r1 - r0, hidden[r0:r1]
            out = z_low[:n, :w] if low else z_buf[:n, :w]
            _linear(h, W, None if bias is None else bias[c0:c1], out)  # recompute the tile's logits
            z = out
            if transform is not None:
                z = z_buf[:n, :w].copy_(out) if low else out
                transform.apply_(z)
            g = _tile_logits_grad(
                z,
                log_p_buf[:n, :w],
                p_buf[:n, :w],
                c0,
                targets[r0:r1],
                ignore_index,
                lse[r0:r1],
                ent[r0:r1],
                g_logp[r0:r1],
                None if g_ent is None else g_ent[r0:r1],
                transform,
                None if g_lse is None else g_lse[r0:r1],
            )
            if grad_b is not None:
                grad_b[c0:c1] += g.sum(0, dtype=grad_b.dtype)
            if low:
                g = out.copy_(g)  # the tile's logits buffer becomes its gradient, for bf16 GEMMs
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

    The statistics are of the transformed logits (see :class:`rcpo_losses.tokens.LogitTransform`;
    ``softcap=0``: none).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    logp = hidden.new_zeros(N, dtype=dtype)
    ent = hidden.new_zeros(N, dtype=dtype)
    lse = hidden.new_zeros(N, dtype=dtype)
    if N == 0:
        return logp, ent, lse
    mm_weight, mm_bias, cast = _matmul_operands(weight, bias, use_triton)
    chunk = _resolve_chunk(chunk, N, H, V, cpu=not use_triton and not cast and hidden.device.type == "cpu")
    buf = hidden.new_empty((min(chunk, N), V), dtype=mm_weight.dtype)  # the one chunk of logits, reused
    if use_triton:
        from .token_ops import token_stats

        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            z = _linear(hidden[a:b], weight, bias, buf[: b - a])
            logp[a:b], ent_c, lse[a:b] = token_stats(
                z, targets[a:b], ignore_index, 0, softcap, logit_scale, temperature
            )
            if entropy:
                ent[a:b] = ent_c
        return logp, ent, lse
    transform = transform_from_args(softcap, logit_scale, temperature)
    work = _Workspace(buf, chunk, dtype, transform, writable=True)
    for a in range(0, N, chunk):
        b = min(a + chunk, N)
        h = hidden[a:b].float() if cast else hidden[a:b]
        _linear(h, mm_weight, mm_bias, buf[: b - a])
        z, log_p, p = work.rows(buf, 0, b - a)
        logp[a:b], ent[a:b], lse[a:b] = _chunk_stats(z, log_p, p, targets[a:b], ignore_index, entropy)
    return logp, ent, lse


@fused_linear_token_stats_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, chunk, use_triton, entropy, *transform):
    N = hidden.shape[0]
    dtype = _compute_dtype(hidden.dtype)
    return tuple(hidden.new_empty((N,), dtype=dtype) for _ in range(3))


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
    tiles = N > 0 and (need_hidden or need_weight or need_bias) and _vocab_tiles(hidden, use_triton, cast)
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
            from .token_ops import token_stats_backward

            g_ent_k = torch.zeros_like(g_logp) if g_ent is None else g_ent
        else:
            transform = transform_from_args(softcap, logit_scale, temperature)
            work = _Workspace(buf, chunk, dtype, transform, writable=True)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            h = hidden[a:b].float() if cast else hidden[a:b]
            z = _linear(h, mm_weight, mm_bias, buf[: b - a])  # recompute the chunk's logits
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
                g = _chunk_logits_grad(
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
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    zeros = torch.zeros_like(lse)
    # Unused outputs may come back as None; expanded upstream gradients (from .sum()) have stride 0.
    g_logp = zeros if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    g_ent = zeros if grad_entropy is None else grad_entropy.to(lse.dtype).contiguous()
    # lse is differentiable too (dlse/dz = p): the vocabulary-parallel path combines it across ranks.
    g_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    grad_h, grad_w, grad_b = fused_linear_token_stats_backward_op(
        hidden,
        weight,
        bias,
        targets,
        lse,
        ent,
        g_logp,
        g_ent,
        *ctx.args,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
        *ctx.transform,
        g_lse,
    )
    return (
        grad_h if need_hidden else None,
        grad_w if need_weight else None,
        grad_b if need_bias and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


fused_linear_token_stats_op.register_autograd(_backward, setup_context=_setup_context)
fused_linear_token_stats_backward_op.register_autograd(no_double_backward("fused_linear_token_stats"))


def _check_fused_inputs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, validate: bool
) -> None:
    """Shapes, dtypes and devices; with ``validate``, the target ids against ``weight``'s vocabulary."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if hasattr(weight, "full_tensor"):
        raise TypeError(
            "weight: a DTensor (FSDP2 between forwards, or a tensor-parallel layout). Under FSDP2 take it with "
            "lm_head_spec(model) after final_hidden_states(model, ...); for a vocabulary-parallel head pass this "
            "rank's local slice (weight.to_local()) with process_group="
        )
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected (*, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight: expected the LM head's (V, H) with V >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} is not (V, H) for hidden states of size H = {hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one to the other")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias: {bias.dtype} on {bias.device}, weight {weight.dtype} on {weight.device}")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} must be hidden's shape without the last dim, "
            f"hidden is {tuple(hidden.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets: on {targets.device}, hidden on {hidden.device}")
    _check_target_ids(targets, weight.shape[0], ignore_index, validate)


def fused_linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    entropy: bool = True,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-token target log-prob and entropy of ``hidden @ weight.T + bias``, without holding the logits.

    .. math::
        z = h W^\top + b, \qquad \log p_t = z'_t - \log \sum_v e^{z'_v}, \qquad
        H = -\sum_v p_v \log p_v, \quad p = \operatorname{softmax}(z')

    where :math:`z' = c \tanh(a z / c) / T` is the model's output transform (``softcap``
    ``c``, ``logit_scale`` ``a``, ``temperature`` ``T``; :math:`z' = a z / T` without a
    cap), applied to each chunk of logits inside the pass; :func:`rcpo_losses.lm_head_spec`
    reads ``weight``, ``bias``, ``softcap`` and ``logit_scale`` from a Hugging Face model.

    Equal to ``token_logps_and_entropy(hidden @ weight.T + bias, targets)``, with gradients
    to ``hidden``, ``weight`` and ``bias`` through both outputs, but the ``[N, V]`` logits
    are never materialized: the tokens are processed ``chunk_size`` rows at a time, forward
    and backward (the backward recomputes each chunk's logits: 4 matmuls of ``N H V``
    instead of 3). Extra memory is one chunk of logits plus the chunk math's buffers
    (PyTorch path: two or three fp32 ``chunk x V`` buffers; CUDA: the chunk's logits
    gradient) and, for a bf16/fp16 ``weight``, its fp32 gradient accumulator ``[V, H]``
    (on the CPU instead an fp32 ``[N, H]`` one for ``grad_hidden``, see the module docstring).
    Under ``torch.no_grad()`` (or when nothing requires grad) nothing is saved for a
    backward: use it for the reference model too.

    Per chunk, on CUDA (``backend="auto"`` or ``"triton"``) the logits go through the
    Triton ``rcpo_losses::token_stats`` ops; otherwise through the chunked PyTorch path of
    :func:`token_logps_and_entropy`. ``grad_weight`` and ``grad_bias`` are summed over the
    chunks in fp32 (fp64 for fp64) and cast to the parameters' dtype at the end.

    Args:
        hidden: ``(*, H)`` final hidden states (after the last norm), fp32, bf16, fp16 or fp64.
        weight: ``(V, H)`` the LM head's weight (``model.lm_head.weight``), same dtype and device.
        targets: ``(*)`` integer token ids aligned with ``hidden`` (``hidden[..., t, :]``
            predicts ``targets[..., t]``); ``ignore_index`` positions get 0 outputs and gradient.
        bias: optional ``(V,)`` LM head bias.
        chunk_size: tokens per chunk. Default: ``next_pow2(ceil(N / ceil(V / H)))`` (a chunk
            of logits about the size of ``hidden``), at most ``2^27 / V`` rows. Larger chunks
            make bigger matmuls and fewer passes over the ``[V, H]`` accumulator; smaller
            ones use less memory.
        entropy: ``False`` returns zeros for the entropy (and ignores its gradient); the
            PyTorch path then skips the entropy work (a softmax product per chunk in the
            forward, the ``log p + H`` term in the backward). The Triton kernel computes it
            in the same pass anyway.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        validate: check the target ids (a device-to-host sync; skipped under ``torch.compile``).
        softcap, logit_scale, temperature: the logit transform, as in
            :func:`rcpo_losses.token_logps_and_entropy` (Gemma-2: ``softcap=30``).
        process_group: vocabulary-parallel LM head: each rank passes its contiguous slice
            ``(V_r, H)`` of ``weight`` (and ``(V_r,)`` of ``bias``), in rank order, the same
            ``hidden`` and the same global ``targets``; every rank gets the exact
            full-vocabulary outputs, from all-reduces of ``[N]``-sized vectors, and in the
            backward its slice's weight gradient and the full ``hidden`` gradient (one
            all-reduce of ``[N, H]``). Every rank must back-propagate the same loss. See
            :mod:`rcpo_losses.vocab_parallel`.

    Returns:
        ``(logp, entropy)``, each ``(*)`` fp32 (fp64 for fp64 inputs).

    Shape:
        - hidden: ``(*, H)``; weight: ``(V, H)``; bias: ``(V,)``; targets and outputs: ``(*)``.

    Example::

        h = model.model(input_ids).last_hidden_state  # (B, T, H), no logits
        logp, ent = fused_linear_token_stats(h[:, :-1], model.lm_head.weight, input_ids[:, 1:])
    """
    _check_fused_inputs(hidden, weight, bias, targets, ignore_index, validate and process_group is None)
    check_positive_int("chunk_size", chunk_size, "rows")
    transform = LogitTransform.make(softcap, logit_scale, temperature)
    use_triton = _backend.use_triton(backend, hidden)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long().contiguous()
    args = () if transform is None else transform.args()
    if process_group is not None:
        from . import vocab_parallel as vp

        V = weight.shape[0]
        offset, total = vp.vocab_offset(V, process_group, weight.device)
        _check_target_ids(t, total, ignore_index, validate)
        local, owned = vp.local_targets(t, offset, V, ignore_index)
        h = vp.copy_to_ranks(h, process_group)
        stats = fused_linear_token_stats_op(
            h, weight, bias, local, ignore_index, chunk_size or 0, use_triton, entropy, *args
        )
        logp, ent = vp.combine(*stats, owned, t != ignore_index, process_group)
        if not entropy:
            ent = torch.zeros_like(ent)
        return logp.reshape(shape), ent.reshape(shape)
    logp, ent, _ = fused_linear_token_stats_op(
        h, weight, bias, t, ignore_index, chunk_size or 0, use_triton, entropy, *args
    )
    return logp.reshape(shape), ent.reshape(shape)


def fused_linear_response_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    shift_labels: bool = False,
    num_responses: int | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    entropy: bool = True,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> ResponseTokenStats:
    r"""Sequence log-probs, entropy sums and lengths of responses, from final hidden states and the LM head.

    :func:`response_token_stats` on the logits ``hidden @ weight.T + bias``, computed with
    :func:`fused_linear_token_stats`, so the ``[*, T, V]`` logits are never held. Same
    label shifting and masking, same outputs: ``logps`` (the ``policy_logps`` /
    ``ref_logps`` of eq. 2), ``entropy_sums`` and ``lengths`` (for
    :func:`entropy_dispersion`, appendix D). Gradients flow to ``hidden``, ``weight`` and
    ``bias`` through ``logps`` and ``entropy_sums``; for the reference model call it under
    ``torch.no_grad()``, which keeps nothing for a backward.

    Args:
        hidden: ``(*, T, H)``, e.g. ``(B * S, T, H)`` from ``model.model(ids).last_hidden_state``.
        weight: ``(V, H)`` (``model.lm_head.weight``); bias: optional ``(V,)``.
        labels, mask, shift_labels, num_responses, ignore_index: as in :func:`response_token_stats`.
        chunk_size, entropy, backend, validate: as in :func:`fused_linear_token_stats`.
        softcap, logit_scale, temperature, process_group: as in :func:`fused_linear_token_stats`.

    Shape:
        - hidden: ``(*, T, H)``; labels, mask: ``(*, T)``.
        - outputs: ``(*)``, or ``(B, S)`` with ``num_responses=S``.

    Example::

        with torch.no_grad():
            h = ref_model.model(ids).last_hidden_state
            ref = fused_linear_response_stats(h, ref_model.lm_head.weight, ids, completion_mask,
                                              shift_labels=True, num_responses=S)
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected (*, T, H), got shape {tuple(hidden.shape)}")
    check_positive_int("num_responses", num_responses, "responses per prompt")
    targets, valid = _completion_targets(labels, mask, ignore_index, shift_labels)
    logp, ent = fused_linear_token_stats(
        hidden,
        weight,
        targets,
        bias,
        ignore_index,
        chunk_size=chunk_size,
        entropy=entropy,
        backend=backend,
        validate=validate,
        softcap=softcap,
        logit_scale=logit_scale,
        temperature=temperature,
        process_group=process_group,
    )
    return _response_sums(logp, ent, valid, num_responses, "hidden", hidden.shape)
