"""Edge cases of issue 10: invalid rows without validation, overflow, double backward, odd arguments.

Each test failed before its fix. The Triton choice kernels run under the interpreter on
the CPU (``TRITON_INTERPRET=1``, set by conftest.py) and compiled on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    mallows_rmj_discrete,
    mallows_rmj_log_likelihood,
    mallows_rmj_pairwise,
    mallows_rmj_topk,
    mallows_rmj_topk_from_rewards,
    mnl_discrete,
    mnl_log_likelihood,
    mnl_pairwise,
    mnl_topk,
    mnl_topk_from_rewards,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]

LOSSES = {
    "mnl": lambda p, q, ranks, **kw: mnl_topk(p, q, ranks, **kw),
    "mallows": lambda p, q, ranks, **kw: mallows_rmj_topk(p, q, ranks, neg_log_phi=0.7, **kw),
    "mnl_rewards": lambda p, q, ranks, **kw: mnl_topk_from_rewards(p, ranks, **kw),
    "mallows_rewards": lambda p, q, ranks, **kw: mallows_rmj_topk_from_rewards(p, ranks, neg_log_phi=0.7, **kw),
}

# --- item 2: invalid rows without validation ------------------------------------------------

# Rows 1, 3, 5, 6 are invalid in ways the old valid_rows (n >= 2 and k >= 1) did not see:
# a duplicate rank, a gap, an illegal code, a rank past S. Rows 7, 8 are invalid for it too.
MIXED = torch.tensor(
    [
        [0, UNRANKED, IGNORE, 1],
        [0, 0, UNRANKED, IGNORE],  # duplicate rank 0
        [1, 0, UNRANKED, UNRANKED],
        [0, 2, UNRANKED, IGNORE],  # gap: no rank 1
        [UNRANKED, 0, IGNORE, IGNORE],
        [0, -5, UNRANKED, IGNORE],  # -5 is neither UNRANKED nor IGNORE
        [0, 1, 7, UNRANKED],  # rank 7 >= S
        [UNRANKED, UNRANKED, IGNORE, IGNORE],  # no pick
        [0, IGNORE, IGNORE, IGNORE],  # one response
    ]
)
VALID = torch.tensor([True, False, True, False, True, False, False, False, False])


def _mixed_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(MIXED.shape, generator=g, dtype=dtype)
    policy[1, 3] = float("nan")  # padding of an invalid row: must not leak
    return policy.to(DEVICE), MIXED.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", sorted(LOSSES))
def test_invalid_rows_get_loss_zero_and_leave_the_mean(model, backend):
    policy, ranks = _mixed_inputs()
    loss_fn = LOSSES[model]
    p = policy.clone().requires_grad_()
    per_row = loss_fn(p, None, ranks, reduction="none", backend=backend, validate=False)
    (grad,) = torch.autograd.grad(per_row.sum(), p)
    assert torch.all(per_row[~VALID] == 0)
    assert torch.all(grad[~VALID] == 0)
    # the valid rows alone, validated, give the same values
    valid_only = loss_fn(policy[VALID], None, ranks[VALID], reduction="none", backend=backend)
    torch.testing.assert_close(per_row[VALID], valid_only, rtol=1e-12, atol=1e-12)
    mean = loss_fn(policy, None, ranks, backend=backend, validate=False)
    torch.testing.assert_close(mean, valid_only.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", sorted(LOSSES))
def test_invalid_rows_agree_across_backends(model):
    policy, ranks = _mixed_inputs(torch.float32)
    out = {}
    for backend in BACKENDS:
        p = policy.clone().requires_grad_()
        loss = LOSSES[model](p, None, ranks, backend=backend, validate=False)
        out[backend] = (loss, torch.autograd.grad(loss, p)[0])
    for a, b in zip(out["triton"], out["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_likelihoods_of_invalid_rows_are_zero_without_validation():
    policy, ranks = _mixed_inputs()
    for ll in (
        mnl_log_likelihood(policy, ranks, validate=False),
        mallows_rmj_log_likelihood(policy, ranks, 0.5, validate=False),
    ):
        assert torch.isfinite(ll).all() and torch.all(ll[~VALID] == 0)
        assert torch.all(ll[VALID] < 0)


@pytest.mark.parametrize("model", ["mnl", "mallows"])
def test_invalid_rows_under_torch_compile(model):
    """Under torch.compile the value checks never run: the mask alone keeps the loss right."""
    torch._dynamo.reset()
    policy, ranks = _mixed_inputs(torch.float32)
    loss_fn = LOSSES[model]

    def fn(p, ranks):
        return loss_fn(p, None, ranks, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    p = policy.clone().requires_grad_()
    loss = compiled(p, ranks)
    (grad,) = torch.autograd.grad(loss, p)
    want = loss_fn(policy[VALID], None, ranks[VALID], backend="torch")
    torch.testing.assert_close(loss, want)
    assert torch.all(grad[~VALID] == 0)


def test_discrete_rows_with_k_not_one_are_left_out_without_validation():
    ranks = torch.tensor([[0, UNRANKED, UNRANKED], [0, 1, UNRANKED], [UNRANKED, 0, IGNORE]])
    policy = torch.randn(3, 3, dtype=torch.float64)
    keep = torch.tensor([True, False, True])
    for loss_fn in (mnl_discrete, mallows_rmj_discrete):
        per_row = loss_fn(policy, None, ranks, reduction="none", validate=False)
        assert per_row[1] == 0
        torch.testing.assert_close(per_row[keep], loss_fn(policy[keep], None, ranks[keep], reduction="none"))


# --- item 1: every custom op agrees with its fake on non-contiguous inputs --------------------


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` ``[N, M]``, dense but column-major (strides ``(1, N)``)."""
    return x.t().contiguous().t()


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` ``[N]`` at stride 2."""
    return torch.stack([x, torch.zeros_like(x)], -1)[:, 0]


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck_fused_linear_on_non_contiguous_inputs(use_triton):
    from rcpo_losses.ops.fused_linear import fused_linear_token_stats_backward_op, fused_linear_token_stats_op

    g = torch.Generator().manual_seed(1)
    N, H, V = 7, 5, 11
    dev = DEVICE if use_triton else "cpu"
    h = _transposed(torch.randn(N, H, generator=g)).to(dev)
    W = _transposed(torch.randn(V, H, generator=g)).to(dev)
    b = _strided(torch.randn(V, generator=g)).to(dev)
    t = _strided(torch.tensor([0, 10, -100, 3, 3, 7, -100])).to(dev)
    assert not h.is_contiguous() and not t.is_contiguous()
    args = (h.requires_grad_(), W.requires_grad_(), b.requires_grad_(), t, -100, 3, use_triton, True)
    torch.library.opcheck(fused_linear_token_stats_op, args)
    _, ent, lse = fused_linear_token_stats_op(h.detach(), W.detach(), b.detach(), t, -100, 3, use_triton, True)
    g_logp, g_ent = _strided(torch.randn(N, generator=g)).to(dev), _strided(torch.randn(N, generator=g)).to(dev)
    for need in [(True, True, True), (True, False, False), (False, True, True)]:
        bw_args = (h.detach(), W.detach(), b.detach(), t, lse, ent, g_logp, g_ent, -100, 3, use_triton, True, *need)
        torch.library.opcheck(fused_linear_token_stats_backward_op, bw_args)


def test_opcheck_token_stats_on_non_contiguous_inputs():
    from rcpo_losses.ops.token_stats import token_stats, token_stats_backward

    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 48, generator=g).to(DEVICE)[:, :40]  # the kernel needs unit stride along V only
    t = _strided(torch.tensor([0, 39, -100, 4, 7, 8])).to(DEVICE)
    torch.library.opcheck(token_stats, (z.requires_grad_(), t, -100, 16))
    _, ent, lse = token_stats(z.detach(), t, -100, 16)
    g_logp, g_ent = _strided(torch.randn(6, generator=g)).to(DEVICE), _strided(torch.randn(6, generator=g)).to(DEVICE)
    torch.library.opcheck(token_stats_backward, (z.detach(), t, lse, ent, g_logp, g_ent, -100, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_choice_ops_on_non_contiguous_inputs(dtype):
    from rcpo_losses.ops import choice as choice_ops  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(3)
    ranks = _transposed(MIXED[VALID].to(DEVICE))
    r = _transposed(torch.randn(ranks.shape, generator=g, dtype=dtype)).to(DEVICE)
    w = _strided(torch.rand(ranks.shape[0], generator=g, dtype=dtype)).to(DEVICE)
    grad = _strided(torch.randn(ranks.shape[0], generator=g, dtype=dtype)).to(DEVICE)
    ops = torch.ops.rcpo_losses
    torch.library.opcheck(ops.mnl_topk, (r.clone().requires_grad_(), ranks))
    torch.library.opcheck(ops.mallows_rmj_topk, (r.clone().requires_grad_(), ranks, w.clone().requires_grad_()))
    torch.library.opcheck(ops.mnl_topk_backward, (grad, r, ranks))
    torch.library.opcheck(ops.mallows_rmj_topk_backward, (grad, r, ranks, w))


def test_compiled_fused_linear_backward_with_a_transposed_hidden():
    import warnings

    from rcpo_losses import fused_linear_token_stats

    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0, 10, -100, 3, 3, 7])

    def f(h, W):
        logp, ent = fused_linear_token_stats(h, W, t, chunk_size=4, backend="torch")
        return (logp + 0.5 * ent).sum()

    base = torch.randn(5, 6, generator=g)  # hidden = base.T: dense, strides (1, 6)
    W = torch.randn(11, 5, generator=g)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x1 = base.clone().requires_grad_()
        torch.compile(f, fullgraph=True)(x1.t(), W).backward()
    x2 = base.clone().requires_grad_()
    f(x2.t(), W).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# --- item 4: rewards that overflow the compute dtype --------------------------------------------

PAIR = torch.tensor([[0, UNRANKED], [UNRANKED, 0]])


@pytest.mark.parametrize("loss_fn", [mnl_topk, mallows_rmj_topk])
def test_beta_that_overflows_the_compute_dtype_is_rejected(loss_fn):
    p = torch.tensor([[1.0, 0.0], [0.5, 0.25]])
    with pytest.raises(ValueError, match=r"beta: 1e\+39 overflows torch.float32"):
        loss_fn(p, None, PAIR, beta=1e39)
    with pytest.raises(ValueError, match="beta: 1e\\+39 overflows"):
        loss_fn(p, None, PAIR, beta=1e39, validate=False)  # free: no sync needed
    with pytest.raises(ValueError, match="beta: 1e\\+39 overflows"):
        mnl_pairwise(p[:, 0], p[:, 1], beta=1e39)
    # fp64 log-probs compute in fp64, where 1e39 is an ordinary number
    assert torch.isfinite(loss_fn(p.double(), None, PAIR, beta=1e39))


@pytest.mark.parametrize("loss_fn", [mnl_topk, mallows_rmj_topk])
def test_rewards_that_overflow_are_rejected_naming_the_inputs(loss_fn):
    policy = torch.tensor([[1.0, 3e38], [0.5, 0.25]])
    ref = torch.tensor([[0.0, -3e38], [0.0, 0.0]])
    msg = r"beta \* \(policy_logps - ref_logps\): the reward of row 0, slot 1 overflows torch.float32"
    with pytest.raises(ValueError, match=msg):
        loss_fn(policy, ref, PAIR, beta=1.0)
    with pytest.raises(ValueError, match=r"beta \* policy_logps: the reward of row 0, slot 1 overflows"):
        loss_fn(policy, None, PAIR, beta=10.0)
    with pytest.raises(
        ValueError, match=r"beta \* \(policy_rejected_logps - ref_rejected_logps\): the reward of row 0"
    ):
        mnl_pairwise(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=1.0)


def test_neg_log_phi_that_overflows_is_rejected():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.25]])
    with pytest.raises(ValueError, match=r"neg_log_phi: 1e\+39 overflows torch.float32"):
        mallows_rmj_topk(p, None, PAIR, neg_log_phi=1e39)
    with pytest.raises(ValueError, match=r"neg_log_phi\[1\]: must be finite and >= 0, got 1e\+39 \(overflows"):
        mallows_rmj_topk(p, None, PAIR, neg_log_phi=torch.tensor([1.0, 1e39], dtype=torch.float64))


# --- item 10: the pairwise losses name the argument the user passed ---------------------------


@pytest.mark.parametrize("loss_fn", [mnl_pairwise, mallows_rmj_pairwise])
def test_pairwise_errors_name_the_pairwise_argument(loss_fn):
    x = torch.zeros(3)
    bad = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"^policy_rejected_logps\[1\]: must be finite, got nan$"):
        loss_fn(x, bad)
    with pytest.raises(ValueError, match=r"^policy_chosen_logps\[1\]: must be finite, got nan$"):
        loss_fn(bad, x, x, x)
    with pytest.raises(ValueError, match=r"^ref_rejected_logps\[1\]: must be finite, got nan$"):
        loss_fn(x, x, x, bad)
    with pytest.raises(ValueError, match=r"^policy_chosen_logps: expected a \[B\] tensor, got shape \(\)$"):
        loss_fn(torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^policy_rejected_logps: expected shape \(3,\) .*got \(\)$"):
        loss_fn(x, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^ref_chosen_logps: expected shape \(3,\) .*got \(3, 1\)$"):
        loss_fn(x, x, x[:, None], x)


# --- item 7: double backward ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["mnl", "mallows"])
def test_gradgradcheck_choice_losses(model, backend):
    """Second-order gradients of the choice losses, on both backends, in fp64."""
    ranks = MIXED[VALID].to(DEVICE)
    g = torch.Generator().manual_seed(5)
    r = torch.randn(ranks.shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.tensor([0.5, 1.5, 0.7], dtype=torch.float64, device=DEVICE, requires_grad=True)
    if model == "mnl":
        inputs, fn = (r,), lambda x: mnl_topk_from_rewards(x, ranks, reduction="none", backend=backend)
    else:

        def fn(x, v):
            return mallows_rmj_topk_from_rewards(x, ranks, neg_log_phi=v, reduction="none", backend=backend)

        inputs = (r, w)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_hessian_of_the_choice_losses_agrees_across_backends():
    ranks = MIXED[VALID].to(DEVICE)
    r = torch.randn(ranks.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(DEVICE)
    hess = {
        backend: torch.autograd.functional.hessian(
            lambda x, b=backend: (
                mnl_topk_from_rewards(x, ranks, backend=b)
                + mallows_rmj_topk_from_rewards(x, ranks, neg_log_phi=0.3, backend=b)
            ),
            r,
        )
        for backend in BACKENDS
    }
    torch.testing.assert_close(hess["triton"], hess["torch"], rtol=1e-12, atol=1e-14)
    assert hess["torch"].abs().sum() > 0


def _token_double_backward(path: str, backend: str):
    from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy

    g = torch.Generator().manual_seed(7)
    t = torch.tensor([1, 2, -100]).to(DEVICE)
    if path == "logits":
        x = torch.randn(3, 7, generator=g).to(DEVICE).requires_grad_()
        logp, ent = token_logps_and_entropy(x, t, backend=backend)
    else:
        x = torch.randn(3, 4, generator=g).to(DEVICE).requires_grad_()
        W = torch.randn(7, 4, generator=g).to(DEVICE)
        logp, ent = fused_linear_token_stats(x, W, t, backend=backend)
    (grad,) = torch.autograd.grad((logp + ent).sum(), x, create_graph=True)
    return torch.autograd.grad(grad.pow(2).sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_token_double_backward_raises_one_clear_error(path, backend):
    name = "token_logps_and_entropy" if path == "logits" else "fused_linear_token_stats"
    with pytest.raises(RuntimeError, match=rf"^{name}: double backward .* is not supported"):
        _token_double_backward(path, backend)


# --- item 3: entropy_dispersion_from_logits checks the shape of ranks -------------------------


def test_entropy_dispersion_from_logits_rejects_transposed_ranks():
    from rcpo_losses import entropy_dispersion_from_logits

    B, S, T, V = 2, 3, 4, 5
    logits = torch.randn(B, S, T, V)
    labels = torch.randint(0, V, (B, S, T))
    ranks = torch.tensor([[0, UNRANKED, UNRANKED], [1, 0, IGNORE]])
    assert entropy_dispersion_from_logits(logits, labels, ranks).shape == (B,)
    # flat (B * S, T, V) logits with (B, S) ranks are fine
    flat = entropy_dispersion_from_logits(logits.view(B * S, T, V), labels.view(B * S, T), ranks)
    torch.testing.assert_close(flat, entropy_dispersion_from_logits(logits, labels, ranks))
    with pytest.raises(ValueError, match=r"^ranks: shape \(3, 2\) does not match the responses of logits"):
        entropy_dispersion_from_logits(logits, labels, ranks.t().contiguous())
    with pytest.raises(ValueError, match=r"^ranks: expected a \[B, S\] tensor, got shape \(6,\)"):
        entropy_dispersion_from_logits(logits.view(B * S, T, V), labels.view(B * S, T), ranks.reshape(-1))


# --- item 5: entropy_dispersion validates its inputs ------------------------------------------


def _dispersion_inputs():
    ranks = torch.tensor([[0, UNRANKED, IGNORE], [1, 0, UNRANKED]])
    h = torch.tensor([[3.0, 2.0, float("nan")], [1.0, 4.0, 2.5]])  # NaN in padding is fine
    lengths = torch.tensor([[3, 4, -1], [2, 5, 3]])
    return h, lengths, ranks


def test_entropy_dispersion_validates_its_inputs():
    from rcpo_losses import entropy_dispersion

    h, lengths, ranks = _dispersion_inputs()
    w = entropy_dispersion(h, lengths, ranks, 50)
    assert torch.isfinite(w).all() and (w >= 0).all()
    for value, rule in ((float("nan"), "finite and >= 0"), (-1.0, "finite and >= 0"), (float("inf"), "finite")):
        bad = h.clone()
        bad[1, 2] = value
        with pytest.raises(ValueError, match=rf"^entropy_sums\[1\]: slot 2 is in the assortment but holds .*{rule}"):
            entropy_dispersion(bad, lengths, ranks, 50)
    bad = lengths.clone()
    bad[0, 1] = -3
    with pytest.raises(ValueError, match=r"^lengths\[0\]: slot 1 is in the assortment but holds -3"):
        entropy_dispersion(h, bad, ranks, 50)
    for scale in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^scale: must be finite and >= 0"):
            entropy_dispersion(h, lengths, ranks, 50, variant="mallowspo", scale=scale)
    with pytest.raises(TypeError, match=r"^scale: expected a Python float"):
        entropy_dispersion(h, lengths, ranks, 50, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^vocab_size"):
        entropy_dispersion(h, lengths, ranks, 1)
    with pytest.raises(TypeError, match=r"^entropy_sums: expected a float tensor"):
        entropy_dispersion(lengths, lengths, ranks, 50)
    with pytest.raises(ValueError, match=r"^lengths: shape \(3, 2\) does not match ranks \(2, 3\)"):
        entropy_dispersion(h, lengths.t(), ranks, 50)
    # unvalidated: no sync, no error (the caller vouches for the values)
    entropy_dispersion(h.abs(), lengths.abs(), ranks, 50, validate=False)


# --- item 6: ranking_metrics and all_pairs check the ranks -----------------------------------

DUPLICATE_TOP = torch.tensor([[0, 0, UNRANKED], [1, 0, UNRANKED]])


def test_ranking_metrics_and_all_pairs_check_the_ranks():
    from rcpo_losses import all_pairs, ranking_metrics

    r = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.5, -1.0]])
    with pytest.raises(ValueError, match=r"^ranks\[0\]: ranked entries must be 0..k-1 once each"):
        ranking_metrics(r, DUPLICATE_TOP)
    with pytest.raises(ValueError, match=r"^ranks\[0\]: ranked entries must be 0..k-1 once each"):
        all_pairs(DUPLICATE_TOP)
    with pytest.raises(ValueError, match=r"^rewards\[1\]: slot 2 is in the assortment"):
        ranking_metrics(
            r.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))), DUPLICATE_TOP[1:2].expand(2, 3)
        )
    # unvalidated: the invalid row is left out, as by the losses
    metrics = ranking_metrics(r, DUPLICATE_TOP, validate=False)
    assert metrics == ranking_metrics(r[1:], DUPLICATE_TOP[1:])
    pairs = all_pairs(DUPLICATE_TOP, validate=False)
    assert pairs.row.tolist() == [1, 1, 1]


# --- item 8: *_discrete checks the shape of ranks first ---------------------------------------


@pytest.mark.parametrize("loss_fn", [mnl_discrete, mallows_rmj_discrete])
def test_discrete_checks_the_rank_tensor_first(loss_fn):
    p = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^ranks: expected a \[B, S\] tensor, got shape \(3,\)"):
        loss_fn(p[0], None, torch.tensor([0, UNRANKED, UNRANKED]))
    with pytest.raises(ValueError, match=r"^ranks: expected a \[B, S\] tensor, got shape \(1, 2, 3\)"):
        loss_fn(p[None], None, torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"^ranks: expected a torch.Tensor, got list"):
        loss_fn(p, None, [[0, UNRANKED, UNRANKED]] * 2)
    with pytest.raises(TypeError, match=r"^ranks: expected an integer tensor"):
        loss_fn(p, None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^ranks\[1\]: single-best \(discrete\) feedback needs k = 1, got k = 2"):
        loss_fn(p, None, torch.tensor([[0, UNRANKED, UNRANKED], [0, 1, UNRANKED]]))


# --- item 9: num_responses must be positive -----------------------------------------------------


@pytest.mark.parametrize("num_responses", [0, -2])
def test_num_responses_must_be_positive(num_responses):
    from rcpo_losses import fused_linear_response_stats, response_token_stats

    logits, labels = torch.randn(4, 3, 5), torch.randint(0, 5, (4, 3))
    with pytest.raises(
        ValueError, match=rf"^num_responses: must be a positive number of responses .*got {num_responses}$"
    ):
        response_token_stats(logits, labels, num_responses=num_responses)
    with pytest.raises(ValueError, match=rf"^num_responses: must be a positive number .*got {num_responses}$"):
        fused_linear_response_stats(torch.randn(4, 3, 2), torch.randn(5, 2), labels, num_responses=num_responses)
    with pytest.raises(TypeError, match=r"^num_responses: expected None or a positive int"):
        response_token_stats(logits, labels, num_responses=2.0)


# --- item 11: chunk_size is checked once, before the backend choice ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_chunk_size_is_checked_on_every_backend(backend, chunk_size, error):
    from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy

    z, t = torch.randn(3, 7).to(DEVICE), torch.tensor([1, 2, -100]).to(DEVICE)
    with pytest.raises(error, match=r"^chunk_size: "):
        token_logps_and_entropy(z, t, chunk_size=chunk_size, backend=backend)
    with pytest.raises(error, match=r"^chunk_size: "):
        fused_linear_token_stats(
            torch.randn(3, 4).to(DEVICE), torch.randn(7, 4).to(DEVICE), t, chunk_size=chunk_size, backend=backend
        )


# --- item 12: NaN scores raise -----------------------------------------------------------------


def test_nan_scores_in_the_assortment_raise():
    from rcpo_losses import ranks_from_scores, top_bottom_pair

    scores = torch.tensor([[0.3, float("nan"), 0.1], [0.0, 1.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    for fn in (ranks_from_scores, top_bottom_pair):
        with pytest.raises(ValueError, match=r"^scores\[0\]: slot 1 is in the assortment \(mask True\) but holds nan"):
            fn(scores, mask=mask)
        ok = fn(scores[1:], mask=mask[1:])  # NaN only where the mask is False: fine
        assert ok[0, 2] == IGNORE
    # unvalidated, a NaN ranks like -inf (documented)
    assert top_bottom_pair(scores, mask=mask, validate=False)[0].tolist() == [0, UNRANKED, IGNORE]
    assert ranks_from_scores(torch.tensor([[1.0, -float("inf"), 2.0]])).tolist() == [[1, 2, 0]]
