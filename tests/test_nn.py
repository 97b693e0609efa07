"""rcpo_losses.nn: the module losses equal the functional ones bitwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rcpo_losses as F
from rcpo_losses import nn as rnn

from .strategies import batches

LISTWISE = [
    (rnn.MNLTopKLoss, F.mnl_topk, False, False),
    (rnn.MNLDiscreteLoss, F.mnl_discrete, False, True),
    (rnn.MallowsRMJTopKLoss, F.mallows_rmj_topk, True, False),
    (rnn.MallowsRMJDiscreteLoss, F.mallows_rmj_discrete, True, True),
]
PAIRWISE = [(rnn.MNLPairwiseLoss, F.mnl_pairwise, False), (rnn.MallowsRMJPairwiseLoss, F.mallows_rmj_pairwise, True)]


def discrete(ranks: torch.Tensor) -> torch.Tensor:
    """Keep only each row's pick: top-k lists become single-best feedback."""
    return torch.where(ranks > 0, F.UNRANKED, ranks)


@pytest.mark.parametrize(("cls", "fn", "mallows", "is_discrete"), LISTWISE)
@settings(max_examples=15)
@given(
    batch=batches(max_b=4, max_s=6),
    beta=st.sampled_from([0.01, 0.5, 2.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_listwise_modules_equal_functions_bitwise(cls, fn, mallows, is_discrete, batch, beta, reduction):
    ranks = discrete(batch.ranks) if is_discrete else batch.ranks
    extra = {"neg_log_phi": torch.rand(ranks.shape[0], dtype=torch.float64) + 0.1} if mallows else {}
    module = cls(beta=beta, reduction=reduction)
    policy = batch.policy.clone().requires_grad_(True)
    got = module(policy, batch.ref, ranks, **extra)
    (g_got,) = torch.autograd.grad(got.sum(), policy)
    want = fn(policy, batch.ref, ranks, beta=beta, reduction=reduction, **extra)
    (g_want,) = torch.autograd.grad(want.sum(), policy)
    assert torch.equal(got, want)
    assert torch.equal(torch.nan_to_num(g_got), torch.nan_to_num(g_want))


@pytest.mark.parametrize(("cls", "fn", "mallows"), PAIRWISE)
@pytest.mark.parametrize("reference_free", [False, True])
def test_pairwise_modules_equal_functions_bitwise(cls, fn, mallows, reference_free):
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = torch.randn(4, 7, generator=g)
    refs = (None, None) if reference_free else (ref_c, ref_r)
    extra = {"neg_log_phi": 0.7} if mallows else {}
    got = cls(beta=0.3, reduction="none")(chosen, rejected, *refs, **extra)
    want = fn(chosen, rejected, *refs, beta=0.3, reduction="none", **extra)
    assert torch.equal(got, want)


def test_repr_shows_the_settings():
    assert repr(rnn.MallowsRMJTopKLoss(beta=0.01)) == (
        "MallowsRMJTopKLoss(beta=0.01, reduction='mean', backend='auto', validate=True)"
    )
    assert "reduction='none'" in repr(rnn.MNLPairwiseLoss(reduction="none"))


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        rnn.MNLTopKLoss(beta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        rnn.MallowsRMJDiscreteLoss(reduction="avg")


def test_validation_reaches_the_function():
    ranks = torch.tensor([[0, 1, F.UNRANKED]])  # k = 2: not single-best
    with pytest.raises(ValueError, match=r"ranks\[0\]"):
        rnn.MNLDiscreteLoss()(torch.zeros(1, 3), torch.zeros(1, 3), ranks)
    with pytest.raises(ValueError, match="neg_log_phi"):
        rnn.MallowsRMJTopKLoss()(torch.zeros(1, 3), torch.zeros(1, 3), ranks, neg_log_phi=-1.0)


def test_modules_hold_no_parameters_and_compose():
    loss = torch.nn.ModuleDict({"mnl": rnn.MNLTopKLoss(), "mallows": rnn.MallowsRMJTopKLoss()})
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
