"""What every benchmarks/bench_*.py shares: the device, a sync, compile limits, the copy baseline."""

from __future__ import annotations

import json
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
