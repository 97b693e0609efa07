"""Exact log-likelihoods (eq. 8, eq. 11): proper distributions over top-k lists."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    mallows_rmj_log_likelihood,
    mallows_rmj_topk_from_rewards,
    mnl_log_likelihood,
    mnl_topk_from_rewards,
)

from . import oracle
from .strategies import batches


def every_list(S: int, slots: list[int], k: int) -> torch.Tensor:
    rows = [oracle.ranks_row_from_picks(S, slots, picks) for picks in oracle.all_topk_lists(slots, k)]
    return torch.tensor(rows)


@pytest.mark.parametrize("phi", [0.05, 0.5, 0.9, 0.999999, 1.0])
@given(n=st.integers(2, 5), data=st.data())
def test_probabilities_of_all_topk_lists_sum_to_one(phi, n, data):
    S = n + data.draw(st.integers(0, 2))  # extra padding slots
    k = data.draw(st.integers(1, n))
    slots = sorted(data.draw(st.permutations(range(S)))[:n])
    ranks = every_list(S, slots, k)
    seed = data.draw(st.integers(0, 2**31))
    scores = torch.randn(1, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    if data.draw(st.booleans()):
        scores = scores.round()  # ties: mu_0 breaks them by slot
    r = scores.expand(ranks.shape[0], S).masked_fill(ranks == IGNORE, float("nan"))
    total_mnl = torch.logsumexp(mnl_log_likelihood(r, ranks), 0)
    w = -math.log(phi)
    total_mallows = torch.logsumexp(mallows_rmj_log_likelihood(r, ranks, w), 0)
    assert abs(total_mnl.item()) < 1e-12
    assert abs(total_mallows.item()) < 1e-12


@given(batch=batches(max_s=8), phi=st.sampled_from([0.1, 0.5, 0.95]))
def test_log_likelihoods_match_the_paper_formulas(batch, phi):
    r = batch.policy - batch.ref
    mnl = mnl_log_likelihood(r, batch.ranks)
    mal = mallows_rmj_log_likelihood(r, batch.ranks, -math.log(phi))
    for b, (r_row, k_row) in enumerate(zip(oracle.rows(r), oracle.rows(batch.ranks), strict=True)):
        assert mnl[b].item() == pytest.approx(oracle.mnl_log_likelihood_row(r_row, k_row), rel=1e-9, abs=1e-9)
        assert mal[b].item() == pytest.approx(oracle.mallows_log_likelihood_row(r_row, k_row, phi), rel=1e-9, abs=1e-9)


@given(batch=batches(max_s=8), phi=st.sampled_from([0.2, 0.6, 0.97]))
def test_mallows_indicator_loss_is_the_exact_nll_up_to_the_constant_of_eq_11(batch, phi):
    w = -math.log(phi)
    r = batch.policy - batch.ref
    ll = mallows_rmj_log_likelihood(r, batch.ranks, w)
    for b, (r_row, k_row) in enumerate(zip(oracle.rows(r), oracle.rows(batch.ranks), strict=True)):
        picks, _, n = oracle.row_lists(k_row)
        constant = math.log(oracle.psi(n - len(picks), phi) / oracle.psi(n, phi))
        indicator_loss = oracle.mallows_topk_row(r_row, k_row, w, step=True)
        assert -ll[b].item() == pytest.approx(indicator_loss - constant, rel=1e-9, abs=1e-9)


def test_discrete_mallows_is_eq_9():
    # P(y | S) = phi^{d(y, S)} / (1 + phi + ... + phi^{|S|-1}), d = items of S ranked above y by mu_0
    r = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    phi = 0.4
    for slot, d in [(0, 0), (2, 1), (1, 2), (3, 3)]:
        ranks = torch.full((1, 4), UNRANKED)
        ranks[0, slot] = 0
        got = mallows_rmj_log_likelihood(r, ranks, -math.log(phi)).item()
        assert got == pytest.approx(math.log(phi**d / (1 + phi + phi**2 + phi**3)), rel=1e-12)


def test_mnl_loss_is_the_negative_log_likelihood():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 2, UNRANKED, UNRANKED, IGNORE]]).expand(5, 6)
    torch.testing.assert_close(mnl_topk_from_rewards(r, ranks, reduction="none"), -mnl_log_likelihood(r, ranks))


def test_sigmoid_loss_tends_to_the_indicator_loss_as_rewards_separate():
    r = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.1]], dtype=torch.float64)
    ranks = torch.tensor([[1, 3, 0, 2, UNRANKED]])
    w = 0.8
    want = oracle.mallows_topk_row(r[0].tolist(), ranks[0].tolist(), w, step=True)
    got = mallows_rmj_topk_from_rewards(r * 1e4, ranks, neg_log_phi=w).item()
    assert got == pytest.approx(want, abs=1e-12)
