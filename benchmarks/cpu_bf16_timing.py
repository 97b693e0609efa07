"""bf16 vs fp32, fused vs unfused, forward + backward on the CPU, in one interleaved run.

    python benchmarks/cpu_bf16_timing.py [--n 4096 --h 512 --v 32000 --rounds 5]

Each round runs every implementation once, in turn, so that the load of a shared machine
hits them alike; the table gives the minimum and the median over the rounds. Forward, then
the gradients w.r.t. ``hidden`` and ``weight`` of ``logp.sum() + entropy.sum()``.
Implementations: ``fused`` (``fused_linear_token_stats``, PyTorch chunk path), ``fused.bf16ops``
(bf16 only: the same with ``CPU_FP32_MATMUL=False``, the chunk matmuls in bf16 as before the
fix), ``unfused`` (``token_logps_and_entropy(hidden @ weight.T)``). A CPU with a bf16 GEMM (AMX,
AVX512-BF16) can imitate one without by restricting PyTorch, oneDNN and MKL to AVX2:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy
from rcpo_losses.ops import backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step(impl: str, h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
    if impl == "unfused":
        logp, ent = token_logps_and_entropy(h @ w.T, t, validate=False)
    else:
        backend.CPU_FP32_MATMUL = False if impl == "fused.bf16ops" else None
        logp, ent = fused_linear_token_stats(h, w, t, validate=False, backend="torch")
    torch.autograd.grad(logp.sum() + ent.sum(), (h, w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default="fused:fp32,fused:bf16,unfused:fp32", help="impl:dtype,...")
    args = parser.parse_args()
    rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(args.n, args.h, generator=g)
    w32 = torch.randn(args.v, args.h, generator=g) * (2 / args.h**0.5)
    t = torch.randint(0, args.v, (args.n,), generator=g)
    inputs = {d: (h32.to(DTYPES[d]).requires_grad_(), w32.to(DTYPES[d]).requires_grad_()) for d in DTYPES}
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
        f"bf16 matmul probed slow: {backend.slow_cpu_matmul(torch.bfloat16)}"
    )
    for impl, d in rows:  # warm-up
        step(impl, *inputs[d], t)
    times = {r: [] for r in rows}
    for _ in range(args.rounds):
        for impl, d in rows:
            start = time.perf_counter()
            step(impl, *inputs[d], t)
            times[(impl, d)].append(time.perf_counter() - start)
    print(f"\nfwd+bwd N={args.n} H={args.h} V={args.v}, {args.rounds} interleaved rounds\n")
    print("| impl | dtype | min | median |\n|---|---|---|---|")
    for (impl, d), ts in times.items():
        print(f"| {impl} | {d} | {min(ts):.2f} s | {statistics.median(ts):.2f} s |")


if __name__ == "__main__":
    main()
