"""What every benchmarks/bench_*.py shares: the device, a sync, compile limits, the copy baseline, peak memory.

Not run on its own: the bench files import it. ``interleaved`` is the command line of
``bench_tokens.py`` and ``bench_fused_linear.py`` (``python benchmarks/bench_tokens.py --interleaved 5``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# One compiled graph per benchmarked shape: more than dynamo's default cache holds.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_copy_gbps(dtype: torch.dtype, mib: int) -> float:
    """Bandwidth of a device-to-device copy of ``mib`` MiB (bytes read + written per second), in GB/s."""
    src = torch.randn(mib * 2**20 // torch.finfo(dtype).bits * 8, device=DEVICE, dtype=dtype)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t0) / 1e9


# A fresh interpreter loads the benchmark file and calls its ``cpu_peak_bytes(*args, start, peak)``.
_CPU_SCRIPT = """
import importlib.util
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(json.dumps(m.cpu_peak_bytes(*json.loads(sys.argv[2]), start, peak)))
"""


def peak_bytes(run, bench_file: str, *args, timeout: float = 1200) -> int | None:
    """Peak memory above the inputs of one call of ``run``.

    On CUDA the caching allocator's peak. On a Linux CPU, ``bench_file``'s
    ``cpu_peak_bytes(*args, start, peak)`` runs in a fresh subprocess under
    ``tests/peak_memory.py`` (``MALLOC_MMAP_THRESHOLD_=65536``), so that the resident set
    tracks live tensors; elsewhere ``None``.
    """
    if DEVICE == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        sync()
        del out
        return torch.cuda.max_memory_allocated() - base
    if not sys.platform.startswith("linux"):
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import peak_memory

    threads = torch.get_num_threads()
    return peak_memory.run(_CPU_SCRIPT, bench_file, json.dumps(args), timeout=timeout, threads=threads)


def interleaved(module, impls: tuple[str, ...], peers: dict, dims: str, argv: list[str] | None = None) -> None:
    """Ours against the peers on one machine, interleaved: ``fwd_bwd`` time and peak memory of each implementation.

    The command line of ``module`` (``bench_tokens`` with ``dims="nv"``, ``bench_fused_linear`` with
    ``dims="nhv"``): its inputs (``make_inputs``), implementations (``_impl``) and step (``_step``).
    Each round runs every implementation once, in turn, so that the load of a shared machine hits
    them alike; the table gives the median and the minimum over the rounds (after one warm-up call
    each, which also compiles). The peak memory is that of one call in a fresh subprocess
    (``peak_bytes``); ``extra`` subtracts the gradients the call returns (the size of the inputs
    that require grad). Peers that are not installed are left out (``peers.py``).
    """
    parser = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS", required=True, help="rounds, every impl once each")
    for dim, default in (("n", 2048), ("h", 512), ("v", 32000)):
        if dim in dims:
            parser.add_argument(f"--{dim}", type=int, default=default)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=None, help="comma-separated; default: ours and every installed peer")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    impls = tuple(args.impls.split(",")) if args.impls else tuple(i for i in impls if peers.get(i, True) is not None)
    sizes = tuple(getattr(args, dim) for dim in dims)
    print(
        f"{Path(module.__file__).stem}, fwd_bwd, sizes {sizes}, {DEVICE}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}"
    )
    print("\n| dtype | impl | median | min | peak MB | extra MB | time / fastest peer | extra / its extra |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        inputs = module.make_inputs("fwd_bwd", *sizes, dtype)
        grads_mb = sum(x.numel() * x.element_size() for x in inputs if x.requires_grad) / 1e6
        fns = {impl: module._impl(impl) for impl in impls}

        def call(impl: str, fns=fns, inputs=inputs) -> None:
            module._step(fns[impl], "fwd_bwd", *inputs)
            sync()

        for impl in impls:  # warm-up
            call(impl)
        times = {impl: [] for impl in impls}
        for _ in range(args.interleaved):
            for impl in impls:
                start = time.perf_counter()
                call(impl)
                times[impl].append(time.perf_counter() - start)
        peaks = {}
        for impl in impls:
            if not args.no_memory:
                peak = peak_bytes(lambda impl=impl: call(impl), module.__file__, "fwd_bwd", impl, *sizes, dtype)
                peaks[impl] = None if peak is None else peak / 1e6
        median = {impl: statistics.median(ts) for impl, ts in times.items()}
        in_peers = [impl for impl in impls if impl in peers]
        fastest = min(in_peers, key=median.get) if in_peers else None
        for impl in impls:
            peak = peaks.get(impl)
            extra = None if peak is None else peak - grads_mb
            cells = [dtype, impl, f"{median[impl] * 1e3:.0f} ms", f"{min(times[impl]) * 1e3:.0f} ms"]
            cells += ["" if peak is None else f"{peak:.0f}", "" if extra is None else f"{extra:.0f}"]
            if fastest:
                cells.append(f"{median[impl] / median[fastest]:.2f} ({fastest})")
                their = None if peaks.get(fastest) is None else peaks[fastest] - grads_mb
                cells.append(f"{extra / their:.3f}" if extra is not None and their else "")
            print("| " + " | ".join(cells) + " |", flush=True)
        del inputs, fns
