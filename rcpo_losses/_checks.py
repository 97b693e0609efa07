"""Input checks shared by every loss: each error names the argument, the row and the problem.

Shape, dtype and device checks are free and always run. Checks that read values need a
device-to-host sync; they run when ``validate=True`` and never under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ranks import IGNORE, UNRANKED, in_assortment, list_length

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def should_sync(validate: bool) -> bool:
    return validate and not torch.compiler.is_compiling()


def _first_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def check_ranks(ranks: Tensor, validate: bool) -> None:
    """A ``[B, S]`` integer rank tensor whose rows each hold a valid top-k list."""
    if not isinstance(ranks, Tensor):
        raise TypeError(f"ranks: expected a torch.Tensor, got {type(ranks).__name__}")
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise TypeError(f"ranks: expected an integer tensor, got {ranks.dtype}")
    if ranks.dim() != 2:
        raise ValueError(f"ranks: expected a [B, S] tensor, got shape {tuple(ranks.shape)}")
    if not should_sync(validate):
        return
    B, S = ranks.shape
    r = ranks.long()
    legal = (r >= 0) | (r == UNRANKED) | (r == IGNORE)
    n = in_assortment(r).sum(-1)
    k = list_length(r)
    # Ranks 0..k-1 once each: count each value; ranks >= S land in column S (where none
    # may be), entries that are not picks in column S + 1 (ignored).
    idx = torch.where(r >= 0, r.clamp(max=S), S + 1)
    counts = torch.zeros(B, S + 2, dtype=torch.int64, device=r.device).scatter_add_(1, idx, torch.ones_like(idx))
    want = (torch.arange(S + 1, device=r.device) < k[:, None]).long()
    checks = [
        (~legal.all(-1), "entries must be >= 0 (a pick), {UNRANKED} (UNRANKED) or {IGNORE} (IGNORE)"),
        (n < 2, "a row needs at least two responses (it has {n})"),
        (k == 0, "a row needs at least one ranked response (rank 0)"),
        ((counts[:, : S + 1] != want).any(-1), "ranked entries must be 0..k-1 once each (k = {k})"),
    ]
    if not torch.stack([bad for bad, _ in checks]).any():  # the one sync of a valid batch
        return
    for bad, message in checks:
        if bad.any():
            b = _first_row(bad)
            text = message.format(UNRANKED=UNRANKED, IGNORE=IGNORE, n=int(n[b]), k=int(k[b]))
            raise ValueError(f"ranks[{b}]: {text}, got {r[b].tolist()}")


def check_scores(name: str, x: Tensor, ranks: Tensor, validate: bool) -> None:
    """A float tensor of ``ranks``'s shape and device, finite on every slot of the assortment."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.shape != ranks.shape:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match ranks {tuple(ranks.shape)}")
    if x.device != ranks.device:
        raise ValueError(f"{name}: on {x.device} but ranks is on {ranks.device}")
    if not should_sync(validate):
        return
    bad = in_assortment(ranks) & ~torch.isfinite(x.detach())
    if bad.any():
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}]: slot {j} is in the assortment (rank {int(ranks[b, j])}) but holds "
            f"{float(x[b, j])}; mark padding slots IGNORE"
        )


def check_pair(name: str, x: Tensor, like: Tensor) -> None:
    """A float ``[B]`` tensor matching ``like`` (for the chosen/rejected pairwise API)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} ([B]), got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name}: on {x.device} but the chosen log-probs are on {like.device}")


def check_positive(name: str, value: float) -> None:
    if isinstance(value, Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")


def check_neg_log_phi(neg_log_phi: float | Tensor, ranks: Tensor, validate: bool) -> None:
    """The Mallows dispersion weight ``-log phi``: a float or a ``[B]`` tensor, finite, >= 0."""
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
            bad = ~torch.isfinite(w) | (w < 0)
            if bad.any():
                b = _first_row(bad)
                raise ValueError(f"neg_log_phi[{b}]: must be finite and >= 0, got {float(w[b])}")
        return
    if not isinstance(neg_log_phi, (int, float)):
        raise TypeError(f"neg_log_phi: expected a float or a tensor, got {type(neg_log_phi).__name__}")
    if not (0 <= neg_log_phi < float("inf")):
        raise ValueError(f"neg_log_phi: must be finite and >= 0, got {neg_log_phi}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
