"""Bad input gets an error that names the argument, the row and the problem (DESIGN.md)."""

from __future__ import annotations

import pytest
import torch

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    mallows_rmj_log_likelihood,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mnl_log_likelihood,
    mnl_pairwise,
    mnl_topk,
    mnl_topk_from_rewards,
)

GOOD = torch.tensor([[0, UNRANKED, IGNORE], [1, 0, UNRANKED]])


def call(ranks=GOOD, policy=None, ref=None, loss=mnl_topk, **kw):
    policy = torch.zeros(ranks.shape) if policy is None else policy
    ref = torch.zeros(ranks.shape) if ref is None else ref
    return loss(policy, ref, ranks, **kw)


@pytest.mark.parametrize("loss", [mnl_topk, mallows_rmj_topk])
@pytest.mark.parametrize(
    "ranks, match",
    [
        ([[0, UNRANKED, IGNORE], [0, 0, UNRANKED]], r"ranks\[1\]: ranked entries must be 0..k-1 once each"),
        ([[0, UNRANKED, IGNORE], [0, 2, UNRANKED]], r"ranks\[1\]: ranked entries must be 0..k-1 once each"),
        ([[1, UNRANKED, IGNORE], [0, 1, UNRANKED]], r"ranks\[0\]: ranked entries must be 0..k-1"),
        ([[0, 1, 7], [0, 1, UNRANKED]], r"ranks\[0\]: ranked entries must be 0..k-1"),
        ([[0, IGNORE, IGNORE], [0, 1, UNRANKED]], r"ranks\[0\]: a row needs at least two responses"),
        ([[0, UNRANKED, IGNORE], [IGNORE, IGNORE, IGNORE]], r"ranks\[1\]: a row needs at least two responses"),
        ([[0, UNRANKED, IGNORE], [UNRANKED, UNRANKED, IGNORE]], r"ranks\[1\]: a row needs at least one ranked"),
        ([[0, UNRANKED, -7], [0, 1, UNRANKED]], r"ranks\[0\]: entries must be >= 0"),
    ],
)
def test_bad_rank_rows(loss, ranks, match):
    with pytest.raises(ValueError, match=match):
        call(torch.tensor(ranks), loss=loss)


def test_ranks_type_and_shape():
    with pytest.raises(TypeError, match="ranks: expected an integer tensor"):
        call(GOOD.float())
    with pytest.raises(TypeError, match="ranks: expected a torch.Tensor"):
        mnl_topk(torch.zeros(2, 3), torch.zeros(2, 3), GOOD.tolist())
    with pytest.raises(ValueError, match=r"ranks: expected a \[B, S\] tensor"):
        call(GOOD[0], policy=torch.zeros(3), ref=torch.zeros(3))


@pytest.mark.parametrize("loss", [mnl_topk, mallows_rmj_topk])
def test_logps_shape_device_dtype(loss):
    with pytest.raises(ValueError, match=r"policy_logps: shape \(2, 4\) does not match ranks \(2, 3\)"):
        call(policy=torch.zeros(2, 4), loss=loss)
    with pytest.raises(ValueError, match=r"ref_logps: shape"):
        call(ref=torch.zeros(3, 3), loss=loss)
    with pytest.raises(TypeError, match="policy_logps: expected a float16/bfloat16/float32/float64"):
        call(policy=torch.zeros(2, 3, dtype=torch.int64), loss=loss)
    with pytest.raises(ValueError, match="policy_logps: on meta but ranks is on cpu"):
        call(policy=torch.zeros(2, 3, device="meta"), loss=loss)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("slot", [(1, 1), (1, 2), (0, 0)])  # ranked, unranked, ranked-first
def test_non_finite_logps_in_the_assortment(bad, slot):
    policy = torch.zeros(2, 3)
    policy[slot] = bad
    with pytest.raises(ValueError, match=rf"policy_logps\[{slot[0]}\]: slot {slot[1]} is in the assortment"):
        call(policy=policy)
    with pytest.raises(ValueError, match=rf"ref_logps\[{slot[0]}\]: slot {slot[1]}"):
        call(ref=policy)
    with pytest.raises(ValueError, match=rf"rewards\[{slot[0]}\]: slot {slot[1]}"):
        mnl_topk_from_rewards(policy, GOOD)


def test_non_finite_padding_is_fine():
    policy = torch.zeros(2, 3)
    policy[0, 2] = float("nan")
    assert torch.isfinite(call(policy=policy))


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf"), float("nan")])
def test_beta(beta):
    with pytest.raises(ValueError, match="beta: must be a finite number > 0"):
        call(beta=beta)


def test_beta_type():
    with pytest.raises(TypeError, match="beta"):
        call(beta=torch.tensor(0.1))


@pytest.mark.parametrize("w", [-0.5, float("inf"), float("nan")])
def test_neg_log_phi_float(w):
    with pytest.raises(ValueError, match="neg_log_phi: must be finite and >= 0"):
        call(loss=mallows_rmj_topk, neg_log_phi=w)


def test_neg_log_phi_tensor():
    with pytest.raises(ValueError, match=r"neg_log_phi\[1\]: must be finite and >= 0, got -1.0"):
        call(loss=mallows_rmj_topk, neg_log_phi=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"neg_log_phi\[0\]: must be finite"):
        call(loss=mallows_rmj_topk, neg_log_phi=torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match=r"neg_log_phi: expected a scalar or shape \(2,\)"):
        call(loss=mallows_rmj_topk, neg_log_phi=torch.ones(3))
    with pytest.raises(TypeError, match="neg_log_phi: expected a float tensor"):
        call(loss=mallows_rmj_topk, neg_log_phi=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="neg_log_phi"):
        call(loss=mallows_rmj_topk, neg_log_phi="1")
    with pytest.raises(ValueError, match="neg_log_phi"):
        mallows_rmj_log_likelihood(torch.zeros(2, 3), GOOD, -1.0)


def test_reduction_and_backend():
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none', got 'avg'"):
        call(reduction="avg")
    with pytest.raises(ValueError, match="backend: expected one of"):
        call(backend="cuda")


def test_pairwise_shapes():
    with pytest.raises(ValueError, match=r"policy_rejected_logps: expected shape \(4,\)"):
        mnl_pairwise(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="ref_chosen_logps, ref_rejected_logps: pass both or neither"):
        mallows_rmj_pairwise(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"policy_chosen_logps: expected a \[B\] tensor, got shape \(4, 2\)"):
        mnl_pairwise(torch.zeros(4, 2), torch.zeros(4, 2))


def test_likelihoods_validate_too():
    with pytest.raises(ValueError, match=r"ranks\[1\]"):
        mnl_log_likelihood(torch.zeros(2, 3), torch.tensor([[0, UNRANKED, IGNORE], [0, 0, UNRANKED]]))


def test_validate_false_skips_value_checks_but_not_shapes():
    bad = torch.tensor([[0, UNRANKED, IGNORE], [0, 0, UNRANKED]])
    call(bad, validate=False)  # no error, no sync
    with pytest.raises(ValueError, match="policy_logps: shape"):
        call(policy=torch.zeros(2, 4), validate=False)


def test_inputs_are_not_modified():
    policy = torch.tensor([[1.0, 2.0, float("nan")], [0.5, 0.25, -1.0]])
    ref = policy.clone()
    ranks = GOOD.clone()
    before = (policy.clone(), ref.clone(), ranks.clone())
    call(ranks, policy, ref, loss=mallows_rmj_topk, neg_log_phi=torch.tensor([1.0, 2.0]))
    assert torch.equal(ranks, before[2])
    assert torch.allclose(policy, before[0], equal_nan=True) and torch.allclose(ref, before[1], equal_nan=True)
