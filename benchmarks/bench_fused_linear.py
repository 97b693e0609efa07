"""LM head + per-token log-prob and entropy from bf16 hidden states: unfused, naive, compiled, fused.

Run (not collected by the normal test run, which only looks in tests/):

    python -m pytest benchmarks/bench_fused_linear.py --benchmark-json=out.json
    python benchmarks/bench_fused_linear.py --interleaved 5 [--n 2048 --h 512 --v 32000 --dtypes fp32,bf16
        --impls fused,fused.noent,cce]

The second runs ``fused``, ``fused.noent`` and every installed peer (or ``--impls``) in
interleaved rounds, ``fwd_bwd`` only, and prints one Markdown table: median and minimum time,
the peak memory of one call and the ``extra`` above the gradients it returns, and both against
the fastest peer (``common.interleaved``). On a shared machine its ratios are the ones that
count: pytest-benchmark runs each row's rounds back to back.

Sizes ``(tokens N, hidden H, vocabulary V)``: ``full`` = N in {4096, 16384}, H = 4096,
V = 128256 (Llama-3), the default on CUDA; ``small`` = N in {1024, 4096}, H = 512,
V = 32000, the default without CUDA (the full sizes need about 40 GB for the naive path
and 20 to 70 TFLOP per step, minutes on a small CPU). ``RCPO_BENCH_FUSED`` (``full``,
``small`` or a list such as ``2048x512x32000``) overrides the default; ``RCPO_BENCH_IMPLS``
(comma-separated) runs only those implementations. ``RCPO_BENCH_DTYPES`` (comma-separated, default ``bf16``;
e.g. ``bf16,fp32``) picks the dtypes of ``hidden`` and ``weight``.

bf16 on a CPU without a bf16 GEMM (AVX2): the fused path then does its chunk matmuls on
fp32 operands (see ``rcpo_losses.ops.backend.CPU_FP32_MATMUL``). To measure that on a CPU
that has one (AMX, AVX512-BF16), restrict PyTorch, oneDNN and MKL to AVX2, as in
docs/benchmarks.md: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.

Implementations (``impl``), all from ``hidden [N, H]`` and ``weight [V, H]`` (bf16 unless set):

- ``naive``: ``hidden @ weight.T``, then ``log_softmax`` in fp32, ``gather``, ``-(softmax * log_softmax).sum``;
- ``naive.compile``: the same under ``torch.compile(fullgraph=True, dynamic=False)``;
- ``unfused``: ``hidden @ weight.T``, then :func:`rcpo_losses.token_logps_and_entropy`
  (the Triton kernel on CUDA, the chunked PyTorch path on the CPU);
- ``fused``: :func:`rcpo_losses.fused_linear_token_stats` (default chunk; Triton chunk
  math on CUDA, PyTorch chunk math on the CPU);
- ``fused.torch``: the same with ``backend="torch"`` (CUDA only: cuBLAS + the PyTorch chunk math);
- ``fused.noent``: ``fused``, ``entropy=False`` (log-prob only, like ``cce`` and ``liger``);
- ``fused.eager``, ``fused.eager.noent`` (CPU): the same with ``ops_backend.CPU_COMPILE=False``,
  the tile step run eagerly (what a machine without a C++ compiler gets; ``fused`` compiles it
  where one is found, and its warm-up call pays the compile);
- ``fused.tokens``, ``fused.tokens.noent`` (not run by default; CPU): the same with
  ``ops_backend.CPU_VOCAB_TILES=False``, the backward over token chunks as before the
  vocabulary tiles;
- peers (``peers.py``; skipped when not installed, ``pip install -e ".[bench]"``): ``trl.chunked``
  (TRL 1.16's ``ChunkedLogProbFunction``, log-prob and entropy), ``cce`` (cut-cross-entropy
  25.1.1, ``impl="cce"`` on CUDA, ``"torch_compile"`` on the CPU) and ``liger`` (CUDA only),
  both log-prob only: their ``fwd_bwd`` differentiates ``logp.sum()``.

Modes: ``fwd`` under ``torch.no_grad()`` (the reference model) and ``fwd_bwd`` (the policy:
forward, then the gradients w.r.t. ``hidden`` and ``weight`` of ``logp.sum() + entropy.sum()``
via ``torch.autograd.grad``). All targets are valid.

``extra_info`` per benchmark: ``peak_mb`` and ``peak_copies``, the peak memory above the
inputs during one call, in MB and in copies of the bf16 logits ``[N, V]`` (``fwd_bwd``
includes the gradients it returns, ``(N + V) H`` bf16 elements); on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the peak resident set of one call in a fresh
subprocess (``tests/peak_memory.py``: ``MALLOC_MMAP_THRESHOLD_=65536``, after one warm-up
call). ``tflops``: the matmul work of the unfused computation (``2 N H V`` for ``fwd``,
``6 N H V`` for ``fwd_bwd``) per second, the same count for every implementation so that it
compares like the time does (the fused backward does one more matmul, ``8 N H V`` in all).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also from a subprocess
from common import DEVICE, interleaved, peak_bytes, sync
from peers import FUSED_PEERS

from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy
from rcpo_losses.ops import backend as ops_backend

SIZE = os.environ.get("RCPO_BENCH_FUSED", "full" if DEVICE == "cuda" else "small")
if SIZE == "full":
    SHAPES = ((4096, 4096, 128256), (16384, 4096, 128256))
elif SIZE == "small":
    SHAPES = ((1024, 512, 32000), (4096, 512, 32000))
else:
    try:
        SHAPES = tuple(tuple(int(n) for n in shape.split("x", 2)) for shape in SIZE.split(","))
    except ValueError:
        raise ValueError(f"RCPO_BENCH_FUSED: expected 'full', 'small' or NxHxV[,...], got {SIZE!r}") from None
ROUNDS = 10 if DEVICE == "cuda" else 3
IMPLS = ("naive", "naive.compile", "unfused", "fused", "fused.torch", "fused.noent", "fused.eager", "fused.eager.noent")
IMPLS = (*IMPLS, *FUSED_PEERS)
if os.environ.get("RCPO_BENCH_IMPLS"):
    IMPLS = tuple(i for i in os.environ["RCPO_BENCH_IMPLS"].split(",") if i)
_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES = tuple(_DTYPE_NAMES[d.strip()] for d in os.environ.get("RCPO_BENCH_DTYPES", "bf16").split(","))


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """The obvious version: bf16 logits, then several fp32 ``[N, V]`` tensors alive at once."""
    z = (hidden @ weight.T).float()
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(torch.softmax(z, dim=-1) * log_p).sum(-1)
    return logp, ent


_naive_compiled = torch.compile(naive, fullgraph=True, dynamic=False)


def _impl(name: str):
    if name == "naive":
        return naive
    if name == "naive.compile":
        return _naive_compiled
    if name == "unfused":
        return lambda h, w, t: token_logps_and_entropy(h @ w.T, t, validate=False)
    if name in FUSED_PEERS:
        return FUSED_PEERS[name]
    if name.startswith("fused") and DEVICE == "cpu":
        # The CPU path: over vocabulary tiles (default), or over token chunks as before them
        # ("fused.tokens*"); its tile step compiled where it can be (default) or eager ("fused.eager*").
        # Set at the start of each call and left so for the backward that follows.
        tiles = None if not name.startswith("fused.tokens") else False
        compiled = False if name.startswith("fused.eager") else None
        entropy = not name.endswith("noent")

        def cpu_fused(h, w, t):
            ops_backend.CPU_VOCAB_TILES = tiles
            ops_backend.CPU_COMPILE = compiled
            logp, ent = fused_linear_token_stats(h, w, t, entropy=entropy, validate=False)
            return logp, ent if entropy else None

        return cpu_fused
    if name == "fused.noent":
        return lambda h, w, t: (fused_linear_token_stats(h, w, t, entropy=False, validate=False)[0], None)
    backend = "torch" if name == "fused.torch" else "auto"
    return lambda h, w, t: fused_linear_token_stats(h, w, t, backend=backend, validate=False)


def _step(fn, mode: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """Forward; for ``fwd_bwd`` also the gradients of ``logp.sum() + entropy.sum()`` (``logp.sum()`` without one)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(h, w, t)
    logp, ent = fn(h, w, t)
    return torch.autograd.grad(logp.sum() if ent is None else logp.sum() + ent.sum(), (h, w))


def make_inputs(mode: str, N: int, H: int, V: int, dtype: str = "bf16"):
    g = torch.Generator(DEVICE).manual_seed(N + H + V)  # on the device: the host is slow at the full sizes
    grad = mode == "fwd_bwd"
    dtype = _DTYPE_NAMES[dtype]
    h = torch.randn(N, H, generator=g, device=DEVICE).to(dtype).requires_grad_(grad)
    w = (torch.randn(V, H, generator=g, device=DEVICE) * (2 / H**0.5)).to(dtype).requires_grad_(grad)
    t = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    return h, w, t


def cpu_peak_bytes(mode: str, impl: str, N: int, H: int, V: int, dtype: str, start, peak) -> int:
    """In this process (a fresh subprocess, see below): peak resident set above the inputs, one call."""
    h, w, t = make_inputs(mode, N, H, V, dtype)
    fn = _impl(impl)
    _step(fn, mode, h, w, t)  # warm-up: compilation, the custom ops' one-off imports
    base = start()
    out = _step(fn, mode, h, w, t)
    del out
    return peak() - base


@pytest.mark.parametrize("dtype", [str(d).removeprefix("torch.") for d in DTYPES])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ("fwd", "fwd_bwd"))
def test_fused_linear(benchmark, mode, impl, shape, dtype):
    if impl == "fused.torch" and DEVICE != "cuda":
        pytest.skip("on the CPU, fused already runs the PyTorch chunk math")
    if impl.startswith("fused.eager") and DEVICE != "cpu":
        pytest.skip("the compiled tile step is the CPU's")
    if impl in FUSED_PEERS and FUSED_PEERS[impl] is None:
        why = "needs CUDA" if impl == "liger" and DEVICE != "cuda" else "is not installed (pip install -e '.[bench]')"
        pytest.skip(f"{impl} {why}")
    dtype = {v: k for k, v in _DTYPE_NAMES.items()}[getattr(torch, dtype)]
    N, H, V = shape
    h, w, t = make_inputs(mode, N, H, V, dtype)
    fn = _impl(impl)

    def run():
        out = _step(fn, mode, h, w, t)
        sync()
        return out

    run()  # warm-up: compilation, autotuning, allocator
    peak = peak_bytes(run, __file__, mode, impl, N, H, V, dtype)
    benchmark.group = f"fused linear {mode} N={N} H={H} V={V}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    flops = 2 * N * H * V * (1 if mode == "fwd" else 3)
    if impl in FUSED_PEERS:
        benchmark.extra_info.update(peer=impl)
    benchmark.extra_info.update(
        impl=impl,
        dtype=dtype,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu {torch.backends.cpu.get_cpu_capability()}",
        tflops=flops / benchmark.stats.stats.median / 1e12,
    )
    if peak is not None:
        benchmark.extra_info.update(peak_mb=peak / 1e6, peak_copies=peak / (N * V * h.element_size()))


if __name__ == "__main__":
    interleaved(sys.modules[__name__], ("fused", "fused.noent", *FUSED_PEERS), FUSED_PEERS, "nhv")
