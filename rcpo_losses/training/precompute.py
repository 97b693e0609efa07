"""The reference model's statistics of every completion, computed once before training and stored with the rows.

The reference model never changes, so its summed log-probs (the ``ref_logps`` of eq. 2) and
entropy sums (the Mallows dispersion, appendix D) are the same numbers every epoch.
:func:`precompute_reference_stats` runs it once over a dataset and adds the columns
``ref_logps``, ``ref_entropy_sums`` and ``ref_lengths`` (one value per completion);
:class:`~rcpo_losses.training.data.RankedPreferenceCollator` passes them through as ``[B, S]``
tensors, checks them against the completions it tokenizes, and the trainer then needs no
reference model in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..tokens.lm_head import eval_mode
from ..tokens.stats import ResponseTokenStats
from .data import PRECOMPUTED_COLUMNS, REF_COLUMNS, REF_TOKEN_HASH, RankedPreferenceCollator
from .model_stats import response_stats

__all__ = [
    "PRECOMPUTED_COLUMNS",
    "REF_COLUMNS",
    "has_reference_stats",
    "precompute_reference_stats",
    "rows_without_reference_stats",
    "with_reference_columns",
]


def _read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def precompute_reference_stats(
    model: nn.Module,
    rows,
    collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Tensor]],
    *,
    batch_size: int = 8,
    fused_linear: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    stats: Callable[..., ResponseTokenStats] = response_stats,
    indices: Sequence[int] | None = None,
):
    r"""Run the reference model once over ranked rows; the rows with its statistics of each completion.

        Adds to each row, one value per completion :math:`y_i`:

        - ``ref_logps``: :math:`\log \pi_{ref}(y_i \mid x) = \sum_t \log \pi_{ref}(y_{i,t} \mid x, y_{i,<t})` (eq. 2);
        - ``ref_entropy_sums``: :math:`\sum_t H(\pi_{ref}(\cdot \mid x, y_{i,<t}))` (appendix D);
        - ``ref_lengths``: :math:`|y_i|`, the completion tokens counted, which the collator checks;

    and one value per row, ``ref_token_hash``: the collator's fingerprint of the prompt and
    completion token ids the statistics were computed on (:func:`rcpo_losses.training.data.token_hash`;
    for a sampled row, its ``prompt_ids`` and ``completion_ids`` as collated).
    Collated again with other tokens (an edited prompt or id, another ``max_prompt_length``), the row
    raises ``ValueError`` naming it. The values are stored unrounded (fp32 numbers for an fp32 or
    bf16 model, fp64 for an fp64 one).

        The rows go through ``collator`` (the one used for training, so the same tokenization
        and truncation) in batches of ``batch_size``, and through ``stats`` (the trainer's
        :func:`~rcpo_losses.response_stats`, with the same ``fused_linear`` path) in eval mode under
        ``no_grad``, on the device of ``model``'s parameters, with a tqdm progress bar.

        Args:
            model: the reference model (for a PEFT policy: call inside ``model.disable_adapter()``).
            rows: a ``datasets.Dataset``, a list of row dicts, or the path of a JSONL file of rows.
                Columns ``ref_*`` already there are recomputed.
            collator: e.g. :class:`~rcpo_losses.training.data.RankedPreferenceCollator`.
            batch_size: rows per forward.
            fused_linear: compute through the final hidden states and the LM head, as training does.
            output: for list or JSONL input, also write the rows as JSONL to this path.
            progress: show the progress bar.
            stats: ``(model, batch, fused_linear=..., entropy=True) -> ResponseTokenStats`` ``(B, S)``
                (``RCPOTrainer`` passes its own ``response_stats``, so that an override of it is used).
            indices: the dataset index of each row, named in the collator's errors (default: the
                position in ``rows``).

        Returns:
            A ``datasets.Dataset`` with the three columns added (Arrow: ``save_to_disk`` it, it is
            memory-mapped when loaded) for a ``Dataset``; else a list of row dicts.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    is_dataset = hasattr(rows, "column_names") and hasattr(rows, "add_column")
    if isinstance(rows, (str, os.PathLike)):
        rows = _read_jsonl(rows)
    elif not is_dataset:
        rows = [dict(row) for row in rows]
    from tqdm.auto import tqdm

    indices = range(len(rows)) if indices is None else list(indices)
    if len(indices) != len(rows):
        raise ValueError(f"indices: {len(indices)} indices for {len(rows)} rows")
    device = next(model.parameters()).device
    columns: dict[str, list] = {name: [] for name in PRECOMPUTED_COLUMNS}
    with eval_mode(model):  # no dropout: the reference statistics are those of the model itself
        for start in tqdm(range(0, len(rows), batch_size), desc="reference statistics", disable=not progress):
            at = indices[start : start + batch_size]
            chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
            chunk = [{k: v for k, v in row.items() if k not in PRECOMPUTED_COLUMNS} for row in chunk]
            batch = collator(chunk, indices=at) if isinstance(collator, RankedPreferenceCollator) else collator(chunk)
            if "token_hash" not in batch:
                raise ValueError(
                    "collator: its batches carry no 'token_hash' (RankedPreferenceCollator's fingerprint of the "
                    "tokens), which ties the statistics to the tokens they are computed on"
                )
            batch = {k: v.to(device) for k, v in batch.items()}
            found = stats(model, batch, fused_linear=fused_linear, entropy=True)
            columns[REF_TOKEN_HASH] += batch["token_hash"].tolist()
            for b, row in enumerate(chunk):
                n = len(row["completions"])
                for name, values in zip(REF_COLUMNS, found, strict=True):
                    columns[name].append(values[b, :n].tolist())
    out = with_reference_columns(rows, columns)
    if output is not None and not is_dataset:
        with open(output, "w") as f:
            for row in out:
                f.write(json.dumps(row) + "\n")
    return out


def with_reference_columns(rows, columns: Mapping[str, Sequence], positions: Sequence[int] | None = None):
    """``rows`` with the columns ``columns[name]`` (``PRECOMPUTED_COLUMNS``), replacing any there.

    ``columns[name]`` holds one value per row, or with ``positions`` one value for each of the
    rows at those positions, the other rows keeping theirs (``None`` where they have none). A
    ``datasets.Dataset`` gets Arrow columns (a new ``Dataset``), a list of dicts new dicts.
    """
    if positions is not None:
        positions = list(positions)
        full = {name: _column(rows, name) for name in columns}
        for name, values in columns.items():
            for i, value in zip(positions, values, strict=True):
                full[name][i] = value
        columns = full
    if hasattr(rows, "column_names") and hasattr(rows, "add_column"):
        rows = rows.remove_columns([name for name in columns if name in rows.column_names])
        for name, values in columns.items():
            rows = rows.add_column(name, list(values))
        return rows
    return [{**row, **{name: values[i] for name, values in columns.items()}} for i, row in enumerate(rows)]


def _column(rows, name: str) -> list:
    """Each row's value of column ``name`` (``None`` where it has none), as a list."""
    if hasattr(rows, "column_names") and hasattr(rows, "add_column"):
        return list(rows[name]) if name in rows.column_names else [None] * len(rows)
    return [row.get(name) for row in rows]


def is_stream(rows) -> bool:
    """Whether ``rows`` is iterable only (a ``datasets.IterableDataset``, a torch ``IterableDataset``, no ``len``)."""
    return isinstance(rows, torch.utils.data.IterableDataset) or not hasattr(rows, "__len__")


def rows_without_reference_stats(rows) -> list[int]:
    """The positions of the rows that lack one of the ``PRECOMPUTED_COLUMNS`` (absent, or ``None``).

    ``rows``: a ``datasets.Dataset`` (its Arrow columns are checked, not its rows read) or a
    sequence of row dicts. A stream (``datasets.IterableDataset``) cannot be checked before it
    is read: ``TypeError``.
    """
    if is_stream(rows):
        raise TypeError(f"rows: a map-style dataset (a datasets.Dataset or a list of rows), got {type(rows).__name__}")
    if hasattr(rows, "column_names") and hasattr(rows, "add_column"):
        if not all(name in rows.column_names for name in PRECOMPUTED_COLUMNS):
            return list(range(len(rows)))
        import numpy as np

        table = rows.with_format("arrow")
        absent = np.zeros(len(rows), dtype=bool)
        for name in PRECOMPUTED_COLUMNS:
            absent |= table[name].is_null().to_numpy(zero_copy_only=False)
        return np.flatnonzero(absent).tolist()
    return [i for i, row in enumerate(rows) if any(row.get(name) is None for name in PRECOMPUTED_COLUMNS)]


def has_reference_stats(rows) -> bool:
    """Whether every row of ``rows`` carries all the ``ref_*`` columns (``PRECOMPUTED_COLUMNS``).

    ``rows``: a ``datasets.Dataset``, a list of row dicts, or a dict of those (every one of
    them); a stream (``datasets.IterableDataset``): whether its columns include them (its rows
    are checked as they are collated).
    """
    if rows is None:
        return False
    if isinstance(rows, Mapping):  # a dict of datasets (eval_dataset); a row itself is not rows
        return bool(rows) and all(has_reference_stats(r) for r in rows.values())
    if is_stream(rows):
        names = getattr(rows, "column_names", None) or []
        return all(name in names for name in PRECOMPUTED_COLUMNS)
    return len(rows) > 0 and not rows_without_reference_stats(rows)
