"""Input checks shared by every public function: each error names the argument, the row and the problem.

Shape, dtype and device checks are free and always run. Checks that read values need a
device-to-host sync; they run when ``validate=True`` and never under ``torch.compile``.
The last helpers give the one error of the token statistics for double backward. The checks of
rank tensors, which read the rank conventions, are in :mod:`rcpo_losses.ranks`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def should_sync(validate: bool) -> bool:
    return validate and not torch.compiler.is_compiling()


def first_row(bad: Tensor) -> int:
    """The index of the first True of a bool ``[B]`` tensor (one sync)."""
    return int(bad.nonzero()[0, 0])


def check_score_tensor(name: str, x: Tensor, ranks: Tensor) -> None:
    """A float tensor of ``ranks``'s shape and device (free: no values are read)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.shape != ranks.shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match ranks {tuple(ranks.shape)}")
    if x.device != ranks.device:
        raise ValueError(f"{name}: on {x.device} but ranks is on {ranks.device}")


def check_pair(name: str, x: Tensor, like: Tensor | None = None) -> None:
    """A float ``[B]`` tensor; ``like`` is the chosen log-probs that it must match (pairwise API)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float tensor, got {x.dtype}")
    if like is None:
        if x.dim() != 1:
            raise ValueError(f"{name}: expected a [B] tensor, got shape {tuple(x.shape)}")
        return
    if x.shape != like.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)} (that of policy_chosen_logps), got {tuple(x.shape)}"
        )
    if x.device != like.device:
        raise ValueError(f"{name}: on {x.device} but policy_chosen_logps is on {like.device}")


def check_positive(name: str, value: float) -> None:
    if isinstance(value, (bool, Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")


def check_representable(name: str, value: float, dtype: torch.dtype) -> None:
    """A finite Python float that does not overflow ``dtype`` (the compute dtype)."""
    if abs(value) > torch.finfo(dtype).max:
        raise ValueError(
            f"{name}: {value} overflows {dtype}, the compute dtype of these inputs "
            f"(largest finite value {torch.finfo(dtype).max:.4g})"
        )


def check_beta(beta: float, dtype: torch.dtype) -> None:
    """``beta``: a finite Python number > 0 that the compute dtype represents."""
    check_positive("beta", beta)
    check_representable("beta", beta, dtype)


def check_neg_log_phi(neg_log_phi: float | Tensor, ranks: Tensor, validate: bool, dtype: torch.dtype) -> None:
    """The Mallows dispersion weight ``-log phi``: a float or a ``[B]`` tensor, >= 0, finite in ``dtype``."""
    if isinstance(neg_log_phi, Tensor):
        if neg_log_phi.dtype not in FLOAT_DTYPES:
            raise TypeError(f"neg_log_phi: expected a float tensor, got {neg_log_phi.dtype}")
        if neg_log_phi.shape not in ((), (ranks.shape[0],)):
            raise ValueError(
                f"neg_log_phi: expected a scalar or shape ({ranks.shape[0]},), got {tuple(neg_log_phi.shape)}"
            )
        if neg_log_phi.device != ranks.device:
            raise ValueError(f"neg_log_phi: on {neg_log_phi.device} but ranks is on {ranks.device}")
        if should_sync(validate):
            w = neg_log_phi.detach().reshape(-1)
            bad = ~torch.isfinite(w.to(dtype)) | (w < 0)
            if bad.any():
                b = first_row(bad)
                v = float(w[b])
                overflow = f" (overflows {dtype}, the compute dtype)" if abs(v) < float("inf") and v >= 0 else ""
                raise ValueError(f"neg_log_phi[{b}]: must be finite and >= 0, got {v}{overflow}")
        return
    if isinstance(neg_log_phi, bool) or not isinstance(neg_log_phi, (int, float)):
        raise TypeError(f"neg_log_phi: expected a float or a tensor, got {type(neg_log_phi).__name__}")
    if not (0 <= neg_log_phi < float("inf")):
        raise ValueError(f"neg_log_phi: must be finite and >= 0, got {neg_log_phi}")
    check_representable("neg_log_phi", neg_log_phi, dtype)


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def double_backward_message(name: str) -> str:
    return (
        f"{name}: double backward (a gradient of a gradient, create_graph=True) is not supported by the "
        "token statistics, on any backend; first-order gradients are exact"
    )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``x`` whose backward raises; ``anchors`` tie it to the graph of the inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, name: str, *anchors: Tensor) -> Tensor:
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(double_backward_message(ctx.name))


def first_order_only(name: str):
    """Decorate an ``autograd.Function.backward``: it runs without grad, and differentiating its
    outputs again (``create_graph=True``) raises a clear error instead of a wrong or obscure one."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, Tensor) and t.requires_grad]
            return tuple(
                _FirstOrderOnly.apply(g, name, *anchors) if isinstance(g, Tensor) and anchors else g for g in outputs
            )

        return wrapper

    return decorate


def no_double_backward(name: str):
    """A ``register_autograd`` backward for a custom backward op: double backward raises."""

    def backward(ctx, *grads):
        raise RuntimeError(double_backward_message(name))

    return backward


def check_positive_int(name: str, value: int | None, what: str) -> None:
    """``None`` or a Python int >= 1 (``what`` says what it counts)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected None or a positive int ({what}), got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: must be a positive number of {what}, got {value}")


def check_target_ids(targets: Tensor, V: int, ignore_index: int, validate: bool) -> None:
    """Every target is ``ignore_index`` or a token id in ``[0, V)`` (a device sync; skipped unvalidated)."""
    if not should_sync(validate) or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets{list(idx)}: token id {int(targets[idx])} is outside [0, {V}) and not ignore_index={ignore_index}"
        )
