"""Why the CPU fused LM head walks vocabulary tiles of all the tokens, and compiles its tile step with fixed widths.

    python benchmarks/cpu_tile_shapes.py [--n 2048 --h 512 --v 32000 --dtypes fp32,bf16]

1. The forward GEMM ``h @ W.T`` over the whole vocabulary, cut into ``rows x cols`` blocks
   (``torch.mm(..., out=)`` into one reused buffer): 64-row token chunks (the eager forward)
   against tiles of all ``N`` tokens.
2. One ``N x 1024`` tile of the tile step (``tile_stats``, ``tile_logits_grad`` of
   ``rcpo_losses.reference.token_stats``): eager, compiled with every size dynamic, and
   compiled with only the token dimension dynamic (what ``rcpo_losses.ops.backend.cpu_tile_step`` does).

Medians of 7 calls after two warm-ups, one process; name the CPU beside the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rcpo_losses.reference.token_stats import tile_local_targets, tile_logits_grad, tile_stats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_ms(fn, n: int = 7) -> float:
    fn()
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gemm_rows(h: torch.Tensor, w: torch.Tensor, rows: int, cols: int) -> float:
    N, V = h.shape[0], w.shape[0]
    out = h.new_empty((rows, cols))

    def run():
        for r in range(0, N, rows):
            for c in range(0, V, cols):
                c1 = min(c + cols, V)
                torch.mm(h[r : r + rows], w[c:c1].t(), out=out[: min(rows, N - r), : c1 - c])

    return median_ms(run)


def tile_step(dtype: torch.dtype, N: int, width: int, mode: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(N, width, generator=g) * 3).to(dtype)
    local = tile_local_targets(torch.randint(0, 4 * width, (N,), generator=g), 0, torch.ones(N, dtype=torch.bool))
    lse, ent, gl = torch.randn(N, generator=g) + 10, torch.rand(N, generator=g), torch.randn(N, generator=g)
    stats, grad = tile_stats, tile_logits_grad
    torch._dynamo.reset()
    if mode == "all dynamic":
        stats, grad = (torch.compile(f, dynamic=True, fullgraph=True) for f in (tile_stats, tile_logits_grad))
    elif mode == "token dim dynamic":
        stats, grad = (torch.compile(f, fullgraph=True) for f in (tile_stats, tile_logits_grad))
        for x in (z, local, lse, ent, gl):
            torch._dynamo.mark_dynamic(x, 0)
    a = median_ms(lambda: stats(z, local, None))
    b = median_ms(lambda: grad(z, local, None, lse, ent, gl, None, None, None, dtype))
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("\n| dtype | forward GEMM, blocks rows x cols | time |\n|---|---|---|")
    for name in args.dtypes.split(","):
        g = torch.Generator().manual_seed(1)
        h = torch.randn(args.n, args.h, generator=g).to(DTYPES[name])
        w = torch.randn(args.v, args.h, generator=g).to(DTYPES[name])
        for rows, cols in ((64, args.v), (256, args.v), (args.n, 1024), (args.n, 2048), (args.n, 4096)):
            print(f"| {name} | {rows} x {cols} | {gemm_rows(h, w, rows, cols):.0f} ms |", flush=True)
    print(f"\n| dtype | tile step, one {args.n} x 1024 tile | tile_stats | tile_logits_grad |\n|---|---|---|---|")
    for name in args.dtypes.split(","):
        for mode in ("eager", "all dynamic", "token dim dynamic"):
            a, b = tile_step(DTYPES[name], args.n, 1024, mode)
            print(f"| {name} | {mode} | {a:.2f} ms | {b:.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
