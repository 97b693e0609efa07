"""What every benchmarks/bench_*.py shares: the device, a sync, compile limits, the copy baseline."""

from __future__ import annotations

import time

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
