"""Forward + backward of ``mnl_topk`` and ``mallows_rmj_topk``: PyTorch eager, torch.compile, Triton.

Run (not collected by the normal test run, which only looks in tests/):

    python -m pytest benchmarks/bench_choice.py --benchmark-json=out.json

Grid: ``B`` in {112, 4096, 262144} x ``S`` in {2, 5, 8, 16}. ``RCPO_BENCH_GRID=small``
runs ``B`` in {112, 4096} x ``S`` in {2, 16} instead; it is the default without CUDA
(``RCPO_BENCH_GRID=full`` forces the whole grid). The Triton kernels run only on CUDA
(on the CPU they would run under the interpreter, which says nothing about speed).

Each call is one training step's worth of the loss: ``policy_logps`` (fp32, requires
grad) and ``ref_logps`` (fp32) ``[B, S]``, int64 ranks with a random ``|S_b|`` in
``[2, S]`` and ``k_b`` in ``[1, |S_b|]`` per row, ``reduction="mean"``,
``validate=False``; the gradient w.r.t. ``policy_logps`` is computed. The ``extra_info``
of each benchmark holds the bytes that a fused implementation must move
(read policy, ref and ranks, write the gradient: ``B * S * (4 + 4 + 8 + 4)``), the
achieved GB/s for those bytes, and the same relative to a device-to-device copy measured
in the same run (``copy_gbps``, ``pct_of_copy``).

On a small CPU machine shared with other work, run with ``OMP_NUM_THREADS=1``: with
more OpenMP threads than free cores, the compiled (inductor C++) graphs spin-wait and
run 10 to 100 times slower, which measures the machine, not the code.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also from a subprocess
from common import DEVICE, measure_copy_gbps, sync

from rcpo_losses import IGNORE, UNRANKED, mallows_rmj_topk, mnl_topk

GRID = os.environ.get("RCPO_BENCH_GRID", "full" if DEVICE == "cuda" else "small")
if GRID == "full":
    BATCH, SLOTS = (112, 4096, 262144), (2, 5, 8, 16)
elif GRID == "small":
    BATCH, SLOTS = (112, 4096), (2, 16)
else:
    raise ValueError(f"RCPO_BENCH_GRID: expected 'full' or 'small', got {GRID!r}")

IMPLS = ("torch", "torch.compile", "triton")
LOSSES = {
    "mnl_topk": lambda p, q, ranks, w, backend: mnl_topk(p, q, ranks, beta=0.1, backend=backend, validate=False),
    "mallows_rmj_topk": lambda p, q, ranks, w, backend: mallows_rmj_topk(
        p, q, ranks, beta=0.1, neg_log_phi=w, backend=backend, validate=False
    ),
}


def random_ranks(B: int, S: int, generator: torch.Generator) -> torch.Tensor:
    """Per row: ``|S_b|`` uniform in ``[2, S]``, ``k_b`` in ``[1, |S_b|]``, slots shuffled."""
    n = torch.randint(2, S + 1, (B, 1), generator=generator)
    k = 1 + (torch.rand(B, 1, generator=generator) * n).long().clamp(max=n - 1)
    position = torch.rand(B, S, generator=generator).argsort(-1)
    ranks = torch.where(position < k, position, torch.where(position < n, UNRANKED, IGNORE))
    return ranks.to(DEVICE)


def make_inputs(B: int, S: int):
    g = torch.Generator().manual_seed(B * 100 + S)
    policy = (torch.randn(B, S, generator=g) * 20 - 100).to(DEVICE).requires_grad_()
    ref = (torch.randn(B, S, generator=g) * 20 - 100).to(DEVICE)
    ranks = random_ranks(B, S, g)
    w = (torch.rand(B, generator=g) + 0.5).to(DEVICE)
    return policy, ref, ranks, w


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    return measure_copy_gbps(torch.float32, 256 if DEVICE == "cuda" else 32)


def test_copy_baseline(benchmark, copy_gbps):
    """The copy the GB/s figures are measured against, as a benchmark row of its own."""
    n = (256 if DEVICE == "cuda" else 32) * 2**20 // 4
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync()

    benchmark.group = "device-to-device copy"
    benchmark(run)
    bytes_moved = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update(bytes=bytes_moved, gbps=bytes_moved / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("S", SLOTS)
@pytest.mark.parametrize("B", BATCH)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_choice_loss_fwd_bwd(benchmark, copy_gbps, loss, impl, B, S):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("Triton kernels are benchmarked on CUDA only")
    policy, ref, ranks, w = make_inputs(B, S)
    fn = LOSSES[loss]
    backend = "triton" if impl == "triton" else "torch"
    if impl == "torch.compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, dynamic=False)

    def run():
        out = fn(policy, ref, ranks, w, backend)
        (grad,) = torch.autograd.grad(out, policy)
        sync()
        return grad

    for _ in range(3):  # compile, autotune, warm caches
        run()
    benchmark.group = f"{loss} B={B} S={S}"
    benchmark(run)
    bytes_moved = B * S * (4 + 4 + 8 + 4)
    gbps = bytes_moved / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(
        impl=impl,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        bytes=bytes_moved,
        gbps=round(gbps, 2),
        copy_gbps=round(copy_gbps, 2),
        pct_of_copy=round(100 * gbps / copy_gbps, 1),
    )
