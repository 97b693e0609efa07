"""Rank tensors: which responses of an assortment were chosen, and in which order.

A rank tensor is an integer ``[B, S]`` tensor. ``ranks[b, j] = i >= 0`` says that slot
``j`` is the ``(i + 1)``-th pick of row ``b``'s top-k list; ``UNRANKED`` marks a response
that was offered but not picked; ``IGNORE`` marks a padding slot that is not in the
assortment. The ranked entries of a row are exactly ``0 .. k_b - 1``.

The checks of a rank tensor live here too (:func:`check_ranks`), next to :func:`row_checks`,
which finds what they report.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .checks import first_row, should_sync

UNRANKED = -1
IGNORE = -100


def in_assortment(ranks: Tensor) -> Tensor:
    """Bool ``[B, S]``: the slot holds a response of the assortment ``S_b``."""
    return (ranks >= 0) | (ranks == UNRANKED)


def assortment_size(ranks: Tensor) -> Tensor:
    """``n_b = |S_b|``, int64 ``[B]``."""
    return in_assortment(ranks).sum(-1)


def list_length(ranks: Tensor) -> Tensor:
    """``k_b``, the length of row ``b``'s top-k list, int64 ``[B]``."""
    return (ranks >= 0).sum(-1)


def order_by_rank(ranks: Tensor) -> Tensor:
    """Slot indices sorted by rank: ``order[b, i]`` is the slot ranked ``i`` for ``i < k_b``.

    Unranked slots follow the ranked ones and padding comes last, each group in slot
    order (the sort is stable), so ``order`` is a permutation of ``0 .. S-1`` per row.
    """
    S = ranks.shape[-1]
    key = torch.where(ranks >= 0, ranks, torch.where(ranks == UNRANKED, S, S + 1))
    return torch.argsort(key, dim=-1, stable=True)


class RowChecks(NamedTuple):
    """What :func:`row_checks` finds in each row of a rank tensor (all computed on device, no sync)."""

    n: Tensor  # int64 [B]: |S_b|
    k: Tensor  # int64 [B]: k_b, the number of entries >= 0
    illegal: Tensor  # bool [B]: an entry is not >= 0, UNRANKED or IGNORE
    too_small: Tensor  # bool [B]: fewer than two responses
    no_pick: Tensor  # bool [B]: no ranked response
    not_a_list: Tensor  # bool [B]: the ranked entries are not 0..k-1 once each

    @property
    def valid(self) -> Tensor:
        return ~(self.illegal | self.too_small | self.no_pick | self.not_a_list)


def row_checks(ranks: Tensor) -> RowChecks:
    """Per-row validity of a ``[B, S]`` rank tensor: the one definition of a valid row.

    :func:`check_ranks` raises on the first invalid row (``validate=True``);
    :func:`valid_rows` and :func:`mask_invalid_rows` use the same flags without a sync.
    """
    B, S = ranks.shape
    r = ranks.long()
    n = in_assortment(r).sum(-1)
    k = list_length(r)
    # Ranks 0..k-1 once each: count each value; ranks >= S land in column S (where none
    # may be), entries that are not picks in column S + 1 (ignored).
    idx = torch.where(r >= 0, r.clamp(max=S), S + 1)
    counts = torch.zeros(B, S + 2, dtype=torch.int64, device=r.device).scatter_add_(1, idx, torch.ones_like(idx))
    want = (torch.arange(S + 1, device=r.device) < k[:, None]).long()
    return RowChecks(
        n=n,
        k=k,
        illegal=~((r >= 0) | (r == UNRANKED) | (r == IGNORE)).all(-1),
        too_small=n < 2,
        no_pick=k == 0,
        not_a_list=(counts[:, : S + 1] != want).any(-1),
    )


def valid_rows(ranks: Tensor) -> Tensor:
    """Bool ``[B]``: rows that hold a valid top-k list (see :func:`row_checks`).

    Reductions average over these rows. With ``validate=True`` every row must be valid;
    with ``validate=False`` (and under ``torch.compile``) an invalid row gets loss 0 and
    is left out of the mean.
    """
    return row_checks(ranks).valid


def mask_rows(ranks: Tensor, keep: Tensor) -> Tensor:
    """``ranks`` with every row where ``keep`` (bool ``[B]``) is False turned into all-``IGNORE`` (no sync).

    Applied before any backend runs, so that the Triton kernels and the PyTorch reference
    see the same input: a masked row has no response, hence loss 0, gradient 0, and no
    place in the mean.
    """
    ranks = ranks if ranks.dtype.is_signed else ranks.long()  # uint8 cannot hold IGNORE
    return torch.where(keep[:, None], ranks, IGNORE)


def mask_invalid_rows(ranks: Tensor) -> Tensor:
    """``ranks`` with every invalid row (see :func:`row_checks`) turned into all-``IGNORE``."""
    return mask_rows(ranks, valid_rows(ranks))


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
            b = first_row(bad)
            text = message.format(UNRANKED=UNRANKED, IGNORE=IGNORE, n=int(c.n[b]), k=int(c.k[b]))
            raise ValueError(f"ranks[{b}]: {text}, got {ranks[b].tolist()}")


def check_finite(name: str, x: Tensor, ranks: Tensor) -> None:
    """``x`` is finite on every slot of the assortment (one sync)."""
    bad = in_assortment(ranks) & ~torch.isfinite(x.detach())
    if bad.any():
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{b}]: slot {j} is in the assortment (rank {int(ranks[b, j])}) but holds "
            f"{float(x[b, j])}; mark padding slots IGNORE"
        )


def ranks_from_scores(
    scores: Tensor, k: int | Tensor | None = None, mask: Tensor | None = None, *, validate: bool = True
) -> Tensor:
    """Top-k rank tensor of a score matrix (higher score is better).

    ``ranks[b, j] = i`` for the ``i``-th best slot of row ``b`` when ``i < k_b``,
    ``UNRANKED`` for the other slots of the assortment and ``IGNORE`` where ``mask`` is
    False. Ties go to the lower slot index. Useful to turn reward-model scores into
    top-k feedback, the way the paper builds its data (appendix G).

    Args:
        scores: float ``[B, S]``; values at masked slots are never read (NaN allowed).
            A NaN inside the assortment raises (``validate=True``); ``inf`` and ``-inf``
            are ordinary scores.
        k: list length, an int or an int ``[B]`` tensor; ``None`` ranks every slot.
            Clipped to ``|S_b|``.
        mask: bool ``[B, S]``, True for slots in the assortment; default all True.
        validate: check for NaN scores in the assortment (one device sync; skipped under
            ``torch.compile``). Unvalidated, a NaN score ranks like ``-inf``.

    Shape:
        - scores: ``(B, S)``; output: ``(B, S)`` int64.
    """
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        raise TypeError(f"scores: expected a float tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() != 2:
        raise ValueError(f"scores: expected a [B, S] tensor, got shape {tuple(scores.shape)}")
    B, S = scores.shape
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    elif not isinstance(mask, Tensor) or mask.shape != scores.shape:
        raise ValueError(f"mask: shape {tuple(getattr(mask, 'shape', ()))} does not match scores {tuple(scores.shape)}")
    mask = mask.to(device=scores.device, dtype=torch.bool)
    n = mask.sum(-1, keepdim=True)
    if k is None:
        k_b = n
    else:
        k_b = torch.as_tensor(k, device=scores.device)
        if k_b.dtype.is_floating_point or k_b.dtype.is_complex or k_b.dtype == torch.bool:
            raise TypeError(f"k: expected an int or an integer tensor, got {k_b.dtype}")
        if k_b.numel() not in (1, B):
            raise ValueError(f"k: expected an int or a [B] = [{B}] tensor, got shape {tuple(k_b.shape)}")
        k_b = k_b.reshape(-1, 1).expand(B, 1)
        if should_sync(True) and (k_b < 0).any():
            raise ValueError(f"k: must be non-negative, got {k_b.reshape(-1).tolist()}")
        k_b = torch.minimum(k_b, n)
    if should_sync(validate):
        bad = mask & scores.isnan()
        if bad.any():
            b, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"scores[{b}]: slot {j} is in the assortment (mask True) but holds nan")
    # Masked slots sort last; the stable sort on a descending key breaks ties by slot.
    key = torch.where(mask, scores.float() if scores.dtype != torch.float64 else scores, -torch.inf)
    key = torch.where(mask & key.isnan(), -torch.inf, key)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    # then the assortment before the masked slots, so that a score of -inf never ties with them
    order = order.gather(-1, torch.argsort((~mask).gather(-1, order).to(torch.uint8), dim=-1, stable=True))
    position = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=scores.device).expand(B, S))
    return torch.where(~mask, IGNORE, torch.where(position < k_b, position, UNRANKED))


def ranks_from_order(order: Tensor, n_items: int | Tensor, num_slots: int | None = None) -> Tensor:
    """Rank tensor of top-k lists given as slot indices, best first.

    ``order[b, i]`` is the slot picked ``(i + 1)``-th in row ``b``; negative entries
    pad lists shorter than ``K`` (they must come after the real picks). Row ``b`` offers
    slots ``0 .. n_b - 1``; slots at or past ``n_b`` are ``IGNORE``.

    Args:
        order: int ``[B, K]``.
        n_items: ``|S_b|``, an int or an int ``[B]`` tensor.
        num_slots: ``S``, the width of the output; default ``max n_b``.

    Shape:
        - order: ``(B, K)``; output: ``(B, S)`` int64.

    Example: ``ranks_from_order([[2, 0]], 3)`` is ``[[1, -1, 0]]``.
    """
    order = torch.as_tensor(order)
    if order.dim() != 2:
        raise ValueError(f"order: expected a [B, K] tensor, got shape {tuple(order.shape)}")
    if order.dtype.is_floating_point or order.dtype == torch.bool:
        raise TypeError(f"order: expected an integer tensor, got {order.dtype}")
    B, K = order.shape
    n = torch.as_tensor(n_items, device=order.device).reshape(-1).expand(B)
    S = int(n.max()) if num_slots is None else int(num_slots)
    if (n > S).any():
        raise ValueError(f"n_items: larger than num_slots = {S}")
    picked = order >= 0
    bad = (picked & (order >= n[:, None])) | (picked[:, 1:] & ~picked[:, :-1]).any(-1, keepdim=True)
    if bad.any():
        b = int(bad.any(-1).nonzero()[0])
        raise ValueError(
            f"order[{b}]: {order[b].tolist()} must list slots below n_items = {int(n[b])} "
            "with padding (negative entries) only at the end"
        )
    slot = torch.where(picked, order, S)  # padding picks land in a scratch column
    ranks = torch.full((B, S + 1), UNRANKED, dtype=torch.int64, device=order.device)
    ranks.scatter_(1, slot, torch.arange(K, device=order.device).expand(B, K))
    ranks = ranks[:, :S]
    counts = torch.zeros(B, S + 1, dtype=torch.int64, device=order.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    if (counts[:, :S] > 1).any():
        b = int((counts[:, :S] > 1).any(-1).nonzero()[0])
        raise ValueError(f"order[{b}]: {order[b].tolist()} lists a slot twice")
    return torch.where(torch.arange(S, device=order.device) < n[:, None], ranks, IGNORE)


class PairRanks(NamedTuple):
    """Pairwise feedback expanded from a batch: row ``p`` compares slots of ``row[p]``."""

    row: Tensor  # int64 [P]: the source row of each pair
    ranks: Tensor  # int64 [P, S]: 0 at the winner, UNRANKED at the loser, IGNORE elsewhere


def all_pairs(ranks: Tensor, *, validate: bool = True) -> PairRanks:
    """Every pairwise preference implied by top-k lists (the paper's DPO-AllPairs).

    A top-k list ``y_1 > ... > y_k`` over ``S_b`` implies ``y_i > y_j`` for ``i < j <= k``
    and ``y_i > u`` for every unranked ``u``: ``k (k - 1) / 2 + k (n - k)`` pairs. Each
    pair becomes a row of pairwise ranks, so any loss of this library applies to it:
    ``p = all_pairs(ranks); mnl_topk(policy_logps[p.row], ref_logps[p.row], p.ranks)``
    is DPO on all pairs.

    Rows that are not valid top-k lists raise (``validate=True``, one device sync);
    unvalidated (and under ``torch.compile``) they yield no pairs.

    Shape:
        - ranks: ``(B, S)``; output ``row``: ``(P,)``, ``ranks``: ``(P, S)``.
    """
    check_ranks(ranks, validate)
    ranks = mask_invalid_rows(ranks)  # a no-op after validation; cheap next to the [B, S, S] below
    S = ranks.shape[-1]
    present = in_assortment(ranks)
    ranked = ranks >= 0
    # win[b, i, j]: slot i is preferred to slot j
    win = (
        ranked[:, :, None]
        & present[:, None, :]
        & ((ranks[:, None, :] == UNRANKED) | (ranks[:, :, None] < ranks[:, None, :]))
    )
    row, winner, loser = win.nonzero(as_tuple=True)
    slots = torch.arange(S, device=ranks.device)
    pair_ranks = torch.full((row.numel(), S), IGNORE, dtype=torch.int64, device=ranks.device)
    pair_ranks = torch.where(slots == winner[:, None], 0, pair_ranks)
    pair_ranks = torch.where(slots == loser[:, None], UNRANKED, pair_ranks)
    return PairRanks(row, pair_ranks)


def top_bottom_pair(scores: Tensor, mask: Tensor | None = None, *, validate: bool = True) -> Tensor:
    """Pairwise ranks keeping only the best and the worst response of each row by score.

    The common reduction of scored responses to one DPO pair (the paper's pairwise
    setup, appendix G). Ties go to the lower slot index for the best and the higher
    slot index for the worst, so the two differ whenever ``|S_b| >= 2``.

    A NaN score in the assortment raises, as in :func:`ranks_from_scores` (``validate``).

    Returns:
        int64 ``[B, S]``: 0 at the best slot, ``UNRANKED`` at the worst, ``IGNORE`` elsewhere.

    Shape:
        - scores: ``(B, S)``; mask: ``(B, S)`` bool, True for slots in the assortment.
    """
    full = ranks_from_scores(scores, None, mask, validate=validate)
    n = in_assortment(full).sum(-1, keepdim=True)
    return torch.where(full == 0, 0, torch.where((full == n - 1) & (n >= 2), UNRANKED, IGNORE))
