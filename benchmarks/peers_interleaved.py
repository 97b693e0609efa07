"""rcpo-losses against its peers on one machine, interleaved: forward + backward, time and peak memory.

    python benchmarks/peers_interleaved.py tokens [--n 2048 --v 32000 --dtypes fp32,bf16 --rounds 5]
    python benchmarks/peers_interleaved.py fused [--n 2048 --h 512 --v 32000 --dtypes fp32,bf16 --rounds 5]

Each round runs every implementation once, in turn, so that the load of a shared machine
hits them alike; the table gives the median and the minimum over the rounds (after one
warm-up call each, which also compiles ``cce``'s ``torch_compile`` path). The same
implementations, inputs and step as ``bench_tokens.py`` / ``bench_fused_linear.py``
(``fwd_bwd``): the gradient of ``logp.sum() + entropy.sum()``, of ``logp.sum()`` for the
log-prob-only rows (``fused.noent``, ``cce``, ``liger``). The peak memory is that of one
call in a fresh subprocess (``common.peak_bytes``: ``MALLOC_MMAP_THRESHOLD_=65536`` on the
CPU), above the inputs; ``extra`` subtracts the gradients the call returns (the size of
the inputs that require grad). Peers that are not installed are left out (see ``peers.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fused_linear
import bench_tokens
from common import DEVICE, peak_bytes, sync
from peers import FUSED_PEERS, TOKEN_PEERS

SUITES = {  # the module whose inputs, implementations and step are used; ours first
    "tokens": (bench_tokens, ("chunked", *TOKEN_PEERS)),
    "fused": (bench_fused_linear, ("fused", "fused.noent", *FUSED_PEERS)),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--impls", default=None, help="comma-separated; default: ours and every installed peer")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    module, impls = SUITES[args.suite]
    peers = TOKEN_PEERS if args.suite == "tokens" else FUSED_PEERS
    impls = tuple(args.impls.split(",")) if args.impls else tuple(i for i in impls if peers.get(i, True) is not None)
    if args.suite == "tokens" and DEVICE == "cuda":
        impls = ("triton", *impls)
    sizes = (args.n, args.v) if args.suite == "tokens" else (args.n, args.h, args.v)
    print(
        f"{args.suite}, fwd_bwd, sizes {sizes}, {DEVICE}, threads {torch.get_num_threads()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}"
    )
    print("\n| dtype | impl | median | min | peak MB | extra MB | time / fastest peer | extra / its extra |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        inputs = module.make_inputs("fwd_bwd", *sizes, dtype)
        leaves = [x for x in inputs if x.requires_grad]
        grads_mb = sum(x.numel() * x.element_size() for x in leaves) / 1e6
        fns = {impl: module._impl(impl) for impl in impls}

        def call(impl: str, fns=fns, inputs=inputs) -> None:
            module._step(fns[impl], "fwd_bwd", *inputs)
            sync()

        for impl in impls:  # warm-up
            call(impl)
        times = {impl: [] for impl in impls}
        for _ in range(args.rounds):
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
        del inputs, leaves, fns


if __name__ == "__main__":
    main()
