"""Soft-capping, logit scale and temperature (``z' = c tanh(a z / c) / T``) on the token and fused-linear paths:
the chunked PyTorch path and the Triton kernel (interpreter on CPU) against ``log_softmax`` of the transformed
logits with plain autograd, fp64 gradchecks, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rcpo_losses import (
    entropy_dispersion_from_logits,
    fused_linear_response_stats,
    fused_linear_token_stats,
    response_token_stats,
    token_logps_and_entropy,
)
from rcpo_losses.ops.backend import triton_available
from rcpo_losses.reference.token_stats import LogitTransform
from rcpo_losses.reference.token_stats import token_stats_reference as _token_stats_reference

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

transforms = st.fixed_dictionaries(
    {
        "softcap": st.sampled_from([None, 0.5, 5.0, 30.0]),
        "logit_scale": st.sampled_from([1.0, 0.25, 3.0]),
        "temperature": st.sampled_from([1.0, 0.3, 1.7]),
    }
)


def _reference(z, t, kw, grads):
    """fp64 outputs and gradients of ``log_softmax(transform(z))`` by plain autograd, w.r.t. ``z``'s leaves."""
    transform = LogitTransform.make(kw.get("softcap"), kw.get("logit_scale", 1.0), kw.get("temperature", 1.0))
    return _token_stats_reference(z, t, -100, transform)


def _check(got, want, dtype, scale):
    tol = TOL[dtype] * (1 + scale)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double().cpu(), b.double(), atol=tol * (1 + float(b.abs().max())), rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 12),
    V=st.integers(1, 70),
    scale=st.sampled_from([1.0, 40.0]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    backend=st.sampled_from(["torch", "triton"] if triton_available() else ["torch"]),
    kw=transforms,
)
@example(0, 3, 5, 40.0, torch.float64, "torch", {"softcap": 0.5, "logit_scale": 1.0, "temperature": 1.0})
def test_token_path_matches_autograd_reference(seed, N, V, scale, dtype, backend, kw):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[0] = -100
    g_logp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    dev = DEVICE if backend == "triton" else "cpu"
    x = z.to(dev).requires_grad_()
    logp, ent = token_logps_and_entropy(x, t.to(dev), backend=backend, chunk_size=5, **kw)
    (grad,) = torch.autograd.grad((logp, ent), x, (g_logp.to(logp), g_ent.to(ent)))
    xr = z.double().requires_grad_()
    ref = _reference(xr, t, kw, None)
    (ref_grad,) = torch.autograd.grad(ref, xr, (g_logp, g_ent))
    # logits of size `scale` reach the softmax as at most max(c, a * scale) / T
    zmax = (kw["softcap"] or kw["logit_scale"] * scale) / kw["temperature"]
    _check((logp, ent, grad), (ref[0].detach(), ref[1].detach(), ref_grad), dtype, zmax)
    assert grad.dtype == dtype and (grad[0] == 0).all() and logp[0] == 0


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 10),
    V=st.integers(1, 40),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    backend=st.sampled_from(["torch", "triton"] if triton_available() else ["torch"]),
    kw=transforms,
)
def test_fused_linear_matches_autograd_reference(seed, N, V, bias, dtype, backend, kw):
    g = torch.Generator().manual_seed(seed)
    H = 6
    xs = [torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64) * 4]
    if bias:
        xs.append(torch.randn(V, generator=g, dtype=torch.float64))
    xs = [x.to(dtype) for x in xs]
    t = torch.randint(0, V, (N,), generator=g)
    t[-1] = -100
    g_logp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    dev = DEVICE if backend == "triton" else "cpu"
    leaves = [x.to(dev).requires_grad_() for x in xs]
    b = leaves[2] if bias else None
    logp, ent = fused_linear_token_stats(leaves[0], leaves[1], t.to(dev), b, backend=backend, chunk_size=3, **kw)
    grads = torch.autograd.grad((logp, ent), leaves, (g_logp.to(logp), g_ent.to(ent)))
    ref_leaves = [x.double().requires_grad_() for x in xs]
    z = ref_leaves[0] @ ref_leaves[1].T + (ref_leaves[2] if bias else 0)
    ref = _reference(z, t, kw, None)
    ref_grads = torch.autograd.grad(ref, ref_leaves, (g_logp, g_ent))
    zmax = float(z.detach().abs().max()) * kw["logit_scale"] / kw["temperature"]
    _check((logp, ent, *grads), (ref[0].detach(), ref[1].detach(), *ref_grads), dtype, zmax * 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    g = torch.Generator().manual_seed(7)
    dev = DEVICE if backend == "triton" else "cpu"
    z = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 8).to(dev).requires_grad_()
    h = torch.randn(4, 3, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    W = (torch.randn(9, 3, generator=g, dtype=torch.float64) * 4).to(dev).requires_grad_()
    t = torch.tensor([0, 8, -100, 4], device=dev)
    kw = dict(softcap=3.0, logit_scale=1.5, temperature=0.7, backend=backend)
    assert torch.autograd.gradcheck(lambda x: token_logps_and_entropy(x, t, chunk_size=3, **kw), (z,))
    assert torch.autograd.gradcheck(lambda a, b: fused_linear_token_stats(a, b, t, chunk_size=3, **kw), (h, W))


def test_softcap_changes_large_logits_and_leaves_small_ones():
    """The cap is not a no-op: on logits of tens it moves log-probs by nats; a huge cap changes nothing."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 50, generator=g, dtype=torch.float64) * 40
    t = torch.randint(0, 50, (4,), generator=g)
    plain = token_logps_and_entropy(z, t)[0]
    capped = token_logps_and_entropy(z, t, softcap=30.0)[0]
    assert (plain - capped).abs().max() > 1.0
    nearly = token_logps_and_entropy(z, t, softcap=1e8)[0]
    torch.testing.assert_close(nearly, plain, atol=1e-8, rtol=0)
    hot = token_logps_and_entropy(z, t, temperature=2.0)[0]
    torch.testing.assert_close(hot, token_logps_and_entropy(z / 2, t)[0], atol=1e-12, rtol=0)


def test_response_level_functions_pass_the_transform_on():
    g = torch.Generator().manual_seed(1)
    B, S, T, H, V = 2, 3, 5, 4, 30
    h = torch.randn(B * S, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 10
    ids = torch.randint(0, V, (B * S, T), generator=g)
    kw = dict(softcap=20.0, logit_scale=0.9, temperature=0.8)
    fused = fused_linear_response_stats(h, W, ids, shift_labels=True, num_responses=S, **kw)
    logits = h @ W.T
    plain = response_token_stats(logits, ids, shift_labels=True, num_responses=S, **kw)
    ref = response_token_stats(20.0 * torch.tanh(0.9 * logits / 20.0) / 0.8, ids, shift_labels=True, num_responses=S)
    for a, b, c in zip(fused, plain, ref, strict=True):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
        torch.testing.assert_close(b, c, atol=1e-12, rtol=0)
    ranks = torch.tensor([[0, 1, 2], [1, 0, 2]])
    w = entropy_dispersion_from_logits(logits, ids, ranks, shift_labels=True, **kw)
    w_ref = entropy_dispersion_from_logits(20.0 * torch.tanh(0.9 * logits / 20.0) / 0.8, ids, ranks, shift_labels=True)
    torch.testing.assert_close(w, w_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("softcap", 0.0, ValueError),
        ("softcap", -30.0, ValueError),
        ("softcap", math.nan, ValueError),
        ("softcap", math.inf, ValueError),
        ("temperature", 0.0, ValueError),
        ("temperature", -1.0, ValueError),
        ("temperature", math.nan, ValueError),
        ("logit_scale", 0.0, ValueError),
        ("logit_scale", math.inf, ValueError),
        ("logit_scale", "2", TypeError),
        ("temperature", True, TypeError),
    ],
)
def test_bad_transform_arguments_name_the_argument(name, value, error):
    z = torch.randn(2, 5)
    t = torch.tensor([0, 1])
    for call in (
        lambda: token_logps_and_entropy(z, t, **{name: value}),
        lambda: fused_linear_token_stats(torch.randn(2, 3), torch.randn(5, 3), t, **{name: value}),
    ):
        with pytest.raises(error, match=name):
            call()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_with_transform(dtype):
    from rcpo_losses.ops.fused_linear import fused_linear_token_stats_op
    from rcpo_losses.ops.token_stats import token_stats

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g).to(DEVICE, dtype).requires_grad_()
    t = torch.tensor([0, 39, -100, 4, 7, 8], device=DEVICE)
    torch.library.opcheck(token_stats, (z, t, -100, 16, 3.0, 1.5, 0.5))
    h = torch.randn(6, 4, generator=g).to(DEVICE, dtype).requires_grad_()
    W = torch.randn(40, 4, generator=g).to(DEVICE, dtype).requires_grad_()
    for use_triton in (False, True):
        torch.library.opcheck(fused_linear_token_stats_op, (h, W, None, t, -100, 4, use_triton, True, 3.0, 1.5, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_softcap(backend):
    import warnings

    dev = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(2, 4, 40, generator=g) * 20).to(dev)
    h = torch.randn(8, 6, generator=g).to(dev)
    W = (torch.randn(40, 6, generator=g) * 5).to(dev)
    t = torch.randint(0, 40, (2, 4), generator=g).to(dev)
    kw = dict(softcap=30.0, logit_scale=1.2, temperature=0.8, backend=backend, chunk_size=3)

    def f(x, w):
        logp, ent = token_logps_and_entropy(x, t, **kw)
        logp2, ent2 = fused_linear_token_stats(h, w, t.reshape(-1), **kw)
        return (logp * 0.5 + ent).sum() + (logp2 - ent2).sum()

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, fullgraph=True)
        x1, w1 = z.clone().requires_grad_(), W.clone().requires_grad_()
        y1 = compiled(x1, w1)
        y1.backward()
    x2, w2 = z.clone().requires_grad_(), W.clone().requires_grad_()
    y2 = f(x2, w2)
    y2.backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
