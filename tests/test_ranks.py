"""Rank tensors and the paper's pairwise baselines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    all_pairs,
    mnl_pairwise,
    mnl_topk,
    ranks_from_order,
    ranks_from_scores,
    top_bottom_pair,
)

from . import oracle
from .strategies import batches, make_batch


@given(seed=st.integers(0, 2**31), B=st.integers(1, 6), S=st.integers(1, 9), k=st.integers(0, 10))
def test_ranks_from_scores_is_a_descending_sort(seed, B, S, k):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, generator=g).round()  # rounding makes ties
    mask = torch.rand(B, S, generator=g) < 0.8
    scores = scores.masked_fill(~mask, float("nan"))
    ranks = ranks_from_scores(scores, k, mask)
    for b in range(B):
        slots = [j for j in range(S) if mask[b, j]]
        expected = sorted(slots, key=lambda j: (-scores[b, j].item(), j))[:k]
        got = [j for _, j in sorted((ranks[b, j].item(), j) for j in range(S) if ranks[b, j] >= 0)]
        assert got == expected
        assert all(ranks[b, j] == IGNORE for j in range(S) if not mask[b, j])
        assert all(ranks[b, j] == UNRANKED for j in slots if j not in expected)


def test_ranks_from_scores_with_per_row_k():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
    ranks = ranks_from_scores(scores, torch.tensor([1, 3]))
    assert ranks.tolist() == [[UNRANKED, 0, UNRANKED], [0, 1, 2]]


def test_ranks_from_order():
    assert ranks_from_order([[2, 0]], 3).tolist() == [[1, UNRANKED, 0]]
    order = torch.tensor([[1, -1, -1], [0, 3, 2]])
    ranks = ranks_from_order(order, torch.tensor([2, 4]))
    assert ranks.tolist() == [[UNRANKED, 0, IGNORE, IGNORE], [0, UNRANKED, 2, 1]]
    with pytest.raises(ValueError, match=r"order\[0\].*twice"):
        ranks_from_order([[1, 1]], 3)
    with pytest.raises(ValueError, match=r"order\[1\]"):
        ranks_from_order([[0, 1], [0, 5]], 3)
    with pytest.raises(ValueError, match=r"order\[0\].*only at the end"):
        ranks_from_order([[-1, 1]], 3)
    with pytest.raises(TypeError, match="order"):
        ranks_from_order(torch.tensor([[0.0]]), 3)


@given(batch=batches(max_s=8))
def test_all_pairs_are_the_pairs_implied_by_the_list(batch):
    pairs = all_pairs(batch.ranks)
    got = set()
    for p in range(pairs.row.numel()):
        row = pairs.ranks[p].tolist()
        assert sorted(v for v in row if v != IGNORE) == [UNRANKED, 0]
        got.add((pairs.row[p].item(), row.index(0), row.index(UNRANKED)))
    want = set()
    for b, k_row in enumerate(oracle.rows(batch.ranks)):
        picks, unranked, n = oracle.row_lists(k_row)
        k = len(picks)
        row_pairs = {(b, picks[i], picks[j]) for i in range(k) for j in range(i + 1, k)}
        row_pairs |= {(b, y, u) for y in picks for u in unranked}
        assert len(row_pairs) == k * (k - 1) // 2 + k * (n - k)
        want |= row_pairs
    assert got == want
    assert pairs.row.numel() == len(want)


def test_dpo_all_pairs_baseline():
    batch = make_batch(9, 4, 5, 1.0)
    pairs = all_pairs(batch.ranks)
    got = mnl_topk(batch.policy[pairs.row], batch.ref[pairs.row], pairs.ranks, beta=0.1)
    winner = (pairs.ranks == 0).long().argmax(-1)
    loser = (pairs.ranks == UNRANKED).long().argmax(-1)
    p, q = batch.policy[pairs.row], batch.ref[pairs.row]

    def at(x, j):
        return x.gather(1, j[:, None])[:, 0]

    want = mnl_pairwise(at(p, winner), at(p, loser), at(q, winner), at(q, loser), beta=0.1)
    torch.testing.assert_close(got, want)


@given(seed=st.integers(0, 2**31), B=st.integers(1, 6), S=st.integers(2, 9))
def test_top_bottom_pair_keeps_best_and_worst(seed, B, S):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, S, generator=g)
    mask = torch.rand(B, S, generator=g) < 0.7
    mask[:, :2] = True
    ranks = top_bottom_pair(scores, mask)
    for b in range(B):
        slots = [j for j in range(S) if mask[b, j]]
        best = max(slots, key=lambda j: scores[b, j].item())
        worst = min(slots, key=lambda j: scores[b, j].item())
        expected = [IGNORE] * S
        expected[best], expected[worst] = 0, UNRANKED
        assert ranks[b].tolist() == expected
