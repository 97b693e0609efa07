"""The CPU fused LM head with its tile step compiled (``rcpo_losses.ops.backend.CPU_COMPILE``, the default
where a C++ compiler is found) against the fp64 reference and the eager twin; the tile merge
(:func:`rcpo_losses.reference.token_stats.combine_tiles`) against whole-row formulas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from rcpo_losses import fused_linear_token_stats
from rcpo_losses.ops import backend
from rcpo_losses.ops import fused_linear as fused_linear_op
from rcpo_losses.reference.token_stats import combine_tiles, tile_local_targets, tile_stats

from .test_fused_linear import TOL, assert_matches_reference, make_inputs, run_fused

needs_compiler = pytest.mark.skipif(not backend._cpu_compiler_found(), reason="no C++ compiler for inductor")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setattr(backend, "CPU_COMPILE", True)
    # bf16 on a CPU without a fast bf16 GEMM (an EPYC without AVX512-BF16) would take the fp32-operand
    # path, which keeps token chunks and compiles nothing: pin the tile path so every CPU tests it.
    monkeypatch.setattr(backend, "CPU_FP32_MATMUL", False)
    before = backend.COMPILED_CALLS[0]
    yield
    assert not backend._COMPILE_FAILED, backend._COMPILE_FAILED
    assert backend.COMPILED_CALLS[0] > before, "the tile step never ran compiled"


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    if request.param == "small":  # 3 token blocks of 16 (the last partial) x tiles of 7 columns (the last partial)
        monkeypatch.setattr(fused_linear_op, "TILE_ROWS", 16)
        monkeypatch.setattr(fused_linear_op, "TILE_ELEMENTS", 16 * 7)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_matches_the_reference(compiled, tiles, dtype, bias):
    h, W, b, t, g_logp, g_ent = make_inputs(0, 40, 24, 45, scale=4.0, dtype=dtype, bias=bias, ignore_frac=0.2)
    assert_matches_reference(h, W, b, t, g_logp, g_ent)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [{"entropy": False}, {"softcap": 3.0, "logit_scale": 1.5, "temperature": 0.7}, {"logit_scale": 0.5}],
)
def test_compiled_matches_eager(compiled, tiles, monkeypatch, dtype, kw):
    h, W, b, t, g_logp, g_ent = make_inputs(1, 40, 24, 45, scale=4.0, dtype=dtype, bias=True, ignore_frac=0.2)
    got = run_fused(h, W, b, t, g_logp, g_ent, **kw)
    monkeypatch.setattr(backend, "CPU_COMPILE", False)
    want = run_fused(h, W, b, t, g_logp, g_ent, **kw)
    monkeypatch.setattr(backend, "CPU_COMPILE", True)
    for g, w in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
        scale = 1 + float(w.detach().double().abs().max())
        torch.testing.assert_close(g.double(), w.double(), atol=TOL[dtype] * 8 * scale, rtol=0)


@needs_compiler
def test_compiled_inside_a_users_compiled_function(compiled):
    h, W, _, t, _, _ = make_inputs(3, 50, 16, 70, dtype=torch.float32, ignore_frac=0.2)

    def loss(h, W):
        logp, ent = fused_linear_token_stats(h, W, t)
        return logp.sum() + 0.5 * ent.sum()

    xs = [x.clone().requires_grad_() for x in (h, W)]
    got = torch.compile(loss, fullgraph=True)(*xs)
    got_grads = torch.autograd.grad(got, xs)
    want = loss(*xs)
    want_grads = torch.autograd.grad(want, xs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "CPU_COMPILE", True)
    monkeypatch.setattr(backend, "_COMPILE_FAILED", [])

    def broken(fn):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(backend, "_compiled", broken)
    h, W, b, t, g_logp, g_ent = make_inputs(4, 20, 8, 30, dtype=torch.float32, bias=True, ignore_frac=0.2)
    with pytest.warns(RuntimeWarning, match="compiling the CPU tile step failed") as record:
        got = run_fused(h, W, b, t, g_logp, g_ent)
    assert len(record) == 1 and backend._COMPILE_FAILED
    monkeypatch.setattr(backend, "CPU_COMPILE", False)
    want = run_fused(h, W, b, t, g_logp, g_ent)
    for g, w in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
        torch.testing.assert_close(g, w)


def _split_stats(z: torch.Tensor, t: torch.Tensor, cuts: list[int], ignore_index: int = -100):
    bounds = [0, *cuts, z.shape[1]]
    valid = t != ignore_index
    pairs = zip(bounds, bounds[1:], strict=False)
    stats = [tile_stats(z[:, a:b], tile_local_targets(t, a, valid), None) for a, b in pairs]
    return combine_tiles(torch.stack(stats, dim=1), valid)


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    V=st.integers(1, 40),
    scale=st.sampled_from([0.1, 3.0, 1e4]),
    cuts=st.lists(st.integers(1, 39), max_size=4),
    masked=st.sampled_from([0.0, 0.5]),
)
@example(seed=0, n=2, V=6, scale=1.0, cuts=[3], masked=0.0)
def test_merging_tiles_gives_the_whole_row(seed, n, V, scale, cuts, masked):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    z[torch.rand(n, V, generator=g, dtype=torch.float64) < masked] = -torch.inf  # masked vocabulary entries
    z[:, 0] = z[:, 0].clamp(min=-1e300)  # keep one live entry per row
    t = torch.randint(0, V, (n,), generator=g)
    t[0] = -100
    cuts = sorted({c for c in cuts if c < V})
    logp, ent, lse = _split_stats(z, t, cuts)
    log_p = z.log_softmax(-1)
    valid = t != -100
    want_logp = torch.where(valid, log_p.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    want_ent = torch.where(valid, -(log_p.exp() * log_p.clamp(min=-1e4)).sum(-1), 0.0)
    atol = 1e-12 * (1 + scale)
    torch.testing.assert_close(logp, want_logp, atol=atol, rtol=1e-12)
    torch.testing.assert_close(ent, want_ent, atol=atol, rtol=1e-12)
    torch.testing.assert_close(lse, z.logsumexp(-1), atol=atol, rtol=1e-12)


@pytest.mark.parametrize("cuts", [[7], [1, 20, 33]])
def test_merging_fp32_tiles_at_large_logits_loses_nothing_to_their_size(cuts):
    # Logits of 1e4 + O(3) (a large common offset): lse = 1e4 + log S is rounded to 2^-10 in fp32, so
    # z_t - lse or lse - E_p[z] would be off by about 1e-3. The merge shifts by the largest logit
    # itself (z_t - M is exact), and every term of its entropy is >= 0.
    g = torch.Generator().manual_seed(5)
    z = 1e4 + 3 * torch.randn(64, 45, generator=g)
    t = torch.randint(0, 45, (64,), generator=g)
    logp, ent, lse = _split_stats(z, t, cuts)
    log_p = z.double().log_softmax(-1)
    want_ent = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(logp.double(), log_p.gather(1, t[:, None])[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=0)


def test_a_row_with_every_logit_minus_inf_is_nan_as_log_softmax_gives():
    z = torch.tensor([[-torch.inf, -torch.inf, -torch.inf], [0.0, 1.0, -torch.inf]], dtype=torch.float64)
    t = torch.tensor([1, 2])
    logp, ent, _ = _split_stats(z, t, [1])
    assert logp[0].isnan() and logp[1] == -torch.inf and ent[1].isfinite()


SPELLINGS = [("", "None"), (" ", "None")]
SPELLINGS += [(v, "False") for v in ("0", "false", "False", "OFF", "no", " No ")]
SPELLINGS += [(v, "True") for v in ("1", "true", "TRUE", "on", "yes", "Yes")]


@pytest.mark.parametrize(("value", "want"), [*SPELLINGS, ("2", None), ("disable", None), ("n", None)])
def test_the_environment_variable_sets_cpu_compile(value, want):
    env = {k: v for k, v in os.environ.items() if k != "RCPO_LOSSES_CPU_COMPILE"}
    env["RCPO_LOSSES_CPU_COMPILE"] = value
    code = "from rcpo_losses.ops import backend; print(backend.CPU_COMPILE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if want is None:  # neither on nor off: refused, naming the variable
        assert out.returncode != 0 and f"ValueError: RCPO_LOSSES_CPU_COMPILE={value!r}" in out.stderr, out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want
