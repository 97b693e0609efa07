"""The CPU backward over vocabulary tiles (``rcpo_losses.ops.backend.CPU_VOCAB_TILES``) against the fp64 reference and
against the backward over token chunks, with tiles small enough that every loop runs several times."""

from __future__ import annotations

import pytest
import torch

from rcpo_losses import fused_linear_token_stats
from rcpo_losses.ops import backend
from rcpo_losses.ops import fused_linear as fused_linear_op

from .test_fused_linear import TOL, assert_matches_reference, make_inputs, run_fused


@pytest.fixture
def small_tiles(monkeypatch):
    # 3 token blocks of 16 (the last partial) x vocabulary tiles of 7 columns (the last partial)
    monkeypatch.setattr(fused_linear_op, "TILE_ROWS", 16)
    monkeypatch.setattr(fused_linear_op, "TILE_ELEMENTS", 16 * 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0, "logit_scale": 1.5, "temperature": 0.7}])
def test_tiles_match_the_reference_and_the_token_chunks(small_tiles, monkeypatch, dtype, bias, transform):
    h, W, b, t, g_logp, g_ent = make_inputs(0, 40, 24, 45, scale=4.0, dtype=dtype, bias=bias, ignore_frac=0.2)
    if transform:  # the reference has no transform: compare the two backwards with each other only
        monkeypatch.setattr(backend, "CPU_VOCAB_TILES", True)
        tiles = run_fused(h, W, b, t, g_logp, g_ent, **transform)
        monkeypatch.setattr(backend, "CPU_VOCAB_TILES", False)
        chunks = run_fused(h, W, b, t, g_logp, g_ent, **transform)
        for got, want in zip(tiles[2], chunks[2], strict=True):
            scale = float(want.double().abs().max())
            torch.testing.assert_close(got.double(), want.double(), atol=TOL[dtype] * 8 * scale, rtol=0)
        return
    monkeypatch.setattr(backend, "CPU_VOCAB_TILES", True)
    assert_matches_reference(h, W, b, t, g_logp, g_ent)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tiles_without_entropy_and_partial_needs(small_tiles, monkeypatch, dtype):
    monkeypatch.setattr(backend, "CPU_VOCAB_TILES", True)
    h, W, b, t, g_logp, _ = make_inputs(1, 33, 8, 20, scale=3.0, dtype=dtype, bias=True, ignore_frac=0.3)
    ref_h, ref_W, ref_b = (x.detach().double().clone().requires_grad_() for x in (h, W, b))
    z = ref_h @ ref_W.T + ref_b
    valid = t != -100
    ref_logp = torch.where(valid, z.log_softmax(-1).gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    want = torch.autograd.grad(ref_logp, (ref_h, ref_W, ref_b), g_logp)
    for need in ((True, True, True), (False, True, False), (True, False, False)):
        xs = [x.detach().clone().requires_grad_(r) for x, r in zip((h, W, b), need, strict=True)]
        logp, ent = fused_linear_token_stats(xs[0], xs[1], t, xs[2], entropy=False)
        assert (ent == 0).all()
        got = torch.autograd.grad(logp, [x for x in xs if x.requires_grad], g_logp.to(logp))
        for g, w in zip(got, [w for w, r in zip(want, need, strict=True) if r], strict=True):
            tol = TOL[dtype] * 8 * float(w.abs().max())
            torch.testing.assert_close(g.double(), w, atol=tol, rtol=0)
