"""The choice-model ops: per-row MNL and Mallows-RMJ losses, on the Triton kernel or its PyTorch twin.

:func:`mnl_topk_rows_any` and :func:`mallows_rmj_topk_rows_any` are what the public losses
call. They take the kernel when :func:`rcpo_losses.ops.backend.use_choice_kernel` says so (CUDA,
or ``backend="triton"`` under the interpreter, and rows that fit the kernels' one block), and
otherwise the specification in :mod:`rcpo_losses.reference` (``mnl_topk_nll``,
``mallows_rmj_topk_sum``), with the same result.

``rcpo_losses::mnl_topk`` and ``rcpo_losses::mallows_rmj_topk`` (with their ``*_backward``
ops) wrap the kernels of ``rcpo_losses.kernels.mnl`` and ``rcpo_losses.kernels.mallows``.
Each op has a fake (meta) implementation and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it and autograd runs the fused backward
kernel; the second derivative goes through the PyTorch twin. The ops are plain
``custom_op``s rather than ``triton_op``s so that they also run on CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``). Triton is imported only when a kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.mallows import mallows_rmj_topk_sum
from ..reference.mnl import mnl_topk_nll
from ..rewards import compute_dtype
from .backend import use_choice_kernel

_KERNEL_RANK_DTYPES = (torch.int32, torch.int64)


def _check_shapes(rewards: Tensor, ranks: Tensor, w: Tensor | None = None) -> None:
    """What the kernels index by: ``[B, S]`` rewards and ranks (and ``[B]`` w) on one device."""
    if rewards.dim() != 2 or ranks.shape != rewards.shape:
        raise ValueError(f"rewards, ranks: expected [B, S] tensors, got {tuple(rewards.shape)}, {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise TypeError(f"ranks: expected an integer tensor, got {ranks.dtype}")
    if ranks.device != rewards.device:
        raise ValueError(f"ranks: on {ranks.device} but rewards is on {rewards.device}")
    if w is not None:
        if w.shape != rewards.shape[:1]:
            raise ValueError(f"w: expected shape ({rewards.shape[0]},), got {tuple(w.shape)}")
        if w.device != rewards.device:
            raise ValueError(f"w: on {w.device} but rewards is on {rewards.device}")


def _kernel_ranks(ranks: Tensor) -> Tensor:
    """int32/int64 ranks pass through; any other integer dtype is converted to int32 once."""
    return ranks if ranks.dtype in _KERNEL_RANK_DTYPES else ranks.to(torch.int32)


# --- MNL ------------------------------------------------------------------------------


@torch.library.custom_op("rcpo_losses::mnl_topk", mutates_args=())
def mnl_topk_op(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Per-row MNL top-k NLL ``[B]`` (``rcpo_losses.reference.mnl.mnl_topk_nll``), fused Triton kernel."""
    from ..kernels.mnl import mnl_topk_fwd

    return mnl_topk_fwd(rewards, ranks)


@mnl_topk_op.register_fake
def _(rewards: Tensor, ranks: Tensor) -> Tensor:
    return rewards.new_empty(rewards.shape[0])


@torch.library.custom_op("rcpo_losses::mnl_topk_backward", mutates_args=())
def mnl_topk_backward_op(grad: Tensor, rewards: Tensor, ranks: Tensor) -> Tensor:
    """Gradient ``[B, S]`` of ``sum_b grad[b] * mnl_topk(rewards, ranks)[b]`` w.r.t. rewards."""
    from ..kernels.mnl import mnl_topk_bwd

    return mnl_topk_bwd(grad, rewards, ranks)


@mnl_topk_backward_op.register_fake
def _(grad: Tensor, rewards: Tensor, ranks: Tensor) -> Tensor:
    return rewards.new_empty(rewards.shape)


def _mnl_setup_context(ctx, inputs, output) -> None:
    rewards, ranks = inputs
    ctx.save_for_backward(rewards, ranks)


def _mnl_backward(ctx, grad: Tensor):
    rewards, ranks = ctx.saved_tensors
    return mnl_topk_backward_op(grad, rewards, ranks), None


mnl_topk_op.register_autograd(_mnl_backward, setup_context=_mnl_setup_context)


# Double backward (create_graph=True): the backward op's own derivative, through the PyTorch
# reference (the specification of both kernels). torch.func.vjp composes with autograd, so
# higher orders work too. Only second-order use pays for it; the first-order path is the kernel.


def _mnl_reference_grad(grad: Tensor, rewards: Tensor, ranks: Tensor) -> Tensor:
    return torch.func.vjp(lambda r: mnl_topk_nll(r, ranks), rewards)[1](grad)[0]


def _mnl_backward_setup_context(ctx, inputs, output) -> None:
    grad, rewards, ranks = inputs
    ctx.save_for_backward(grad, rewards, ranks)


def _mnl_double_backward(ctx, gg: Tensor):
    grad, rewards, ranks = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda g, r: _mnl_reference_grad(g, r, ranks), grad, rewards)
    return (*vjp(gg), None)


mnl_topk_backward_op.register_autograd(_mnl_double_backward, setup_context=_mnl_backward_setup_context)


def mnl_topk_rows(rewards: Tensor, ranks: Tensor) -> Tensor:
    """Per-row MNL top-k loss ``[B]`` through the Triton kernel (``S <= MAX_BLOCK_S``).

    Shape:
        - rewards: ``(B, S)`` float (computed in fp32, fp64 for fp64); ranks: ``(B, S)`` int.
        - output: ``(B,)`` in the compute dtype.
    """
    _check_shapes(rewards, ranks)
    rewards = rewards.to(compute_dtype(rewards))
    return mnl_topk_op(rewards, _kernel_ranks(ranks))


def mnl_topk_rows_any(rewards: Tensor, ranks: Tensor, backend: str) -> Tensor:
    """Per-row MNL top-k loss ``[B]``: the Triton kernel where ``use_choice_kernel`` says so, else ``mnl_topk_nll``."""
    if use_choice_kernel(backend, rewards):
        return mnl_topk_rows(rewards, ranks)
    return mnl_topk_nll(rewards, ranks)


# --- Mallows-RMJ ------------------------------------------------------------------------


@torch.library.custom_op("rcpo_losses::mallows_rmj_topk", mutates_args=())
def mallows_rmj_topk_op(rewards: Tensor, ranks: Tensor, w: Tensor) -> Tensor:
    """Per-row ``w * mallows_rmj_topk_sum(rewards, ranks)`` ``[B]``, fused Triton kernel."""
    from ..kernels.mallows import mallows_rmj_topk_fwd

    return mallows_rmj_topk_fwd(rewards, ranks, w)


@mallows_rmj_topk_op.register_fake
def _(rewards: Tensor, ranks: Tensor, w: Tensor) -> Tensor:
    return rewards.new_empty(rewards.shape[0])


@torch.library.custom_op("rcpo_losses::mallows_rmj_topk_backward", mutates_args=())
def mallows_rmj_topk_backward_op(grad: Tensor, rewards: Tensor, ranks: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients ``([B, S], [B])`` w.r.t. rewards and ``w`` of ``sum_b grad[b] * loss[b]``."""
    from ..kernels.mallows import mallows_rmj_topk_bwd

    return mallows_rmj_topk_bwd(grad, rewards, ranks, w)


@mallows_rmj_topk_backward_op.register_fake
def _(grad: Tensor, rewards: Tensor, ranks: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape[0])


def _mallows_setup_context(ctx, inputs, output) -> None:
    rewards, ranks, w = inputs
    ctx.save_for_backward(rewards, ranks, w)


def _mallows_backward(ctx, grad: Tensor):
    rewards, ranks, w = ctx.saved_tensors
    grad_r, grad_w = mallows_rmj_topk_backward_op(grad, rewards, ranks, w)
    return grad_r, None, grad_w if ctx.needs_input_grad[2] else None


mallows_rmj_topk_op.register_autograd(_mallows_backward, setup_context=_mallows_setup_context)


def _mallows_reference_grads(grad: Tensor, rewards: Tensor, ranks: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    return torch.func.vjp(lambda r, v: v * mallows_rmj_topk_sum(r, ranks), rewards, w)[1](grad)


def _mallows_backward_setup_context(ctx, inputs, output) -> None:
    grad, rewards, ranks, w = inputs
    ctx.save_for_backward(grad, rewards, ranks, w)


def _mallows_double_backward(ctx, gg_r: Tensor | None, gg_w: Tensor | None):
    grad, rewards, ranks, w = ctx.saved_tensors
    gg_r = torch.zeros_like(rewards) if gg_r is None else gg_r
    gg_w = torch.zeros_like(w) if gg_w is None else gg_w
    _, vjp = torch.func.vjp(lambda g, r, v: _mallows_reference_grads(g, r, ranks, v), grad, rewards, w)
    d_grad, d_rewards, d_w = vjp((gg_r, gg_w))
    return d_grad, d_rewards, None, d_w


mallows_rmj_topk_backward_op.register_autograd(_mallows_double_backward, setup_context=_mallows_backward_setup_context)


def mallows_rmj_topk_rows(rewards: Tensor, ranks: Tensor, w: Tensor) -> Tensor:
    """Per-row Mallows-RMJ loss ``w * s`` ``[B]`` through the Triton kernel (``S <= MAX_BLOCK_S``).

    Shape:
        - rewards: ``(B, S)`` float; ranks: ``(B, S)`` int; w: ``(B,)`` (may be expanded).
        - output: ``(B,)`` in the compute dtype.
    """
    _check_shapes(rewards, ranks, w)
    rewards = rewards.to(compute_dtype(rewards))
    w = w.to(rewards.dtype)
    return mallows_rmj_topk_op(rewards, _kernel_ranks(ranks), w)


def mallows_rmj_topk_rows_any(rewards: Tensor, ranks: Tensor, w: Tensor, backend: str) -> Tensor:
    """Per-row Mallows-RMJ loss ``w * s`` ``[B]``: the Triton kernel where ``use_choice_kernel`` says so, else
    ``w * mallows_rmj_topk_sum``."""
    if use_choice_kernel(backend, rewards):
        return mallows_rmj_topk_rows(rewards, ranks, w)
    return w * mallows_rmj_topk_sum(rewards, ranks)
