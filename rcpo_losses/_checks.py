"""Input checks shared by every public function: each error names the argument, the row and the problem.

Shape, dtype and device checks are free and always run. Checks that read values need a
device-to-host sync; they run when ``validate=True`` and never under ``torch.compile``.
The last helpers give the one error of the token statistics for double backward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .ranks import IGNORE, UNRANKED, in_assortment, row_checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def should_sync(validate: bool) -> bool:
    return validate and not torch.compiler.is_compiling()


def _first_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def check_rank_tensor(ranks: Tensor) -> None:
    """A ``[B, S]`` integer tensor (free: no values are read)."""
    if not isinstance(ranks, Tensor):
        raise TypeError(f"ranks: expected a torch.Tensor, got {type(ranks).__name__}")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise TypeError(f"ranks: expected an integer tensor, got {ranks.dtype}")
    if ranks.dim() != 2:
        raise ValueError(f"ranks: expected a [B, S] tensor, got shape {tuple(ranks.shape)}")


def check_ranks(ranks: Tensor, validate: bool) -> None:
    """A ``[B, S]`` integer rank tensor whose rows each hold a valid top-k list (``ranks.row_checks``)."""
    check_rank_tensor(ranks)
    if not should_sync(validate):
        return
    c = row_checks(ranks)
    checks = [
        (c.illegal, "entries must be >= 0 (a pick), {UNRANKED} (UNRANKED) or {IGNORE} (IGNORE)"),
        (c.too_small, "a row needs at least two responses (it has {n})"),
        (c.no_pick, "a row needs at least one ranked response (rank 0)"),
        (c.not_a_list, "ranked entries must be 0..k-1 once each (k = {k})"),
    ]
    if c.valid.all():  # the one sync of a valid batch
        return
    for bad, message in checks:
        if bad.any():
            b = _first_row(bad)
            text = message.format(UNRANKED=UNRANKED, IGNORE=IGNORE, n=int(c.n[b]), k=int(c.k[b]))
            raise ValueError(f"ranks[{b}]: {text}, got {ranks[b].tolist()}")


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


def check_finite(name: str, x: Tensor, ranks: Tensor) -> None:
    """``x`` is finite on every slot of the assortment (one sync)."""
    bad = in_assortment(ranks) & ~torch.isfinite(x.detach())
    if bad.any():
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}]: slot {j} is in the assortment (rank {int(ranks[b, j])}) but holds "
            f"{float(x[b, j])}; mark padding slots IGNORE"
        )


def check_scores(name: str, x: Tensor, ranks: Tensor, validate: bool) -> None:
    """A float tensor of ``ranks``'s shape and device, finite on every slot of the assortment."""
    check_score_tensor(name, x, ranks)
    if should_sync(validate):
        check_finite(name, x, ranks)


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
                b = _first_row(bad)
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
