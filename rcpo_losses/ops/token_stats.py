"""The per-token log-prob/entropy op: the Triton kernel ``rcpo_losses.kernels.token_stats`` or its PyTorch twin.

:func:`token_stats_any` is what :func:`rcpo_losses.token_logps_and_entropy` calls: the
kernel where :func:`rcpo_losses.ops.backend.use_triton` says so, otherwise the chunked
PyTorch path :class:`rcpo_losses.reference.token_stats.TokenStats`.

``rcpo_losses::token_stats`` (forward) returns ``(logp, entropy, lse)`` per row;
``rcpo_losses::token_stats_backward`` returns the logits gradient. Both carry fake
(meta) implementations, and the forward an autograd formula, so ``torch.compile``
(``fullgraph=True``) traces through them. Triton is imported only when a kernel runs,
so importing this module does not need Triton.

``triton_op`` would let Inductor see inside the kernel, but it does not run under the
Triton interpreter; ``custom_op`` keeps the kernel opaque and works on CPU tensors
under ``TRITON_INTERPRET=1`` as well as on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import no_double_backward
from ..reference.token_stats import LogitTransform, TokenStats, compute_dtype
from .backend import use_triton


@torch.library.custom_op("rcpo_losses::token_stats", mutates_args=())
def token_stats(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int,
    block_v: int,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)``, each ``[N]``, of ``[N, V]`` logits and ``[N]`` targets (``block_v=0``: auto).

    The statistics are those of ``softcap * tanh(logit_scale * logits / softcap) / temperature``
    (``softcap=0``: ``logit_scale * logits / temperature``), transformed inside the kernel.
    """
    from ..kernels.token_stats import token_stats_forward

    return token_stats_forward(logits, targets, ignore_index, block_v, softcap, logit_scale, temperature)


def row_stats_like(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Three empty ``[N]`` tensors in the compute dtype of ``[N, *]`` ``x``: the fake ``(logp, entropy, lse)``."""
    return tuple(x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype)) for _ in range(3))


@token_stats.register_fake
def _(
    logits: Tensor, targets: Tensor, ignore_index: int, block_v: int, softcap=0.0, logit_scale=1.0, temperature=1.0
) -> tuple[Tensor, Tensor, Tensor]:
    return row_stats_like(logits)


@torch.library.custom_op("rcpo_losses::token_stats_backward", mutates_args=())
def token_stats_backward(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    ignore_index: int,
    block_v: int,
    softcap: float = 0.0,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    grad_lse: Tensor | None = None,
) -> Tensor:
    """Gradient ``[N, V]`` (logits' dtype, raw logits) of ``sum(grad_logp * logp + grad_entropy * entropy)``."""
    from ..kernels.token_stats import token_stats_backward as launch

    return launch(
        logits,
        targets,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        block_v,
        softcap,
        logit_scale,
        temperature,
        grad_lse,
    )


@token_stats_backward.register_fake
def _(logits, targets, lse, entropy, grad_logp, grad_entropy, ignore_index, block_v, *transform_and_grad_lse):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, ignore_index, block_v, *transform = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.ignore_index = ignore_index
    ctx.block_v = block_v
    ctx.transform = tuple(transform) + (0.0, 1.0, 1.0)[len(transform) :]  # defaults, if left out


def upstream_grads(
    lse: Tensor, grad_logp: Tensor | None, grad_entropy: Tensor | None, grad_lse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The upstream gradients of ``(logp, entropy, lse)``, contiguous in ``lse``'s dtype; None: zeros (lse: None)."""
    zeros = torch.zeros_like(lse)
    # Unused outputs may come back as None; expanded upstream gradients (from .sum()) have stride 0.
    g_logp = zeros if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    g_ent = zeros if grad_entropy is None else grad_entropy.to(lse.dtype).contiguous()
    # lse is differentiable too (dlse/dz = p): the vocabulary-parallel path combines it across ranks.
    g_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    return g_logp, g_ent, g_lse


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    g_logp, g_ent, g_lse = upstream_grads(lse, grad_logp, grad_entropy, grad_lse)
    grad = token_stats_backward(
        logits, targets, lse, entropy, g_logp, g_ent, ctx.ignore_index, ctx.block_v, *ctx.transform, g_lse
    )
    return grad, None, None, None, None, None, None


token_stats.register_autograd(_backward, setup_context=_setup_context)
token_stats_backward.register_autograd(no_double_backward("token_logps_and_entropy"))


def token_logps_and_entropy_triton(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, block_v: int = 0, transform=None
) -> tuple[Tensor, Tensor]:
    """Triton path of :func:`rcpo_losses.token_logps_and_entropy` for ``[N, V]`` logits and ``[N]`` targets.

    ``transform``: a :class:`rcpo_losses.reference.token_stats.LogitTransform` or None.
    """
    args = () if transform is None else transform.args()
    logp, ent, _ = token_stats(logits, targets, ignore_index, block_v, *args)
    return logp, ent


def token_stats_any(
    logits: Tensor, targets: Tensor, ignore_index: int, chunk: int, transform: LogitTransform | None, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)``, each ``[N]`` and differentiable, of ``[N, V]`` logits and ``[N]`` int64 targets.

    The Triton op where ``use_triton(backend, logits)``; otherwise the chunked PyTorch path,
    ``chunk`` rows at a time (the kernel streams whole rows and ignores ``chunk``).
    """
    if use_triton(backend, logits):
        args = () if transform is None else transform.args()
        return token_stats(logits, targets.contiguous(), ignore_index, 0, *args)
    return TokenStats.apply(logits, targets, ignore_index, chunk, transform)
