"""Where one forward + backward of ``fused_linear_token_stats`` spends its time on the CPU (torch.profiler).

    python benchmarks/profile_fused_cpu.py [--n 2048 --h 512 --v 32000 --dtypes fp32,bf16] [--no-entropy]
        [--token-chunks]

Self CPU time of each aten op over one call (after a warm-up call), grouped into the
matmuls (``mm``, ``addmm``, ``addmm_``: a GEMM accumulating into its output), the copies and
conversions (``copy_``, ``to``, ``clone``), the accumulation into fp32 (``add_`` of a bf16
``[V, H]`` or ``[N, H]`` product into an fp32 buffer) and the
chunk statistics (everything else: ``log_softmax``, ``softmax``, ``exp``, ``amax``, ``mul``, ...).
Where the tile step runs compiled (``rcpo_losses.ops.backend.CPU_COMPILE``, the default where a C++
compiler is found; ``--eager`` turns it off), its inductor kernels are the group ``compiled tile step``.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from rcpo_losses import fused_linear_token_stats
from rcpo_losses.ops import backend

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul"),
    "copy/convert": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "fp32 accumulate": ("aten::add_",),
}


COMPILED = "CompiledFxGraph"  # the profiler's name for a call of an inductor graph


def group_of(name: str) -> str:
    if COMPILED in name:
        return "compiled tile step"
    return next((g for g, names in GROUPS.items() if name in names), "chunk statistics")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--no-entropy", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--token-chunks", action="store_true", help="the backward over token chunks (as before)")
    p.add_argument("--eager", action="store_true", help="the tile step eagerly (CPU_COMPILE = False)")
    args = p.parse_args()
    if args.eager:
        backend.CPU_COMPILE = False
    if args.token_chunks:
        backend.CPU_VOCAB_TILES = False
    g = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        h = torch.randn(args.n, args.h, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(args.v, args.h, generator=g) * (2 / args.h**0.5)).to(dtype).requires_grad_()
        t = torch.randint(0, args.v, (args.n,), generator=g)

        def step(h=h, w=w, t=t):
            logp, ent = fused_linear_token_stats(h, w, t, validate=False, entropy=not args.no_entropy)
            loss = logp.sum() if args.no_entropy else logp.sum() + ent.sum()
            torch.autograd.grad(loss, (h, w))

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = [e for e in prof.key_averages() if e.key.startswith("aten::") or COMPILED in e.key]
        total = sum(e.self_cpu_time_total for e in events)
        split: dict[str, float] = {}
        for e in events:
            split[group_of(e.key)] = split.get(group_of(e.key), 0.0) + e.self_cpu_time_total
        print(
            f"\n{name}, N={args.n} H={args.h} V={args.v}, entropy={not args.no_entropy}, "
            f"backward over {'token chunks' if args.token_chunks else 'vocabulary tiles'}, "
            f"tile step {'eager' if not backend.cpu_compile(dtype) else 'compiled'}, "
            f"threads {torch.get_num_threads()}: {total / 1e3:.0f} ms of aten self time"
        )
        for group, us in sorted(split.items(), key=lambda kv: -kv[1]):
            print(f"  {group:<18} {us / 1e3:8.0f} ms  {100 * us / total:5.1f}%")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            key = "compiled graph " + e.key.split(COMPILED)[1].split()[0][:8] if COMPILED in e.key else e.key
            print(f"    {key:<28} {e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count}")


if __name__ == "__main__":
    main()
