"""bf16/fp16 on CPUs without a bf16 GEMM: the fused path's fp32-operand chunk matmuls (forced on and off here,
whatever this CPU's probe says) give the same numbers as the unfused computation, and the probe is harmless."""

from __future__ import annotations

import pytest
import torch

from rcpo_losses import fused_linear_token_stats
from rcpo_losses.ops import backend

from .test_fused_linear import TOL, assert_matches_reference, make_inputs, run_fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_operands_match_the_reference(monkeypatch, dtype, bias):
    monkeypatch.setattr(backend, "CPU_FP32_MATMUL", True)
    h, W, b, t, g_logp, g_ent = make_inputs(3, 37, 16, 300, scale=4.0, dtype=dtype, bias=bias, ignore_frac=0.2)
    assert_matches_reference(h, W, b, t, g_logp, g_ent, tol=TOL[torch.bfloat16], chunk_size=8, backend="torch")


def test_fp32_operands_are_at_least_as_accurate_as_bf16_operands(monkeypatch):
    h, W, b, t, g_logp, g_ent = make_inputs(4, 64, 32, 500, scale=4.0, dtype=torch.bfloat16, bias=True)
    ref = run_fused(
        *(x.double() if x is not None and x.is_floating_point() else x for x in (h, W, b)), t, g_logp, g_ent
    )
    errors = {}
    for on in (False, True):
        monkeypatch.setattr(backend, "CPU_FP32_MATMUL", on)
        got = run_fused(h, W, b, t, g_logp, g_ent, chunk_size=16, backend="torch")
        errors[on] = (
            float((got[0].detach().double() - ref[0].detach()).abs().max()),
            float((got[2][1].double() - ref[2][1]).abs().max()),
        )
        assert got[2][0].dtype == torch.bfloat16 and got[2][1].dtype == torch.bfloat16
    # fp32 operands skip the rounding of the chunk logits to bf16
    assert errors[True][0] <= errors[False][0] and errors[True][1] <= 1.01 * errors[False][1], errors


def test_probe_answers_once_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    slow = backend.slow_cpu_matmul(torch.bfloat16)
    assert isinstance(slow, bool) and torch.equal(torch.get_rng_state(), state)
    assert backend.fp32_matmul_operands(torch.zeros(1, dtype=torch.float32)) is False
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    logp, _ = fused_linear_token_stats(h, torch.randn(10, 8, dtype=torch.bfloat16), torch.arange(4))
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
