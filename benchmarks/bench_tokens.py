"""Per-token target log-prob + entropy from logits: naive PyTorch, torch.compile, chunked, Triton, TRL.

Run (not collected by the normal test run, which only looks in tests/):

    python -m pytest benchmarks/bench_tokens.py --benchmark-json=out.json
    python benchmarks/bench_tokens.py --interleaved 5 [--n 2048 --v 32000 --dtypes fp32,bf16 --impls chunked,trl]

The second runs ours (``chunked``; ``triton`` too on CUDA) and every installed peer in
interleaved rounds, ``fwd_bwd`` only, and prints one Markdown table: median and minimum time,
the peak memory of one call and the ``extra`` above the gradient it returns, and both against
the fastest peer (``common.interleaved``). On a shared machine its ratios are the ones that
count: pytest-benchmark runs each row's rounds back to back.

Sizes ``(tokens, V)``: ``full`` = {(4096, 32000), (16384, 128256)}, the default on CUDA;
``small`` = {(1024, 32000), (256, 128256)}, the default without CUDA (the full sizes need
about 40 GB for the naive path and minutes per call on a small CPU). ``RCPO_BENCH_TOKENS``
(``full``, ``small`` or a list such as ``2048x32000,256x128256``) overrides the default.
``RCPO_BENCH_DTYPES`` (comma-separated, default ``bf16``; e.g. ``bf16,fp32``) picks the
dtype of the logits. ``RCPO_BENCH_IMPLS`` (comma-separated) runs only those implementations.

Implementations (``impl``):

- ``naive``: ``log_softmax`` in fp32, ``gather`` of the target, ``-(softmax * log_softmax).sum``;
- ``naive.compile``: the same under ``torch.compile(fullgraph=True, dynamic=False)``;
- ``chunked``: :func:`rcpo_losses.token_logps_and_entropy` with ``backend="torch"``;
- ``triton``: the same with ``backend="triton"`` (CUDA only);
- ``trl``: TRL 1.16's ``selective_log_softmax_and_entropy`` (a peer, see ``peers.py``; skipped
  when trl is not installed: ``pip install -e ".[bench]"``).

Modes: ``fwd`` under ``torch.no_grad()`` (the reference model), ``fwd_bwd`` (the policy:
forward, then the logits gradient for ``logp.sum() + entropy.sum()`` via
``torch.autograd.grad``, so no ``.grad`` accumulates between rounds). All targets are
valid (no ignored positions), so every implementation touches every logit.

``extra_info`` per benchmark: ``peak_mb`` and ``peak_copies``, the peak memory above the
inputs during one call, in MB and in copies of the logits (``fwd_bwd`` includes the
gradient it returns, one copy); on CUDA ``torch.cuda.max_memory_allocated``; on the
CPU the peak resident set of one call (``VmHWM`` reset before it) in a fresh subprocess
with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns every freed block above
64 KiB at once and the resident set tracks live tensors. (The timings run in-process with
the normal allocator: with that setting every chunk temporary would be a fresh mmap, and
its page faults would be timed too.) ``bytes`` is what a fused implementation must move
(``fwd``: read the logits once; ``fwd_bwd``: that, plus read them again and write the
gradient: ``3 N V`` bf16 elements), ``gbps`` the achieved rate for those bytes and
``pct_of_copy`` that relative to a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also from a subprocess
from common import DEVICE, interleaved, measure_copy_gbps, peak_bytes, sync
from peers import TOKEN_PEERS

from rcpo_losses import token_logps_and_entropy

SIZE = os.environ.get("RCPO_BENCH_TOKENS", "full" if DEVICE == "cuda" else "small")
if SIZE == "full":
    SHAPES = ((4096, 32000), (16384, 128256))
elif SIZE == "small":
    SHAPES = ((1024, 32000), (256, 128256))
else:
    try:
        SHAPES = tuple(tuple(int(n) for n in shape.split("x", 1)) for shape in SIZE.split(","))
    except ValueError:
        raise ValueError(f"RCPO_BENCH_TOKENS: expected 'full', 'small' or NxV[,NxV...], got {SIZE!r}") from None
ROUNDS = 10 if DEVICE == "cuda" else 5
IMPLS = ("naive", "naive.compile", "chunked", "triton", *TOKEN_PEERS)
if os.environ.get("RCPO_BENCH_IMPLS"):
    IMPLS = tuple(i for i in os.environ["RCPO_BENCH_IMPLS"].split(",") if i)
_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES = tuple(d.strip() for d in os.environ.get("RCPO_BENCH_DTYPES", "bf16").split(","))


def naive(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """The obvious version: several fp32 ``[N, V]`` tensors alive at once."""
    z = logits.float()
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = log_p.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1)
    ent = -(torch.softmax(z, dim=-1) * log_p).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


_naive_compiled = torch.compile(naive, fullgraph=True, dynamic=False)


def _impl(name: str):
    if name == "naive":
        return naive
    if name == "naive.compile":
        return _naive_compiled
    if name in TOKEN_PEERS:
        return TOKEN_PEERS[name]
    backend = "torch" if name == "chunked" else "triton"
    return lambda z, t: token_logps_and_entropy(z, t, backend=backend, validate=False)


def _step(fn, mode: str, x: torch.Tensor, t: torch.Tensor):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x, t)
    logp, ent = fn(x, t)
    return torch.autograd.grad(logp.sum() + ent.sum(), x)


def make_inputs(mode: str, N: int, V: int, dtype: str = "bf16"):
    # Drawn on the device: the host takes seconds a row to draw the full sizes' 2e9 numbers.
    g = torch.Generator(DEVICE).manual_seed(N + V)
    x = (torch.randn(N, V, generator=g, device=DEVICE) * 2).to(_DTYPE_NAMES[dtype]).requires_grad_(mode == "fwd_bwd")
    t = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    return x, t


def cpu_peak_bytes(mode: str, impl: str, N: int, V: int, dtype: str, start, peak) -> int:
    """In a fresh subprocess (``common.peak_bytes``): peak resident set above the inputs, one call."""
    x, t = make_inputs(mode, N, V, dtype)
    fn = _impl(impl)
    if impl in ("naive.compile", *TOKEN_PEERS):  # compile, and a peer's one-off imports and caches
        _step(fn, mode, x, t)  # compile first: the compiler's own memory is not the op's
    base = start()
    out = _step(fn, mode, x, t)
    del out
    return peak() - base


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    return measure_copy_gbps(torch.bfloat16, 512 if DEVICE == "cuda" else 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ("fwd", "fwd_bwd"))
def test_token_stats(benchmark, copy_gbps, mode, impl, shape, dtype):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("the Triton kernel is benchmarked on CUDA only (the interpreter says nothing about speed)")
    if impl in TOKEN_PEERS and TOKEN_PEERS[impl] is None:
        pytest.skip(f"{impl} is not installed (pip install -e '.[bench]')")
    N, V = shape
    x, t = make_inputs(mode, N, V, dtype)
    fn = _impl(impl)

    def run():
        out = _step(fn, mode, x, t)
        sync()
        return out

    run()  # warm-up: compilation, autotuning, allocator
    peak = peak_bytes(run, __file__, mode, impl, N, V, dtype)
    benchmark.group = f"token stats {mode} {N}x{V} {dtype}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    copy_bytes = N * V * x.element_size()
    moved = copy_bytes * (1 if mode == "fwd" else 3)
    gbps = moved / benchmark.stats.stats.median / 1e9
    if impl in TOKEN_PEERS:
        benchmark.extra_info.update(peer=impl)
    benchmark.extra_info.update(
        impl=impl,
        dtype=dtype,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        bytes=moved,
        gbps=gbps,
        pct_of_copy=100 * gbps / copy_gbps,
        copy_gbps=copy_gbps,
    )
    if peak is not None:
        benchmark.extra_info.update(peak_mb=peak / 1e6, peak_copies=peak / copy_bytes)


if __name__ == "__main__":
    ours = ("triton", "chunked") if DEVICE == "cuda" else ("chunked",)
    interleaved(sys.modules[__name__], (*ours, *TOKEN_PEERS), TOKEN_PEERS, "nv")
