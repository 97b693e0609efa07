"""The fused MNL and Mallows-RMJ Triton kernels against their PyTorch references.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py). The references are evaluated in fp64.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rcpo_losses import (
    IGNORE,
    UNRANKED,
    mallows_rmj_topk,
    mallows_rmj_topk_from_rewards,
    mnl_topk,
    mnl_topk_from_rewards,
)
from rcpo_losses.mallows import mallows_rmj_topk_sum
from rcpo_losses.mnl import mnl_topk_nll
from rcpo_losses.ops import backend as _backend

from .strategies import make_ranks

pytest.importorskip("triton")
if not torch.cuda.is_available() and not _backend.interpreting():
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

from rcpo_losses.ops import choice as choice_ops  # noqa: E402  (imports triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# --- tolerances: the one place ---------------------------------------------------------
#
# A value computed in dtype `compute` and returned in dtype `out` is compared with the
# fp64 reference by  |got - want| <= RTOL[out] * |want| + ATOL[compute] * scale + FLOOR[out]
# where `scale` bounds the magnitudes the computation adds up (see `magnitude`). RTOL
# covers rounding of the result to `out` (bf16/fp16 gradients), ATOL the arithmetic in
# the compute dtype, FLOOR the subnormal spacing of fp16.
RTOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATOL = {torch.float64: 4e-15, torch.float32: 2e-6}  # about 18 eps
FLOOR = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


def magnitude(rewards: torch.Tensor, ranks: torch.Tensor, w: float = 1.0) -> float:
    """Scale of the absolute rounding error of a row's loss or gradient: ``(1 + max|r|) * S * max(1, w)``.

    Each of the up to ``S`` terms (MNL stages, Mallows comparisons) rounds a difference of
    rewards, with an error of about ``eps * max|r|``; sums of positive terms are covered by
    RTOL. Measured worst case over random batches: 0.35 ``eps * scale`` (fp32).
    """
    valid = (ranks >= 0) | (ranks == UNRANKED)
    r_max = float(torch.where(valid, rewards.detach().double(), 0.0).abs().max()) if rewards.numel() else 0.0
    return (1.0 + r_max) * ranks.shape[-1] * max(1.0, w)


def assert_close(got: torch.Tensor, want: torch.Tensor, compute: torch.dtype, scale: float) -> None:
    out = got.dtype
    atol = ATOL[compute] * scale + FLOOR[out]
    torch.testing.assert_close(got.double(), want.double(), rtol=RTOL[out], atol=atol, equal_nan=False)


# --- inputs ---------------------------------------------------------------------------


@dataclass
class Case:
    rewards: torch.Tensor  # [B, S] float64, padding holds NaN / inf / 0
    ranks: torch.Tensor  # [B, S] int64


def make_case(seed: int, B: int, S: int, scale: float, pad: float = float("nan"), min_n: int = 2) -> Case:
    rng = np.random.default_rng(seed)
    ranks = make_ranks(rng, B, S, min_n=min_n)
    rewards = torch.from_numpy(rng.normal(size=(B, S)) * scale).masked_fill(ranks == IGNORE, pad)
    return Case(rewards, ranks)


def fixed_case(ranks: list[list[int]], rewards: list[list[float]]) -> Case:
    return Case(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ranks))


@st.composite
def cases(draw, max_b: int = 64, max_s: int = 64) -> Case:
    """B in 1..max_b, S in 2..max_s, per row |S_b| >= 2 and k_b >= 1, NaN/inf padding."""
    B = draw(st.integers(1, max_b))
    S = draw(st.integers(2, max_s))
    scale = draw(st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e3]))
    pad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]))
    return make_case(draw(st.integers(0, 2**32 - 1)), B, S, scale, pad)


SINGLE_ROW = fixed_case([[1, UNRANKED, 0, IGNORE, UNRANKED]], [[0.3, -1.2, 2.0, float("nan"), 0.7]])
PAIR = fixed_case([[0, UNRANKED], [UNRANKED, 0]], [[1.5, -0.5], [0.25, 3.0]])
FULL_RANKING = fixed_case([[2, 0, 3, 1], [0, 1, 2, 3]], [[0.1, 0.2, -0.3, 0.4], [4.0, -3.0, 2.0, -1.0]])
MOSTLY_PADDING = Case(  # all but two slots padded, the two anywhere in the row
    torch.full((6, 40), float("inf"), dtype=torch.float64).index_put_(
        (torch.arange(6).repeat_interleave(2), torch.tensor([0, 1, 5, 39, 38, 2, 17, 18, 30, 3, 39, 0])),
        torch.linspace(-2.0, 3.0, 12, dtype=torch.float64),
    ),
    torch.full((6, 40), IGNORE).index_put_(
        (torch.arange(6).repeat_interleave(2), torch.tensor([0, 1, 5, 39, 38, 2, 17, 18, 30, 3, 39, 0])),
        torch.tensor([0, UNRANKED, UNRANKED, 0, 0, 1, 1, 0, 0, UNRANKED, 0, 1]),
    ),
)
HUGE = make_case(3, 8, 12, 1e4)


def row_grad(B: int, dtype: torch.dtype) -> torch.Tensor:
    """A fixed upstream gradient per row, with a zero and a negative entry."""
    g = torch.linspace(-1.0, 2.0, B, dtype=torch.float64)
    return g.to(dtype=dtype, device=DEVICE)


def on_device(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return case.rewards.to(device=DEVICE, dtype=dtype, copy=True), case.ranks.to(DEVICE, copy=True)


def assert_padding_grad_is_zero(grad: torch.Tensor, ranks: torch.Tensor) -> None:
    pad = ranks.to(grad.device) == IGNORE
    assert torch.equal(grad[pad], torch.zeros_like(grad[pad])), "gradient leaked into padding"
    assert torch.isfinite(grad).all()


# --- kernel vs reference: forward and gradient -------------------------------------------

CASE_EXAMPLES = [SINGLE_ROW, PAIR, FULL_RANKING, MOSTLY_PADDING, HUGE]


def _with_examples(test):
    for case in CASE_EXAMPLES:
        for dtype in (torch.float32, torch.float64):
            test = example(case=case, dtype=dtype)(test)
    return test


@settings(max_examples=40)
@_with_examples
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_mnl_kernel_matches_reference(case: Case, dtype: torch.dtype):
    r, ranks = on_device(case, dtype)
    r = r.requires_grad_()
    loss = choice_ops.mnl_topk_rows(r, ranks)
    g = row_grad(ranks.shape[0], dtype)
    (grad,) = torch.autograd.grad(loss, r, g)

    r64 = case.rewards.clone().requires_grad_()
    want = mnl_topk_nll(r64, case.ranks)
    (want_grad,) = torch.autograd.grad(want, r64, g.cpu().double())

    scale = magnitude(case.rewards, case.ranks)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss.cpu(), want, dtype, scale)
    assert_close(grad.cpu(), want_grad, dtype, scale)
    assert_padding_grad_is_zero(grad, ranks)


@settings(max_examples=40)
@_with_examples
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_mallows_kernel_matches_reference(case: Case, dtype: torch.dtype):
    B = case.ranks.shape[0]
    r, ranks = on_device(case, dtype)
    r = r.requires_grad_()
    w64 = torch.linspace(0.0, 2.5, B, dtype=torch.float64)  # a zero weight included
    w = w64.to(device=DEVICE, dtype=dtype, copy=True).requires_grad_()
    loss = choice_ops.mallows_rmj_topk_rows(r, ranks, w)
    g = row_grad(B, dtype)
    grad, grad_w = torch.autograd.grad(loss, (r, w), g)

    r64 = case.rewards.clone().requires_grad_()
    w64 = w64.clone().requires_grad_()
    want = w64 * mallows_rmj_topk_sum(r64, case.ranks)
    want_grad, want_grad_w = torch.autograd.grad(want, (r64, w64), g.cpu().double())

    scale = magnitude(case.rewards, case.ranks, 2.5)
    assert loss.dtype == dtype and grad.dtype == dtype and grad_w.dtype == dtype
    assert_close(loss.cpu(), want, dtype, scale)
    assert_close(grad.cpu(), want_grad, dtype, scale)
    assert_close(grad_w.cpu(), want_grad_w, dtype, scale)
    assert_padding_grad_is_zero(grad, ranks)


# --- through the public API, every input dtype ---------------------------------------------

PUBLIC = {
    "mnl": lambda p, q, ranks, **kw: mnl_topk(p, q, ranks, **kw),
    "mallows": lambda p, q, ranks, **kw: mallows_rmj_topk(p, q, ranks, neg_log_phi=0.7, **kw),
}
LOGP_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@settings(max_examples=40)
@example(model="mnl", dtype=torch.bfloat16, reduction="mean", case=SINGLE_ROW)
@example(model="mallows", dtype=torch.float16, reduction="none", case=MOSTLY_PADDING)
@given(
    model=st.sampled_from(sorted(PUBLIC)),
    dtype=st.sampled_from(LOGP_DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    case=cases(max_b=16, max_s=24),
)
def test_public_losses_take_the_kernel_path_for_every_logp_dtype(model, dtype, reduction, case):
    beta = 0.5
    fn = PUBLIC[model]
    policy = (case.rewards / beta).to(device=DEVICE, dtype=dtype)
    ref = (0.25 * policy.float()).to(dtype)  # padding: NaN, inf or 0 in both
    policy, ref = policy.requires_grad_(), ref.requires_grad_()
    ranks = case.ranks.to(DEVICE)
    loss = fn(policy, ref, ranks, beta=beta, reduction=reduction, backend="triton")
    g = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, (policy, ref), g)

    # reference: the same (rounded) inputs in fp64 through the PyTorch path
    p64, q64 = (t.detach().cpu().double().requires_grad_() for t in (policy, ref))
    want = fn(p64, q64, case.ranks, beta=beta, reduction=reduction, backend="torch")
    want_grads = torch.autograd.grad(want, (p64, q64), g.cpu().double())

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scale = magnitude(beta * (p64 - q64).detach(), case.ranks, 0.7)
    assert loss.dtype == compute
    assert_close(loss.cpu(), want, compute, scale)
    for got, exp in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got.cpu(), exp, compute, beta * scale)
        assert_padding_grad_is_zero(got, ranks)


# --- gradcheck, opcheck, torch.compile --------------------------------------------------------


def _small_fp64(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    case = make_case(seed, 5, 6, 1.0, pad=float("nan"))
    r, ranks = on_device(case, torch.float64)
    return r, ranks


def test_gradcheck_mnl_fp64():
    r, ranks = _small_fp64()
    r = r.nan_to_num(0.0).requires_grad_()  # finite differences need finite inputs
    assert torch.autograd.gradcheck(lambda x: choice_ops.mnl_topk_rows(x, ranks), (r,))


def test_gradcheck_mallows_fp64():
    r, ranks = _small_fp64(1)
    r = r.nan_to_num(0.0).requires_grad_()
    w = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.3], dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: choice_ops.mallows_rmj_topk_rows(x, ranks, v), (r, w))


def test_opcheck():
    r, ranks = _small_fp64()
    r32 = r.float()
    w = torch.rand(r.shape[0], dtype=torch.float64, device=DEVICE)
    g = torch.randn(r.shape[0], dtype=torch.float64, device=DEVICE)
    for x in (r, r32):
        torch.library.opcheck(torch.ops.rcpo_losses.mnl_topk, (x.clone().requires_grad_(), ranks))
        torch.library.opcheck(
            torch.ops.rcpo_losses.mallows_rmj_topk,
            (x.clone().requires_grad_(), ranks, w.to(x.dtype, copy=True).requires_grad_()),
        )
        torch.library.opcheck(torch.ops.rcpo_losses.mnl_topk_backward, (g.to(x.dtype), x, ranks))
        torch.library.opcheck(torch.ops.rcpo_losses.mallows_rmj_topk_backward, (g.to(x.dtype), x, ranks, w.to(x.dtype)))


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_torch_compile_fullgraph_matches_eager(model):
    torch._dynamo.reset()
    case = make_case(11, 12, 7, 2.0)
    policy = case.rewards.to(device=DEVICE, dtype=torch.float32)
    ranks = case.ranks.to(DEVICE)
    ref = torch.zeros_like(policy)
    if model == "mnl":

        def fn(p, q, ranks):
            return mnl_topk(p, q, ranks, beta=0.5, backend="triton")
    else:
        w = torch.linspace(0.1, 1.0, 12, device=DEVICE, requires_grad=True)

        def fn(p, q, ranks):
            return mallows_rmj_topk(p, q, ranks, beta=0.5, neg_log_phi=w, backend="triton")

    inputs = (policy.clone().requires_grad_(), ref, ranks)
    eager = fn(*inputs)
    eager_grad = torch.autograd.grad(eager, inputs[0])[0]
    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    compiled_grad = torch.autograd.grad(compiled, inputs[0])[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-6)
    assert_padding_grad_is_zero(compiled_grad, ranks)


# --- determinism, dtypes, shapes, limits ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_deterministic(dtype):
    r, ranks = on_device(make_case(5, 40, 20, 3.0), dtype)
    w = torch.rand(40, dtype=dtype, device=DEVICE)

    def run():
        x = r.clone().requires_grad_()
        v = w.clone().requires_grad_()
        a = choice_ops.mnl_topk_rows(x, ranks)
        b = choice_ops.mallows_rmj_topk_rows(x, ranks, v)
        return (a, b, *torch.autograd.grad(a.sum() + b.sum(), (x, v)))

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("rank_dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_rank_dtype(rank_dtype):
    case = make_case(2, 9, 10, 1.0)
    r, ranks = on_device(case, torch.float32)
    want = (
        choice_ops.mnl_topk_rows(r, ranks),
        choice_ops.mallows_rmj_topk_rows(r, ranks, torch.ones(9, device=DEVICE)),
    )
    small = ranks.to(rank_dtype)
    got = (choice_ops.mnl_topk_rows(r, small), choice_ops.mallows_rmj_topk_rows(r, small, torch.ones(9, device=DEVICE)))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_strided_inputs_and_expanded_weight():
    case = make_case(4, 10, 9, 1.0)
    r, ranks = on_device(case, torch.float64)
    r_t = r.t().contiguous().t().requires_grad_()  # column-major storage
    ranks_t = ranks.t().contiguous().t()
    w = torch.tensor(0.8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for fn in (
        lambda x, k: choice_ops.mnl_topk_rows(x, k),
        lambda x, k: choice_ops.mallows_rmj_topk_rows(x, k, w.expand(x.shape[0])),
    ):
        got = fn(r_t, ranks_t)
        want = fn(r.detach().clone(), ranks)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(got.sum(), r_t)
        assert_padding_grad_is_zero(grad, ranks)


@pytest.mark.parametrize("S", [2, 8, 16])
def test_contiguous_fast_path_matches_the_strided_path(S):
    """S == BLOCK_S with contiguous rows takes the CONTIG path (padding is loaded, then zeroed); NaN stays out."""
    case = make_case(6, 33, S, 2.0, pad=float("nan"))
    r, ranks = on_device(case, torch.float32)
    r_t = r.t().contiguous().t()  # column-major: the general path
    w = torch.linspace(0.5, 1.5, 33, device=DEVICE)
    for fn in (
        lambda x: choice_ops.mnl_topk_rows(x, ranks),
        lambda x: choice_ops.mallows_rmj_topk_rows(x, ranks, w),
    ):
        x, x_t = r.clone().requires_grad_(), r_t.clone().requires_grad_()
        got, want = fn(x), fn(x_t)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(got.sum(), x)
        (grad_t,) = torch.autograd.grad(want.sum(), x_t)
        torch.testing.assert_close(grad, grad_t, rtol=0, atol=0)
        assert_padding_grad_is_zero(grad, ranks)


def test_wide_rows_in_one_block():
    case = make_case(9, 3, 200, 1.0)
    r, ranks = on_device(case, torch.float64)
    torch.testing.assert_close(choice_ops.mnl_topk_rows(r, ranks).cpu(), mnl_topk_nll(case.rewards, case.ranks))
    torch.testing.assert_close(
        choice_ops.mallows_rmj_topk_rows(r, ranks, torch.ones(3, dtype=torch.float64, device=DEVICE)).cpu(),
        mallows_rmj_topk_sum(case.rewards, case.ranks),
    )


def test_rows_wider_than_the_block_limit_fall_back_to_pytorch(monkeypatch):
    """The ops decide (``ops.backend.use_choice_kernel``); the ops never import the public losses."""
    from rcpo_losses.kernels import choice_common

    assert choice_common.MAX_BLOCK_S >= 64
    with pytest.raises(ValueError, match="one-block limit"):
        choice_common.check_block(choice_common.MAX_BLOCK_S + 1)
    # No dispatch back into the losses: the ops take only the PyTorch specifications (rcpo_losses.reference),
    # which serve the CPU path and the double backward.
    imported = set(re.findall(r"from \.\.(\w+)", Path(choice_ops.__file__).read_text()))
    assert not imported & {"mnl", "mallows"}, imported

    def no_kernel(*args):
        raise AssertionError("the kernel ran above MAX_BLOCK_S")

    monkeypatch.setattr(choice_common, "MAX_BLOCK_S", 8)
    monkeypatch.setattr(choice_ops, "mnl_topk_op", no_kernel)
    monkeypatch.setattr(choice_ops, "mallows_rmj_topk_op", no_kernel)
    case = make_case(8, 4, 12, 1.0)
    r, ranks = on_device(case, torch.float64)
    kw = {"reduction": "none", "backend": "triton"}
    torch.testing.assert_close(mnl_topk_from_rewards(r, ranks, **kw).cpu(), mnl_topk_nll(case.rewards, case.ranks))
    torch.testing.assert_close(
        mallows_rmj_topk_from_rewards(r, ranks, neg_log_phi=0.5, **kw).cpu(),
        0.5 * mallows_rmj_topk_sum(case.rewards, case.ranks),
    )
    assert not _backend.use_choice_kernel("triton", r) and _backend.use_choice_kernel("triton", r[:, :8])


def test_empty_batch():
    r = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    ranks = torch.zeros(0, 5, dtype=torch.int64, device=DEVICE)
    loss = choice_ops.mnl_topk_rows(r, ranks) + choice_ops.mallows_rmj_topk_rows(r, ranks, torch.ones(0, device=DEVICE))
    assert loss.shape == (0,)
    (grad,) = torch.autograd.grad(loss.sum(), r)
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_invalid_rows_without_validation_match_the_torch_path(model):
    # rows without a ranked response, or with one response: loss 0, left out of the mean
    ranks = torch.tensor([[0, UNRANKED, IGNORE], [UNRANKED, UNRANKED, IGNORE], [0, IGNORE, IGNORE], [1, 0, 2]])
    policy = torch.tensor([[1.0, 2.0, 0.0], [0.5, -0.5, 0.0], [3.0, 0.0, 0.0], [0.1, 0.2, 0.3]], device=DEVICE)
    ranks = ranks.to(DEVICE)
    for reduction in ("none", "mean"):
        out = {}
        for backend in ("triton", "torch"):
            p = policy.clone().requires_grad_()
            loss = PUBLIC[model](p, None, ranks, reduction=reduction, backend=backend, validate=False)
            out[backend] = (loss, torch.autograd.grad(loss.sum(), p)[0])
        for a, b in zip(out["triton"], out["torch"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- dispatch ------------------------------------------------------------------------------


def test_auto_backend_takes_triton_for_cuda_tensors_only(monkeypatch):
    assert _backend.use_triton("auto", SimpleNamespace(is_cuda=True)) is _backend.triton_available()
    assert not _backend.use_triton("auto", torch.zeros(1))
    called = []
    monkeypatch.setattr(choice_ops, "mnl_topk_op", lambda *a: called.append(a) or torch.zeros(1))
    case = make_case(0, 1, 3, 1.0)
    mnl_topk(case.rewards, None, case.ranks, backend="auto")
    mnl_topk(case.rewards, None, case.ranks, backend="torch")
    assert called == []  # CPU tensors: the PyTorch path, even with the interpreter on


def test_triton_backend_on_cpu_without_the_interpreter_raises():
    code = textwrap.dedent(
        """
        import torch
        from rcpo_losses import UNRANKED, mnl_topk
        try:
            mnl_topk(torch.zeros(1, 2), None, torch.tensor([[0, UNRANKED]]), backend="triton")
        except RuntimeError as e:
            print("RAISED", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout


def test_wrappers_check_shapes_and_devices():
    r = torch.zeros(3, 4, device=DEVICE)
    ranks = torch.tensor([[0, UNRANKED, IGNORE, IGNORE]] * 3, device=DEVICE)
    with pytest.raises(ValueError, match="rewards, ranks"):
        choice_ops.mnl_topk_rows(r, ranks[:, :3])
    with pytest.raises(TypeError, match="ranks"):
        choice_ops.mnl_topk_rows(r, ranks.float())
    with pytest.raises(ValueError, match="w: expected shape"):
        choice_ops.mallows_rmj_topk_rows(r, ranks, torch.ones(2, device=DEVICE))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="w: on cpu"):
            choice_ops.mallows_rmj_topk_rows(r, ranks, torch.ones(3))


# --- precision: each MNL stage is log(1 + sum_{j != pick} exp(r_j - r_pick)) ------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_well_separated_pair_keeps_relative_accuracy(backend):
    """fp32 policy log-probs 500 and 200, beta 0.1: the loss is -logsigmoid(30) = 9.36e-14, not 0."""
    policy = torch.tensor([[500.0, 200.0]], device=DEVICE, requires_grad=True)
    ranks = torch.tensor([[0, UNRANKED]], device=DEVICE)
    loss = mnl_topk(policy, None, ranks, beta=0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, policy)
    r = 0.1 * policy.detach().cpu().double()
    want = -torch.nn.functional.logsigmoid(r[0, 0] - r[0, 1])
    assert float(want) == pytest.approx(9.357622968839e-14, rel=1e-6)
    torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=0)
    want_grad = 0.1 * torch.sigmoid(r[0, 1] - r[0, 0])  # d/d policy_rejected; chosen gets minus that
    torch.testing.assert_close(grad.double().cpu()[0], torch.stack([-want_grad, want_grad]), rtol=1e-5, atol=0)


@settings(max_examples=40)
@example(margin=30.0, base=500.0, dtype=torch.float32)
@example(margin=-80.0, base=-3.0, dtype=torch.float32)
@example(margin=700.0, base=0.0, dtype=torch.float64)
@given(
    margin=st.floats(-1e3, 1e3),
    base=st.floats(-1e3, 1e3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_pairwise_mnl_is_minus_logsigmoid_to_relative_accuracy(margin, base, dtype):
    """Pairwise MNL = -logsigmoid(r_w - r_l), to a relative tolerance, on both backends."""
    r = torch.tensor([[base + margin, base]], dtype=dtype)
    ranks = torch.tensor([[0, UNRANKED]])
    diff = (r[:, 0] - r[:, 1]).double()  # the difference the loss sees, rounded as it rounds it
    want = -torch.nn.functional.logsigmoid(diff)
    tiny = torch.finfo(dtype).tiny  # below it (subnormal results) relative accuracy ends
    rtol = {torch.float32: 1e-5, torch.float64: 1e-13}[dtype]
    for backend in ("torch", "triton"):
        x = r.to(DEVICE).requires_grad_()
        loss = mnl_topk_from_rewards(x, ranks.to(DEVICE), reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        torch.testing.assert_close(loss.double().cpu(), want, rtol=rtol, atol=tiny)
        p = torch.sigmoid(-diff)
        torch.testing.assert_close(grad.double().cpu()[0], torch.cat([-p, p]), rtol=rtol, atol=tiny)
