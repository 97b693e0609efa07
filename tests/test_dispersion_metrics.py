"""entropy_dispersion (appendix D), sequence_logps and ranking_metrics against direct loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rcpo_losses import IGNORE, UNRANKED, entropy_dispersion, ranking_metrics, sequence_logps

from . import oracle
from .strategies import batches, make_ranks


def dispersion_loop(h_tokens, masks, ranks, V, variant, c=1.0):
    """Appendix D literally: per-token entropies H[b][i][t] of completion tokens, summed by loops."""
    out = []
    for b, row in enumerate(ranks):
        responses = [i for i, v in enumerate(row) if v != IGNORE]
        lengths = {i: sum(masks[b][i]) for i in responses}
        sums = {i: sum(h for h, m in zip(h_tokens[b][i], masks[b][i], strict=True) if m) for i in responses}
        if variant == "rcpo":
            N = max(lengths.values())
            ratio = sum(sums.values()) / (len(responses) * N * math.log(V))
            out.append(-math.log(min(max(ratio, 1e-6), 1.0)))
        else:
            mean = sum(sums[i] / lengths[i] / math.log(V) for i in responses) / len(responses)
            out.append(-c * math.log(min(max(mean, 1e-6), 1.0)))
    return out


@pytest.mark.parametrize("variant", ["rcpo", "mallowspo"])
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), S=st.integers(2, 5), T=st.integers(1, 7))
def test_entropy_dispersion_matches_the_loop(variant, seed, B, S, T):
    g = torch.Generator().manual_seed(seed)
    V = 50
    h = torch.rand(B, S, T, generator=g, dtype=torch.float64) * math.log(V)
    mask = torch.rand(B, S, T, generator=g) < 0.7
    mask[..., 0] = True

    ranks = make_ranks(np.random.default_rng(seed), B, S)
    sums = sequence_logps(h, mask)  # a masked sum over tokens, whatever it sums
    lengths = mask.sum(-1)
    got = entropy_dispersion(sums, lengths, ranks, V, variant=variant, scale=0.3)
    want = dispersion_loop(h.tolist(), mask.tolist(), ranks.tolist(), V, variant, c=0.3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert (got >= 0).all()


def test_entropy_dispersion_clamps_zero_entropy():
    ranks = torch.tensor([[0, UNRANKED, IGNORE]])
    zeros = torch.zeros(1, 3)
    lengths = torch.tensor([[4, 6, 0]])
    w = entropy_dispersion(zeros, lengths, ranks, 32000)
    assert w.item() == pytest.approx(-math.log(1e-6))
    w = entropy_dispersion(zeros, lengths, ranks, 32000, min_ratio=1e-3, variant="mallowspo", scale=2.0)
    assert w.item() == pytest.approx(-2.0 * math.log(1e-3))
    # maximal entropy at every token of equally long responses (a hair over log V, as
    # rounding can make it): phi = 1, weight exactly 0, never negative
    equal = torch.tensor([[5, 5, 0]])
    full = equal * math.log(32000) * 1.0000001
    assert entropy_dispersion(full.float(), equal, ranks, 32000).item() == 0.0


def test_entropy_dispersion_is_detached_by_default():
    sums = torch.rand(2, 2, requires_grad=True)
    lengths = torch.ones(2, 2)
    ranks = torch.tensor([[0, UNRANKED], [UNRANKED, 0]])
    assert not entropy_dispersion(sums, lengths, ranks, 10).requires_grad
    assert entropy_dispersion(sums, lengths, ranks, 10, detach=False).requires_grad
    with pytest.raises(ValueError, match="vocab_size"):
        entropy_dispersion(sums, lengths, ranks, 1)
    with pytest.raises(ValueError, match="variant"):
        entropy_dispersion(sums, lengths, ranks, 10, variant="x")


def test_sequence_logps_ignores_masked_positions():
    t = torch.tensor([[[-1.0, -2.0, float("nan")], [-0.5, float("inf"), -0.5]]])
    m = torch.tensor([[[True, True, False], [True, False, True]]])
    torch.testing.assert_close(sequence_logps(t, m), torch.tensor([[-3.0, -1.0]]))
    torch.testing.assert_close(sequence_logps(t, m, normalize=True), torch.tensor([[-1.5, -0.5]]))
    with pytest.raises(ValueError, match="mask: shape"):
        sequence_logps(t, m[..., :2])


@given(batch=batches(max_s=8))
def test_ranking_metrics_match_loops(batch):
    r = batch.policy - batch.ref
    m = ranking_metrics(r, batch.ranks)
    top1, pair, margin = [], [], []
    for r_row, k_row in zip(oracle.rows(r), oracle.rows(batch.ranks), strict=True):
        picks, unranked, _ = oracle.row_lists(k_row)
        others = picks[1:] + unranked
        top1.append(all(r_row[picks[0]] > r_row[j] for j in others))
        pairs = [(picks[i], picks[j]) for i in range(len(picks)) for j in range(i + 1, len(picks))]
        pairs += [(y, u) for y in picks for u in unranked]
        pair.append(sum(r_row[a] > r_row[b] for a, b in pairs) / len(pairs))
        margin.append(r_row[picks[0]] - sum(r_row[j] for j in others) / len(others))
    assert m["top1_accuracy"].item() == pytest.approx(sum(top1) / len(top1))
    assert m["pairwise_accuracy"].item() == pytest.approx(sum(pair) / len(pair))
    assert m["margin"].item() == pytest.approx(sum(margin) / len(margin), rel=1e-9, abs=1e-9)
    assert all(not v.requires_grad for v in m.values())
