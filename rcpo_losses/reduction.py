"""Reductions of per-row losses, shared by every loss of the library."""

from __future__ import annotations

from torch import Tensor

from .ranks import IGNORE


def reduce_rows(losses: Tensor, ranks: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-row losses ``[B]``: ``"mean"`` over valid rows, ``"sum"``, or ``"none"``.

    ``ranks=None``: every row is valid (a chosen/rejected batch, whose ranks are built valid).

    A row is valid when it holds a top-k list (``ranks.row_checks``; always, once
    ``validate=True`` has passed); an invalid row contributes 0 and is not counted. The
    losses mask invalid rows to all-``IGNORE`` before this (``ranks`` must come so: checked
    or masked), so their losses are 0 already, and a row is valid exactly when it is not
    all-``IGNORE``: one comparison instead of a second ``row_checks``.
    The mean divides by the number of valid rows of *this* call: under data
    parallelism each rank averages its own rows (see docs/integration.md).
    """
    if ranks is None:
        count = max(losses.shape[0], 1)
    else:
        valid = (ranks != IGNORE).any(-1)
        losses = losses.masked_fill(~valid, 0.0)
        count = valid.sum().clamp(min=1).to(losses.dtype)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / count
