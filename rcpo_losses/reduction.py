"""Reductions of per-row losses, shared by every loss of the library."""

from __future__ import annotations

from torch import Tensor

from .ranks import valid_rows


def reduce_rows(losses: Tensor, ranks: Tensor, reduction: str) -> Tensor:
    """Reduce per-row losses ``[B]``: ``"mean"`` over valid rows, ``"sum"``, or ``"none"``.

    A row is valid when it holds a top-k list (``ranks.row_checks``; always, once
    ``validate=True`` has passed); an invalid row contributes 0 and is not counted. The
    losses mask invalid rows to all-``IGNORE`` before this, so their losses are 0 already.
    The mean divides by the number of valid rows of *this* call: under data
    parallelism each rank averages its own rows (see docs/integration.md).
    """
    valid = valid_rows(ranks)
    losses = losses.masked_fill(~valid, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp(min=1).to(losses.dtype)
