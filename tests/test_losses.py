"""The RCPO losses against the paper: special cases, independent loops, closed-form gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    implicit_rewards,
    mallows_rmj_discrete,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mallows_rmj_topk_from_rewards,
    mnl_discrete,
    mnl_pairwise,
    mnl_topk,
    mnl_topk_from_rewards,
)

from . import oracle
from .strategies import batches, make_batch

LOSSES = {
    "mnl": lambda p, q, ranks, **kw: mnl_topk(p, q, ranks, **kw),
    "mallows": lambda p, q, ranks, **kw: mallows_rmj_topk(p, q, ranks, neg_log_phi=0.7, **kw),
}


def rewards_of(batch, beta):
    return beta * (batch.policy - batch.ref)


# --- special cases -----------------------------------------------------------------------


def test_mnl_pairwise_is_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.3
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    got = mnl_pairwise(pc, pr, rc, rr, beta=beta, reduction="none")
    torch.testing.assert_close(got, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mnl_pairwise(pc, pr, rc, rr, beta=beta), dpo.mean(), rtol=1e-12, atol=1e-12)


@given(batch=batches(max_s=2, min_s=2))
def test_mnl_top1_of_two_is_dpo(batch):
    # every valid row of an S = 2 batch is a pair: one pick, one other response
    beta = 0.5
    r = rewards_of(batch, beta)
    winner = (batch.ranks == 0).long().argmax(-1, keepdim=True)
    loser = 1 - winner
    dpo = -F.logsigmoid(r.gather(1, winner) - r.gather(1, loser)).squeeze(1)
    got = mnl_topk(batch.policy, batch.ref, torch.where(batch.ranks == 0, 0, UNRANKED), beta=beta, reduction="none")
    torch.testing.assert_close(got, dpo)


def test_mallows_top1_of_two_is_weighted_sigmoid():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    w = torch.rand(32, generator=g, dtype=torch.float64) * 3
    ranks = torch.tensor([[UNRANKED, 0]]).expand(32, 2)
    r = 0.2 * (p - q)
    want = w * torch.sigmoid(r[:, 0] - r[:, 1])  # w * sigma(r_l - r_w)
    got = mallows_rmj_topk(p, q, ranks, beta=0.2, neg_log_phi=w, reduction="none")
    torch.testing.assert_close(got, want)
    got_pair = mallows_rmj_pairwise(p[:, 1], p[:, 0], q[:, 1], q[:, 0], beta=0.2, neg_log_phi=w, reduction="none")
    torch.testing.assert_close(got_pair, want)


@pytest.mark.parametrize("model", ["mnl", "mallows"])
@given(seed=st.integers(0, 2**31), S=st.integers(2, 12))
def test_full_ranking_equals_dropping_the_last_pick(model, seed, S):
    batch = make_batch(seed, 6, S, 2.0)
    n = (batch.ranks != IGNORE).sum(-1, keepdim=True)
    # complete every row to a full ranking of its assortment, then drop its last pick
    present = batch.ranks != IGNORE
    g = torch.Generator().manual_seed(seed)
    key = torch.where(present, torch.rand(batch.ranks.shape, generator=g, dtype=torch.float64), 2.0)
    position = key.argsort(-1).argsort(-1)
    full = torch.where(present, position, IGNORE)
    k_minus_one = torch.where(full == n - 1, UNRANKED, full)
    loss = LOSSES[model]
    torch.testing.assert_close(
        loss(batch.policy, batch.ref, full, reduction="none"),
        loss(batch.policy, batch.ref, k_minus_one, reduction="none"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_discrete_losses_are_topk_with_k_one_and_reject_longer_lists():
    batch = make_batch(3, 5, 6, 1.0)
    ranks = torch.where(batch.ranks > 0, UNRANKED, batch.ranks)
    kw = dict(beta=0.1, reduction="none")
    torch.testing.assert_close(
        mnl_discrete(batch.policy, batch.ref, ranks, **kw), mnl_topk(batch.policy, batch.ref, ranks, **kw)
    )
    torch.testing.assert_close(
        mallows_rmj_discrete(batch.policy, batch.ref, ranks, neg_log_phi=2.0, **kw),
        mallows_rmj_topk(batch.policy, batch.ref, ranks, neg_log_phi=2.0, **kw),
    )
    two = torch.tensor([[0, 1, UNRANKED]])
    with pytest.raises(ValueError, match=r"ranks\[0\].*k = 1"):
        mnl_discrete(torch.zeros(1, 3), torch.zeros(1, 3), two)
    with pytest.raises(ValueError, match=r"ranks\[0\].*k = 1"):
        mallows_rmj_discrete(torch.zeros(1, 3), torch.zeros(1, 3), two)


# --- against the paper's formulas, computed by loops ----------------------------------------


@given(batch=batches())
@example(batch=make_batch(0, 1, 2, 1.0))
@example(batch=make_batch(5, 3, 16, 1e3))
def test_losses_match_the_paper_formulas(batch):
    beta = 0.7
    r = rewards_of(batch, beta)
    w = torch.linspace(0.1, 3.0, r.shape[0], dtype=torch.float64)
    mnl = mnl_topk(batch.policy, batch.ref, batch.ranks, beta=beta, reduction="none")
    mal = mallows_rmj_topk(batch.policy, batch.ref, batch.ranks, beta=beta, neg_log_phi=w, reduction="none")
    for b, (r_row, k_row) in enumerate(zip(oracle.rows(r), oracle.rows(batch.ranks), strict=True)):
        assert mnl[b].item() == pytest.approx(oracle.mnl_topk_row(r_row, k_row), rel=1e-9, abs=1e-9)
        assert mal[b].item() == pytest.approx(oracle.mallows_topk_row(r_row, k_row, w[b].item()), rel=1e-9, abs=1e-12)


@given(batch=batches())
def test_gradients_match_appendix_f(batch):
    beta = 0.5
    w = 1.3
    p = batch.policy.clone().requires_grad_()
    mnl_topk(p, batch.ref, batch.ranks, beta=beta, reduction="sum").backward()
    g_mnl = p.grad.clone()
    p.grad = None
    mallows_rmj_topk(p, batch.ref, batch.ranks, beta=beta, neg_log_phi=w, reduction="sum").backward()
    g_mal = p.grad
    r = rewards_of(batch, beta)
    for b, (r_row, k_row) in enumerate(zip(oracle.rows(r), oracle.rows(batch.ranks), strict=True)):
        want_mnl = [beta * g for g in oracle.mnl_topk_grad_row(r_row, k_row)]  # d r / d logp = beta
        want_mal = [beta * g for g in oracle.mallows_topk_grad_row(r_row, k_row, w)]
        torch.testing.assert_close(g_mnl[b], torch.tensor(want_mnl, dtype=torch.float64), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_mal[b], torch.tensor(want_mal, dtype=torch.float64), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, q, ranks, w: mnl_topk(p, q, ranks, beta=0.7),
        lambda p, q, ranks, w: mallows_rmj_topk(p, q, ranks, beta=0.7, neg_log_phi=w),
        lambda p, q, ranks, w: mnl_topk_from_rewards(p - q, ranks, reduction="sum"),
        lambda p, q, ranks, w: mallows_rmj_topk_from_rewards(p - q, ranks, neg_log_phi=w),
        lambda p, q, ranks, w: mnl_discrete(p, q, torch.where(ranks > 0, UNRANKED, ranks), beta=0.2),
        lambda p, q, ranks, w: mallows_rmj_discrete(p, q, torch.where(ranks > 0, UNRANKED, ranks), neg_log_phi=w),
        lambda p, q, ranks, w: mnl_pairwise(p[:, 0], p[:, 1], q[:, 0], q[:, 1], beta=0.4),
        lambda p, q, ranks, w: mallows_rmj_pairwise(p[:, 0], p[:, 1], q[:, 0], q[:, 1], neg_log_phi=w),
    ],
    ids=[
        "mnl_topk",
        "mallows_topk",
        "mnl_rewards",
        "mallows_rewards",
        "mnl_discrete",
        "mallows_discrete",
        "mnl_pairwise",
        "mallows_pairwise",
    ],
)
def test_gradcheck_fp64(fn):
    g = torch.Generator().manual_seed(7)
    ranks = torch.tensor([[1, UNRANKED, 0, IGNORE, UNRANKED], [0, 1, 2, 3, 4], [UNRANKED, 0, IGNORE, IGNORE, 1]])
    p = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    # pairwise variants read columns 0 and 1, which are valid in every row
    assert torch.autograd.gradcheck(lambda p, q, w: fn(p, q, ranks, w), (p, q, w))
    assert torch.autograd.gradgradcheck(lambda p, q, w: fn(p, q, ranks, w), (p, q, w))


# --- invariances -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mnl", "mallows"])
@given(batch=batches(), shift=st.floats(-50, 50))
def test_a_constant_per_row_changes_nothing(model, batch, shift):
    loss = LOSSES[model]
    shifts = shift * torch.arange(batch.ranks.shape[0], dtype=torch.float64)[:, None]
    a = loss(batch.policy, batch.ref, batch.ranks, beta=1.0, reduction="none")
    b = loss(batch.policy + shifts, batch.ref, batch.ranks, beta=1.0, reduction="none")
    # the shift is exact in rewards only up to rounding of r + c at the reward scale
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + abs(shift)) / batch.scale)


@pytest.mark.parametrize("model", ["mnl", "mallows"])
@given(batch=batches(), seed=st.integers(0, 2**31))
def test_permuting_slots_permutes_the_gradient(model, batch, seed):
    loss = LOSSES[model]
    S = batch.ranks.shape[1]
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(seed))
    p = batch.policy.clone().requires_grad_()
    pp = batch.policy[:, perm].clone().requires_grad_()
    a = loss(p, batch.ref, batch.ranks, beta=0.3, reduction="none")
    b = loss(pp, batch.ref[:, perm], batch.ranks[:, perm], beta=0.3, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(p.grad[:, perm], pp.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", ["mnl", "mallows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@given(batch=batches())
def test_padding_values_never_matter(model, dtype, batch):
    loss = LOSSES[model]
    pad = batch.ranks == IGNORE
    clean_p = batch.policy.masked_fill(pad, 0.0).to(dtype).requires_grad_()
    dirty_p = batch.policy.to(dtype).requires_grad_()  # NaN / inf / 0 in padding slots
    ref_clean = batch.ref.masked_fill(pad, 0.0).to(dtype)
    a = loss(clean_p, ref_clean, batch.ranks, beta=0.1, reduction="none")
    b = loss(dirty_p, batch.ref.to(dtype), batch.ranks, beta=0.1, reduction="none")
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(clean_p.grad, dirty_p.grad)
    assert dirty_p.grad.dtype == dtype
    assert torch.all(dirty_p.grad[pad] == 0)


# --- dtypes and reductions --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", ["mnl", "mallows"])
def test_half_precision_inputs_compute_in_fp32(model, dtype):
    batch = make_batch(11, 16, 8, 3.0, 0.0)
    loss = LOSSES[model]
    p, q = batch.policy.to(dtype), batch.ref.to(dtype)
    got = loss(p, q, batch.ranks, beta=0.5, reduction="none")
    assert got.dtype == torch.float32
    # same numbers as fp64 math on the same (rounded) inputs, to fp32 accuracy
    want = loss(p.double(), q.double(), batch.ranks, beta=0.5, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_reductions():
    batch = make_batch(2, 7, 5, 1.0)
    per_row = mnl_topk(batch.policy, batch.ref, batch.ranks, reduction="none")
    assert per_row.shape == (7,)
    torch.testing.assert_close(mnl_topk(batch.policy, batch.ref, batch.ranks), per_row.mean())
    torch.testing.assert_close(mnl_topk(batch.policy, batch.ref, batch.ranks, reduction="sum"), per_row.sum())


def test_invalid_rows_are_left_out_of_the_mean_without_validation():
    ranks = torch.tensor([[0, UNRANKED], [IGNORE, IGNORE], [UNRANKED, 0]])
    p = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")], [0.0, 2.0]])
    per_row = mnl_topk(p, None, ranks, beta=1.0, reduction="none", validate=False)
    assert per_row[1] == 0
    mean = mnl_topk(p, None, ranks, beta=1.0, validate=False)
    torch.testing.assert_close(mean, (per_row[0] + per_row[2]) / 2)


def test_reference_free_and_reward_variants():
    batch = make_batch(4, 6, 5, 1.0, 0.0)
    lengths = torch.randint(1, 50, batch.ranks.shape).double()
    r = implicit_rewards(batch.policy, None, beta=2.0, lengths=lengths, length_normalize=True)
    torch.testing.assert_close(r, 2.0 * batch.policy / lengths)
    r_dpo = implicit_rewards(batch.policy, batch.ref, beta=0.5, lengths=lengths, length_penalty=0.01)
    torch.testing.assert_close(r_dpo, 0.5 * (batch.policy - batch.ref) - 0.01 * lengths)
    torch.testing.assert_close(
        mnl_topk(batch.policy, None, batch.ranks, beta=2.0, reduction="none"),
        mnl_topk_from_rewards(2.0 * batch.policy, batch.ranks, reduction="none"),
    )


def test_neg_log_phi_is_a_weight_with_an_optional_gradient():
    batch = make_batch(6, 4, 5, 1.0)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    per_row = mallows_rmj_topk(batch.policy, batch.ref, batch.ranks, neg_log_phi=w, reduction="none")
    unit = mallows_rmj_topk(batch.policy, batch.ref, batch.ranks, neg_log_phi=1.0, reduction="none")
    torch.testing.assert_close(per_row, w.detach() * unit)
    per_row.sum().backward()
    torch.testing.assert_close(w.grad, unit)
    assert per_row[3] == 0


def test_loss_values_by_hand():
    # row: y_1 = slot 0, y_2 = slot 1, slot 2 unranked; rewards 2, 1, 0; n = 3, k = 2
    ranks = torch.tensor([[0, 1, UNRANKED]])
    r = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mnl = math.log(math.exp(2) + math.exp(1) + 1) - 2 + math.log(math.exp(1) + 1) - 1
    mal = 0.5 * ((3 - 1) * oracle.sigmoid(1 - 2) + oracle.sigmoid(0 - 1))
    assert mnl_topk_from_rewards(r, ranks).item() == pytest.approx(mnl, rel=1e-14)
    assert mallows_rmj_topk_from_rewards(r, ranks, neg_log_phi=0.5).item() == pytest.approx(mal, rel=1e-14)


@settings(max_examples=20)
@given(batch=batches(max_b=4, max_s=6))
def test_large_rewards_stay_finite(batch):
    p = batch.policy.masked_fill(batch.ranks == IGNORE, 0.0) * 1e4
    for model in LOSSES:
        out = LOSSES[model](p.float(), None, batch.ranks, beta=1.0, reduction="none")
        assert torch.isfinite(out).all()


@given(n=st.integers(2, 7), k=st.integers(1, 7), w=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_mallows_topk_at_equal_rewards_has_the_discrete_gradient(n, k, w, seed):
    """At r = 0 every sigma' is 1/4 and the (n - i) weights cancel picks 2..k: w/4 [-(n-1), 1, ..., 1]."""
    k = min(k, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ranks = torch.full((1, n), UNRANKED)
    ranks[0, perm[:k]] = torch.arange(k)
    policy = torch.zeros(1, n, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mallows_rmj_topk(policy, torch.zeros(1, n, dtype=torch.float64), ranks,
                                                   beta=1.0, neg_log_phi=w), policy)  # fmt: skip
    want = torch.full((1, n), w / 4, dtype=torch.float64)
    want[0, perm[0]] = -(n - 1) * w / 4
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
