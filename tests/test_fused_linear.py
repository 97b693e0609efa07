"""Fused linear + per-token stats: ``fused_linear_token_stats(h, W, t, b)`` against the unfused fp64
computation (``log_softmax`` formulas on ``h @ W.T + b``), its Triton chunk path under the
interpreter, its custom-op registration, and the response-level twin.

Tolerances, with ``zmax = max |h @ W.T + b|`` (the logits' scale) and ``gmax`` the largest
reference gradient entry:

- fp64: ``tol = 1e-12``, fp32: ``tol = 1e-5`` (observed up to about ``1e-6``), bf16: ``tol = 2^-5``;
- outputs: ``tol (1 + zmax)``; gradients: ``tol ((1 + zmax) gmax + gup m)``, where ``gup`` is the
  size of the upstream gradients and ``m`` that of the matmul's other factor (``max |W|`` for
  ``grad_h``, ``N max |h|`` for ``grad_W``, ``N`` for ``grad_b``): the floor covers ``1 - p``
  cancelling where a softmax entry is close to 1, which leaves gradients that are all tiny.
- why bf16 needs ``2^-5``: the logits are formed in bf16, as an unfused ``hidden @ W.T`` in
  bf16 would be. Each is rounded by up to ``2^-9`` of its size, which moves
  ``log p_t = z_t - lse`` and ``H`` by up to about ``2^-8 (1 + zmax)`` and the softmax (hence
  every gradient) by as much relative to the gradients' scale; observed up to
  ``4.4e-3 = 2^-7.8``. ``test_bf16_as_accurate_as_the_unfused_bf16_path`` checks that the fused
  path is no less accurate than the unfused bf16 one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rcpo_losses import (
    fused_linear_response_stats,
    fused_linear_token_stats,
    mallows_rmj_topk,
    response_token_stats,
    sequence_logps,
    token_logps_and_entropy,
)
from rcpo_losses.ops.backend import triton_available
from rcpo_losses.ops.fused_linear import default_chunk_rows, fused_linear_token_stats_op
from rcpo_losses.reference.token_stats import token_stats_reference as _token_stats_reference

# The interpreter runs the kernels in numpy, which warns about the -inf/NaN lanes that
# tl.where then discards; a GPU computes the same silently.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# The Triton chunk path runs compiled on CUDA when there is a GPU, else on CPU tensors under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-5}


def make_inputs(seed: int, N: int, H: int, V: int, *, scale=1.0, dtype=torch.float32, bias=False, ignore_frac=0.0):
    """``(h, W, b, t, g_logp, g_ent)``: logits of size about ``scale``, some targets ignored, fp64 upstream grads."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * (scale / H**0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * scale if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g, dtype=torch.float64) < ignore_frac] = -100
    g_logp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    h, W = h.to(dtype), W.to(dtype)
    return h, W, None if b is None else b.to(dtype), t, g_logp, g_ent


def params(h, W, b):
    return [x for x in (h, W, b) if x is not None]


def run_fused(h, W, b, t, g_logp, g_ent, device="cpu", **kw):
    """Outputs and gradients w.r.t. ``(h, W[, b])`` for upstream gradients on both outputs, on the CPU."""
    xs = [x.to(device, copy=True).requires_grad_() for x in params(h, W, b)]
    logp, ent = fused_linear_token_stats(xs[0], xs[1], t.to(device), xs[2] if b is not None else None, **kw)
    grads = torch.autograd.grad((logp, ent), xs, (g_logp.to(logp), g_ent.to(ent)))
    return logp.cpu(), ent.cpu(), [x.cpu() for x in grads]


def run_reference(h, W, b, t, g_logp, g_ent):
    """The unfused fp64 computation on the (rounded) inputs: plain log_softmax formulas on ``h @ W.T + b``."""
    xs = [x.double().requires_grad_() for x in params(h, W, b)]
    z = xs[0] @ xs[1].T
    if b is not None:
        z = z + xs[2]
    logp, ent = _token_stats_reference(z, t)
    grads = torch.autograd.grad((logp, ent), xs, (g_logp, g_ent))
    zmax = float(z.detach().abs().max()) if z.numel() else 0.0
    return logp.detach(), ent.detach(), list(grads), zmax


def assert_matches_reference(h, W, b, t, g_logp, g_ent, *, tol=None, **kw):
    logp, ent, grads = run_fused(h, W, b, t, g_logp, g_ent, **kw)
    ref_logp, ref_ent, ref_grads, zmax = run_reference(h, W, b, t, g_logp, g_ent)
    tol = TOL[h.dtype] if tol is None else tol
    out = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert logp.dtype == out and ent.dtype == out
    atol = tol * (1 + zmax)
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=0)
    # Gradients: relative to their own scale, plus a floor for the rounding of softmax entries
    # near 1 (1 - p cancels), of the size of the upstream gradients times the other factor.
    gup = float(g_logp.abs().max() + g_ent.abs().max())
    floors = (float(W.detach().abs().max()), h.shape[0] * float(h.detach().abs().max()), float(h.shape[0]))
    for got, want, x, floor in zip(grads, ref_grads, params(h, W, b), floors, strict=False):
        assert got.dtype == x.dtype and got.shape == x.shape
        atol_grad = tol * ((1 + zmax) * float(want.abs().max()) + gup * floor)
        torch.testing.assert_close(got.double(), want, atol=atol_grad, rtol=0)
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all()


@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 64),
    H=st.integers(1, 64),
    V=st.one_of(st.just(1), st.integers(1, 300)),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    bias=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 16, None]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_matches_unfused_fp64(seed, N, H, V, scale, dtype, bias, chunk_size, ignore_frac):
    h, W, b, t, gl, ge = make_inputs(seed, N, H, V, scale=scale, dtype=dtype, bias=bias, ignore_frac=ignore_frac)
    assert_matches_reference(h, W, b, t, gl, ge, chunk_size=chunk_size, backend="torch")


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 20, 64])  # N = 20: divides, does not, one chunk, more than N
def test_chunk_sizes_agree(chunk_size):
    h, W, b, t, gl, ge = make_inputs(1, 20, 12, 33, dtype=torch.float64, bias=True, ignore_frac=0.3)
    assert_matches_reference(h, W, b, t, gl, ge, chunk_size=chunk_size)


def test_default_chunk_rule():
    assert default_chunk_rows(8192, 256, 32000) == 128  # ceil(8192 / ceil(32000 / 256)) = 66 -> 128
    assert default_chunk_rows(16384, 4096, 128256) == 512  # a chunk of logits the size of the hidden states
    assert default_chunk_rows(1 << 20, 4096, 128256) == (1 << 27) // 128256  # capped at 2^27 logits
    assert default_chunk_rows(1024, 512, 32000) == 128  # at least 128 rows (efficient matmuls)
    assert default_chunk_rows(5, 64, 10) == 5 and default_chunk_rows(1, 1, 1) == 1


def test_entropy_false_skips_the_entropy():
    h, W, b, t, gl, ge = make_inputs(2, 17, 8, 29, dtype=torch.float64, bias=True, ignore_frac=0.3)
    logp, ent, grads = run_fused(h, W, b, t, gl, ge, entropy=False, chunk_size=5)
    assert (ent == 0).all()
    # Only the log-prob's gradient: the entropy's upstream gradient is ignored.
    ref_logp, _, ref_grads, _ = run_reference(h, W, b, t, gl, torch.zeros_like(ge))
    torch.testing.assert_close(logp, ref_logp)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_bf16_as_accurate_as_the_unfused_bf16_path():
    h, W, b, t, gl, ge = make_inputs(3, 64, 48, 300, scale=4.0, dtype=torch.bfloat16, bias=True, ignore_frac=0.2)
    ref = run_reference(h, W, b, t, gl, ge)
    fused = run_fused(h, W, b, t, gl, ge, chunk_size=7)
    xs = [x.clone().requires_grad_() for x in params(h, W, b)]
    logp, ent = token_logps_and_entropy(xs[0] @ xs[1].T + xs[2], t)  # unfused, bf16 logits
    unfused = (logp, ent, torch.autograd.grad((logp, ent), xs, (gl.to(logp), ge.to(ent))))
    for i in range(2):
        err_f = (fused[i].double() - ref[i]).abs().max()
        err_u = (unfused[i].detach().double() - ref[i]).abs().max()
        assert err_f <= 1.5 * err_u + 1e-6, (i, err_f, err_u)
    for got_f, got_u, want in zip(fused[2], unfused[2], ref[2], strict=True):
        err_f, err_u = (got_f.double() - want).abs().max(), (got_u.double() - want).abs().max()
        assert err_f <= 1.5 * err_u + 1e-3 * want.abs().max(), (err_f, err_u)


def test_gradcheck_fp64():
    h, W, b, t, _, _ = make_inputs(4, 7, 5, 13, scale=3.0, dtype=torch.float64, bias=True, ignore_frac=0.3)
    xs = [x.requires_grad_() for x in (h, W, b)]
    assert torch.autograd.gradcheck(lambda h, W, b: fused_linear_token_stats(h, W, t, b, chunk_size=3), xs)


def test_only_the_gradients_asked_for():
    h, W, b, t, gl, ge = make_inputs(5, 9, 6, 11, dtype=torch.float64, bias=True)
    ref = run_reference(h, W, b, t, gl, ge)[2]
    h.requires_grad_()  # a frozen LM head (weight and bias without grad)
    logp, ent = fused_linear_token_stats(h, W, t, b, chunk_size=4)
    (gh,) = torch.autograd.grad((logp, ent), h, (gl, ge))
    torch.testing.assert_close(gh, ref[0])
    W.requires_grad_()
    logp, ent = fused_linear_token_stats(h.detach(), W, t, b, chunk_size=4)
    (gw,) = torch.autograd.grad((logp, ent), W, (gl, ge))
    torch.testing.assert_close(gw, ref[1])
    # Only the log-prob used downstream: the entropy's gradient is None, treated as 0.
    logp, _ = fused_linear_token_stats(h, W, t, b)
    (gw,) = torch.autograd.grad((logp * gl).sum(), W)
    torch.testing.assert_close(gw, run_reference(h.detach(), W.detach(), b, t, gl, 0 * ge)[2][1])


def test_no_grad_saves_nothing_and_matches():
    h, W, b, t, gl, ge = make_inputs(6, 10, 8, 40, bias=True, ignore_frac=0.3)
    xs = [x.requires_grad_() for x in (h, W, b)]
    with torch.no_grad():
        logp, ent = fused_linear_token_stats(*xs[:2], t, xs[2])
    assert logp.grad_fn is None and ent.grad_fn is None and not logp.requires_grad
    logp2, ent2 = fused_linear_token_stats(h.detach(), W.detach(), t, b.detach())  # nothing requires grad
    assert logp2.grad_fn is None
    torch.testing.assert_close(logp, logp2)
    torch.testing.assert_close(ent, ent2)


def test_leading_dims_and_empty():
    h, W, b, t, _, _ = make_inputs(7, 12, 8, 40, bias=True, ignore_frac=0.3)
    logp, ent = fused_linear_token_stats(h.view(3, 4, 8), W, t.view(3, 4), b)
    ref_logp, ref_ent = token_logps_and_entropy(h @ W.T + b, t)
    assert logp.shape == (3, 4)
    torch.testing.assert_close(logp.flatten(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.flatten(), ref_ent, atol=1e-5, rtol=1e-5)
    x = torch.zeros(2, 0, 8, requires_grad=True)
    logp, ent = fused_linear_token_stats(x, W, torch.zeros(2, 0, dtype=torch.long))
    assert logp.shape == (2, 0)
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape


def test_composes_with_sequence_logps_and_the_loss():
    B, S, T, H, V = 2, 3, 5, 8, 30
    g = torch.Generator().manual_seed(8)
    h = torch.randn(B * S, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B * S, T), generator=g)
    mask = torch.rand(B * S, T, generator=g) < 0.7
    mask[:, 0] = True
    ranks = torch.tensor([[0, 1, -1], [-1, 0, -100]])
    ref_logps = torch.randn(B, S, generator=g, dtype=torch.float64)

    def loss(fused: bool):
        x, w = h.clone().requires_grad_(), W.clone().requires_grad_()
        t = torch.where(mask, labels, -100)
        if fused:
            logp, _ = fused_linear_token_stats(x, w, t, chunk_size=4)
        else:
            logp, _ = token_logps_and_entropy(x @ w.T, t)
        seq = sequence_logps(logp.view(B, S, T), mask.view(B, S, T))
        value = mallows_rmj_topk(seq, ref_logps, ranks, beta=0.5, neg_log_phi=1.5)
        return (value, *torch.autograd.grad(value, (x, w)))

    for a, b in zip(loss(True), loss(False), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ Triton chunk path


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_chunk_path(dtype):
    h, W, b, t, gl, ge = make_inputs(9, 6, 8, 40, scale=2.0, dtype=dtype, bias=True, ignore_frac=0.3)
    assert_matches_reference(h, W, b, t, gl, ge, device=DEVICE, backend="triton", chunk_size=4)
    # entropy=False on the kernel path: zeros out, no entropy gradient.
    logp, ent, grads = run_fused(h, W, b, t, gl, ge, device=DEVICE, backend="triton", chunk_size=4, entropy=False)
    assert (ent == 0).all()
    ref = run_reference(h, W, b, t, gl, torch.zeros_like(ge))
    atol = TOL[dtype] * (1 + ref[3])
    torch.testing.assert_close(logp.double(), ref[0], atol=atol, rtol=0)
    for got, want in zip(grads, ref[2], strict=True):
        torch.testing.assert_close(got.double(), want, atol=atol * float(want.abs().max()), rtol=0)


# ------------------------------------------------------------------ registration


@pytest.mark.parametrize(
    "dtype,bias,use_triton",
    [
        (torch.float32, True, False),
        (torch.bfloat16, False, False),
        (torch.float64, True, False),
        pytest.param(torch.float32, True, True, marks=needs_triton),
    ],
)
def test_opcheck(dtype, bias, use_triton):
    dev = DEVICE if use_triton else "cpu"
    h, W, b, t, _, _ = make_inputs(10, 6, 5, 24, dtype=dtype, bias=bias, ignore_frac=0.3)
    h, W, t = h.to(dev), W.to(dev), t.to(dev)
    b = None if b is None else b.to(dev).requires_grad_()
    args = (h.requires_grad_(), W.requires_grad_(), b, t, -100, 4, use_triton, True)
    torch.library.opcheck(fused_linear_token_stats_op, args)
    # Only hidden requires grad, and no entropy.
    torch.library.opcheck(fused_linear_token_stats_op, (h, W.detach(), None, t, -100, 0, use_triton, False))


def test_torch_compile_fullgraph_matches_eager():
    h, W, b, t, _, _ = make_inputs(11, 10, 6, 33, bias=True, ignore_frac=0.3)

    def f(h, W, b, t):
        logp, ent = fused_linear_token_stats(h, W, t.view(2, 5), b, chunk_size=4)
        return (logp * 0.5 + ent).sum()

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, fullgraph=True)
        xs1 = [x.clone().requires_grad_() for x in (h.view(2, 5, 6), W, b)]
        y1 = compiled(*xs1, t)
        y1.backward()
    xs2 = [x.clone().requires_grad_() for x in (h.view(2, 5, 6), W, b)]
    y2 = f(*xs2, t)
    y2.backward()
    torch.testing.assert_close(y1, y2)
    for a, c in zip(xs1, xs2, strict=True):
        torch.testing.assert_close(a.grad, c.grad)


# ------------------------------------------------------------------ responses


def test_response_stats_match_response_token_stats():
    B, S, T, H, V = 2, 3, 7, 8, 29
    g = torch.Generator().manual_seed(12)
    h = torch.randn(B * S, T, H, generator=g)
    W = torch.randn(V, H, generator=g) / 2
    bias = torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B * S, T), generator=g)
    completion = torch.zeros(B * S, T, dtype=torch.bool)
    completion[:, 3:] = True
    completion[0, 5:] = False
    kw = dict(shift_labels=True, num_responses=S)
    with torch.no_grad():  # the reference model
        got = fused_linear_response_stats(h, W, ids, completion, bias=bias, chunk_size=4, **kw)
    want = response_token_stats(h @ W.T + bias, ids, completion, **kw)
    assert got.logps.shape == (B, S) and got.logps.grad_fn is None
    torch.testing.assert_close(got.logps, want.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy_sums, want.entropy_sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.lengths, want.lengths)

    # With gradients (the policy), through both sums; (B, S, T, H) input without num_responses.
    x1, x2 = h.double().requires_grad_(), h.double().requires_grad_()
    got = fused_linear_response_stats(x1.view(B, S, T, H), W.double(), ids.view(B, S, T), shift_labels=True)
    want = response_token_stats(x2.view(B, S, T, H) @ W.double().T, ids.view(B, S, T), shift_labels=True)
    (got.logps.sum() + got.entropy_sums.sum() / 3).backward()
    (want.logps.sum() + want.entropy_sums.sum() / 3).backward()
    torch.testing.assert_close(got.logps, want.logps)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_bad_inputs():
    h, W = torch.randn(2, 3, 8), torch.randn(10, 8)
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets\[1, 2\].*outside \[0, 10\)"):
        fused_linear_token_stats(h, W, torch.tensor([[0, 1, 2], [3, 4, 10]]))
    with pytest.raises(ValueError, match="weight"):
        fused_linear_token_stats(h, torch.randn(10, 7), t)
    with pytest.raises(TypeError, match="weight"):
        fused_linear_token_stats(h, W.double(), t)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_token_stats(h, W, t, torch.zeros(9))
    with pytest.raises(ValueError, match="targets"):
        fused_linear_token_stats(h, W, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        fused_linear_token_stats(h, W, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_token_stats(h, W, t, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_token_stats(h, W, t, backend="cuda")
    with pytest.raises(ValueError, match="num_responses"):
        fused_linear_response_stats(h, W, t, num_responses=4)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_response_stats(torch.randn(8), W, t)
