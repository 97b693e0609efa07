"""Peak memory and time of one prefix-shared attention layer on the CPU: the dense mask against the segments.

Run from the repository root:

    python benchmarks/segment_attention_memory.py                  # packed lengths >= 4,096 and >= 16,384
    python benchmarks/segment_attention_memory.py --tokens 16384

The packed batch: ``bench_ranked_step.make_rows`` prompts (uniform ``[140, 200]`` tokens, 5
completions of ``[200, 600]``), as many as reach ``--tokens`` packed positions ``P``. One layer
of ``bench_ranked_step``'s model (8 heads of 64, bf16): ``q, k, v`` of ``(1, 8, P, 64)``, the
mask built from the batch (``dense``: :func:`rcpo_losses.training.packing.dense_attention_mask`, bool
``(1, 1, P, P)``, into ``sdpa``; ``segments``: :func:`rcpo_losses.training.segment_attention.segments`
into :func:`~rcpo_losses.training.segment_attention.segment_attention_forward`), forward and backward.
Each path runs in a fresh subprocess (``tests/peak_memory.py``, ``MALLOC_MMAP_THRESHOLD_=65536``,
so the resident set tracks live tensors); its peak is above ``q, k, v`` and the batch, and
counts the mask's construction. Time: the second of two calls in that process.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]

HEADS, DIM = 8, 64

SCRIPT = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import torch
import segment_attention_memory as bench
print(json.dumps(bench.measure(sys.argv[2], int(sys.argv[3]), start, peak)))
"""


def packed_batch(tokens: int) -> dict:
    from bench_ranked_step import S, make_rows

    from rcpo_losses.training.packing import pack_prefix_shared

    n = 1
    while True:
        prompts, completions, _ = make_rows(n)
        batch = pack_prefix_shared(prompts, completions, S)
        if batch["input_ids"].shape[-1] >= tokens:
            return batch
        n += 1


def measure(path: str, tokens: int, start, peak) -> dict:
    """In the subprocess: peak bytes above the inputs and seconds of one forward and backward of ``path``."""
    import time

    import torch

    from rcpo_losses.training.packing import dense_attention_mask
    from rcpo_losses.training.segment_attention import KWARG, segment_attention_forward, segments

    batch = packed_batch(tokens)
    P = batch["input_ids"].shape[-1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, P, DIM, generator=g).bfloat16().requires_grad_() for _ in range(3))
    module = type("Attention", (), {"config": None, "layer_idx": 0, "training": True})()

    def run():
        if path == "dense":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_attention_mask(batch))
        else:
            layout = segments(batch, {None: (None, None)})
            out = segment_attention_forward(module, q, k, v, None, **{KWARG: layout})[0]
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    base = start()
    run()
    measured = peak() - base
    t0 = time.perf_counter()
    run()
    return {"P": P, "peak_bytes": measured, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="smallest packed lengths P")
    args = parser.parse_args()
    import peak_memory
    import torch

    from rcpo_losses.training.packing import attended_pairs

    print(f"{torch.get_num_threads()} threads")
    print("| P | prompts | P^2 | mask nonzeros | attention | peak above q, k, v | forward + backward |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        batch = packed_batch(tokens)
        P, prompts, pairs = batch["input_ids"].shape[-1], int(batch["row_index"].max()) + 1, attended_pairs(batch)
        for path in ("dense", "segments"):
            out = peak_memory.run(SCRIPT, ROOT, path, tokens, timeout=1200, threads=torch.get_num_threads())
            print(f"| {P:,} | {prompts} | {P * P / 1e6:.1f} M | {pairs / 1e6:.2f} M | {path} | "
                  f"{out['peak_bytes'] / 1e6:.0f} MB | {out['seconds']:.2f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
