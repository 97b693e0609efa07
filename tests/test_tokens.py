"""Per-token log-probs and entropies: the Triton kernel (under the interpreter on CPU) and
the chunked PyTorch path against the plain fp64 formulas, and the end-to-end dispersion."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    entropy_dispersion,
    entropy_dispersion_from_logits,
    response_token_stats,
    token_logps_and_entropy,
)
from rcpo_losses.ops.backend import triton_available
from rcpo_losses.reference.token_stats import token_stats_reference as _token_stats_reference

from .strategies import make_ranks

# The interpreter runs the kernels in numpy, which warns about the -inf/NaN lanes that
# tl.where then discards (ignored rows, masked lanes); a GPU computes the same silently.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# The kernel runs compiled on CUDA when there is a GPU, else on CPU tensors under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend: str | None) -> str:
    return DEVICE if backend == "triton" else "cpu"


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Relative rounding of a gradient stored in each dtype. bf16 gets one ulp, not half: the
# Triton interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest even).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-12}


def _compute_atol(dtype: torch.dtype, scale: float) -> float:
    """Absolute error of fp32 (fp64) math on logits of magnitude ``scale``: lse and z - lse carry eps * scale."""
    eps = 1e-13 if dtype == torch.float64 else 1e-6
    return 8 * eps * max(1.0, scale)


def _make_logits(seed: int, N: int, V: int, scale: float, dtype: torch.dtype, ignore_frac: float):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    kind = torch.randint(0, 4, (N,), generator=g)
    z[kind == 1] = 0.5  # uniform rows
    spike = torch.randint(0, V, (N,), generator=g)
    rows = (kind == 2).nonzero().flatten()
    z[rows, spike[rows]] += 40.0 * max(1.0, scale)  # one-hot-like rows
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g, dtype=torch.float64) < ignore_frac] = -100
    return z.to(dtype), t


def _reference(z: torch.Tensor, t: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor):
    """fp64 outputs and logits gradient of the plain formulas, on the (rounded) input logits."""
    x = z.double().requires_grad_()
    logp, ent = _token_stats_reference(x, t)
    (grad,) = torch.autograd.grad((logp, ent), x, (g_logp.double(), g_ent.double()))
    return logp.detach(), ent.detach(), grad


def _call(z, t, **kw):
    """``token_logps_and_entropy`` on the backend's device; outputs back on the CPU."""
    dev = _device(kw.get("backend"))
    logp, ent = token_logps_and_entropy(z.to(dev), t.to(dev), **kw)
    return logp.cpu(), ent.cpu()


def _run(z, t, g_logp, g_ent, **kw):
    """Outputs and the logits gradient for upstream gradients ``(g_logp, g_ent)``, on the CPU."""
    dev = _device(kw.get("backend"))
    x = z.to(dev).clone().requires_grad_()
    logp, ent = token_logps_and_entropy(x, t.to(dev), **kw)
    (grad,) = torch.autograd.grad((logp, ent), x, (g_logp.to(logp), g_ent.to(ent)))
    return logp.cpu(), ent.cpu(), grad.cpu()


def _check_against_reference(z, t, scale, **kw):
    N = t.shape[0]
    g = torch.Generator().manual_seed(N)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    logp, ent, grad = _run(z, t, g_logp, g_ent, **kw)
    ref_logp, ref_ent, ref_grad = _reference(z, t, g_logp, g_ent)
    out = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert logp.dtype == out and ent.dtype == out and grad.dtype == z.dtype
    atol = _compute_atol(z.dtype, scale)
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=1e-5 if out == torch.float32 else 1e-12)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=1e-5 if out == torch.float32 else 1e-12)
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol * 4, rtol=GRAD_RTOL[z.dtype])
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grad[ignored] == 0).all()


# Interpreter cost grows with (rows x blocks): keep it bounded by widening the block.
def _bounded_block(N: int, V: int, block_v: int, budget: int = 192) -> int:
    while block_v and N * -(-V // block_v) > budget and block_v < 512:
        block_v *= 2
    return block_v


@needs_triton
@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 64),
    V=st.one_of(st.just(1), st.integers(1, 300)),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
    dtype=st.sampled_from(DTYPES),
    block_v=st.sampled_from([16, 32, 64, 0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_kernel_matches_fp64_reference(seed, N, V, scale, dtype, block_v, ignore_frac):
    from rcpo_losses.ops.token_stats import token_logps_and_entropy_triton

    z, t = _make_logits(seed, N, V, scale, dtype, ignore_frac)
    bv = _bounded_block(N, V, block_v)
    g = torch.Generator().manual_seed(seed)
    g_logp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    x = z.to(DEVICE, copy=True).requires_grad_()
    logp, ent = token_logps_and_entropy_triton(x, t.to(DEVICE), -100, bv)
    (grad,) = torch.autograd.grad((logp, ent), x, (g_logp.to(logp), g_ent.to(ent)))
    logp, ent, grad = logp.cpu(), ent.cpu(), grad.cpu()
    ref_logp, ref_ent, ref_grad = _reference(z, t, g_logp, g_ent)
    atol = _compute_atol(dtype, scale)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol * 4, rtol=GRAD_RTOL[dtype])
    assert grad.dtype == dtype
    ignored = t == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grad[ignored] == 0).all()


@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 64),
    V=st.one_of(st.just(1), st.integers(1, 300)),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]),
    dtype=st.sampled_from(DTYPES),
    chunk_size=st.sampled_from([1, 3, 16, None]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_torch_path_matches_fp64_reference(seed, N, V, scale, dtype, chunk_size, ignore_frac):
    z, t = _make_logits(seed, N, V, scale, dtype, ignore_frac)
    _check_against_reference(z, t, scale, backend="torch", chunk_size=chunk_size)


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2, 37, 300])
def test_uniform_and_one_hot_rows(backend, V):
    z = torch.stack([torch.full((V,), 3.25), torch.zeros(V)])
    z[1, V // 2] = 200.0  # one-hot-like: p = 1 - (V-1) e^-200
    t = torch.tensor([0, V // 2])
    logp, ent = _call(z, t, backend=backend)
    torch.testing.assert_close(ent[0], torch.tensor(math.log(V)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logp[0], torch.tensor(-math.log(V)), atol=1e-6, rtol=1e-6)
    assert 0 <= ent[1] < 1e-30 or V == 1
    assert logp[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adding_a_constant_to_a_row_changes_nothing(backend, dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 77, generator=g, dtype=dtype)
    t = torch.tensor([0, 5, -100, 76, 40])
    shift = torch.tensor([0.0, 1e2, -7.0, 3.5, -1e2], dtype=dtype)[:, None]
    gl, gh = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a = _run(z, t, gl, gh, backend=backend)
    b = _run(z + shift, t, gl, gh, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 5e-5
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_never_read(backend):
    z = torch.randn(4, 33)
    z[1] = float("nan")
    z[3, :5] = float("inf")
    t = torch.tensor([3, -100, 0, -100])
    logp, ent, grad = _run(
        z, t, torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), backend=backend
    )
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert logp[1] == 0 and ent[3] == 0 and (grad[[1, 3]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_masked_vocabulary(backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 50, generator=g, dtype=torch.float64)
    z[:, 10:30] = float("-inf")  # e.g. a vocabulary mask
    z[2, :] = float("-inf")
    z[2, 49] = 0.0  # a single finite logit
    t = torch.tensor([1, 45, 49])
    gl, gh = torch.randn(2, 3, generator=g, dtype=torch.float64)
    logp, ent, grad = _run(z, t, gl, gh, backend=backend)
    ref_logp, ref_ent, ref_grad = _reference(z, t, gl, gh)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(grad, ref_grad)
    assert ent[2] == 0 and logp[2] == 0 and (grad[:, 10:30] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_non_contiguous_and_empty(backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 40, 3, generator=g)
    z = base.transpose(1, 2)  # (2, 3, 40), V not unit-stride
    t = torch.randint(0, 40, (2, 3), generator=g)
    logp, ent = _call(z, t, backend=backend)
    ref = _token_stats_reference(z.double(), t)
    assert logp.shape == (2, 3)
    torch.testing.assert_close(logp.double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref[1], atol=1e-5, rtol=1e-5)
    e_logp, e_ent = _call(torch.zeros(0, 7, 11), torch.zeros(0, 7, dtype=torch.long), backend=backend)
    assert e_logp.shape == (0, 7) and e_ent.shape == (0, 7)


@needs_triton
def test_gradcheck_kernel_fp64():
    from rcpo_losses.ops.token_stats import token_logps_and_entropy_triton

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(4, 11, generator=g, dtype=torch.float64) * 3).to(DEVICE).requires_grad_()
    t = torch.tensor([0, 10, -100, 4], device=DEVICE)
    # block_v=4: three blocks per row, so the online rescaling is differentiated too.
    assert torch.autograd.gradcheck(lambda x: token_logps_and_entropy_triton(x, t, -100, 4), (z,))


def test_gradcheck_torch_path_fp64():
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(5, 13, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.tensor([0, 12, -100, 4, 7])
    assert torch.autograd.gradcheck(lambda x: token_logps_and_entropy(x, t, backend="torch", chunk_size=2), (z,))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    from rcpo_losses.ops.token_stats import token_stats

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 40, generator=g).to(DEVICE, dtype)
    t = torch.tensor([0, 39, -100, 4, 7, 8], device=DEVICE)
    torch.library.opcheck(token_stats, (z, t, -100, 16))
    torch.library.opcheck(token_stats, (z.clone().requires_grad_(), t, -100, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 5, 70, generator=g).to(_device(backend))
    t = torch.randint(0, 70, (2, 5), generator=g)
    t[0, 1] = -100
    t = t.to(_device(backend))

    def f(x, t):
        logp, ent = token_logps_and_entropy(x, t, backend=backend, chunk_size=4)
        return (logp * 0.5 + ent).sum()

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, fullgraph=True)
        x1 = z.clone().requires_grad_()
        y1 = compiled(x1, t)
        y1.backward()
    x2 = z.clone().requires_grad_()
    y2 = f(x2, t)
    y2.backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_bad_inputs():
    z = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"targets\[1, 2\].*outside \[0, 10\)"):
        token_logps_and_entropy(z, torch.tensor([[0, 1, 2], [3, 4, 10]]))
    with pytest.raises(ValueError, match="targets"):
        token_logps_and_entropy(z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        token_logps_and_entropy(z, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps_and_entropy(z, torch.zeros(2, 3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        token_logps_and_entropy(z, torch.zeros(2, 3, dtype=torch.long), backend="cuda")
    # Unvalidated, a bad target gives NaN (never an out-of-bounds read).
    logp, _ = token_logps_and_entropy(z, torch.tensor([[0, 1, 2], [3, 4, 10]]), validate=False, backend="torch")
    assert logp[1, 2].isnan() and torch.isfinite(logp.flatten()[:5]).all()


def test_triton_backend_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        token_logps_and_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


# ---------------------------------------------------------------- end to end


def _loop_stats(logits, labels, mask):
    """Per response, per completion token: direct formulas in fp64 (a python loop)."""
    R, T, V = logits.shape
    logps, ents, lens = torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64), torch.zeros(R)
    for i in range(R):
        for t in range(T):
            if not mask[i, t]:
                continue
            p = torch.softmax(logits[i, t].double(), -1)
            logps[i] += math.log(p[labels[i, t]])
            ents[i] += float(-(p * p.log()).nansum())
            lens[i] += 1
    return logps, ents, lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["rcpo", "mallowspo"])
def test_end_to_end_dispersion_against_loop(backend, variant):
    g = torch.Generator().manual_seed(7)
    B, S, T, V = 3, 4, 6, 29
    logits = torch.randn(B * S, T + 1, V, generator=g) * 2
    ids = torch.randint(0, V, (B * S, T + 1), generator=g)
    prompt_len = torch.randint(1, 3, (B * S, 1), generator=g)
    resp_len = torch.randint(1, T, (B * S, 1), generator=g)
    pos = torch.arange(T + 1)
    completion = (pos >= prompt_len) & (pos < prompt_len + resp_len)  # aligned with the input ids
    ranks = make_ranks(np.random.default_rng(0), B, S)

    # Direct: logits[:, t] predicts ids[:, t + 1].
    loop_logps, loop_ents, loop_lens = _loop_stats(logits[:, :-1], ids[:, 1:], completion[:, 1:])
    dev = _device(backend)
    stats = response_token_stats(
        logits.to(dev), ids.to(dev), completion.to(dev), shift_labels=True, num_responses=S, backend=backend
    )
    stats = type(stats)(*(x.cpu() for x in stats))
    assert stats.logps.shape == (B, S) and stats.lengths.dtype == torch.int64
    torch.testing.assert_close(stats.logps.double(), loop_logps.view(B, S), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.entropy_sums.double(), loop_ents.view(B, S), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.lengths.double(), loop_lens.double().view(B, S))

    # The dispersion weight: helper vs entropy_dispersion on the loop sums vs appendix D by hand.
    want = entropy_dispersion(loop_ents.view(B, S), loop_lens.view(B, S), ranks, V, variant=variant)
    x = logits.view(B, S, T + 1, V).to(dev).requires_grad_()
    got = entropy_dispersion_from_logits(
        x,
        ids.view(B, S, -1).to(dev),
        ranks.to(dev),
        completion.view(B, S, -1).to(dev),
        shift_labels=True,
        variant=variant,
        backend=backend,
    )
    assert got.shape == (B,) and not got.requires_grad
    got = got.cpu()
    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    if variant == "rcpo":
        for b in range(B):
            keep = [j for j in range(S) if ranks[b, j] != IGNORE]
            n, longest = len(keep), max(float(loop_lens[b * S + j]) for j in keep)
            ratio = sum(float(loop_ents[b * S + j]) for j in keep) / (n * longest * math.log(V))
            assert abs(float(got[b]) + math.log(ratio)) < 1e-5


def test_end_to_end_gradients_and_detach():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (2, 3, 5), generator=g)
    labels[..., :2] = -100
    ranks = torch.tensor([[0, -1, 1], [0, -1, -100]])
    stats = response_token_stats(logits, labels, backend="torch", chunk_size=4)
    assert stats.logps.requires_grad and stats.entropy_sums.requires_grad
    torch.testing.assert_close(stats.lengths, torch.full((2, 3), 3))
    w = entropy_dispersion_from_logits(logits, labels, ranks, detach=False, backend="torch")
    assert w.requires_grad
    assert torch.autograd.gradcheck(
        lambda x: entropy_dispersion_from_logits(x, labels, ranks, detach=False, backend="torch"),
        (logits,),
        fast_mode=True,
    )
    with pytest.raises(ValueError, match="num_responses"):
        response_token_stats(logits.view(6, 5, 17), labels.view(6, 5), num_responses=4)
    with pytest.raises(ValueError, match="mask"):
        response_token_stats(logits, labels, torch.ones(2, 3, 4, dtype=torch.bool))
