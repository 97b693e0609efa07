"""Memory, time of a prefix-shared attention layer, dense vs segments: python benchmarks/segment_attention_memory.py

Run from the repository root:

    python benchmarks/segment_attention_memory.py                  # every shape of SHAPES
    python benchmarks/segment_attention_memory.py --shapes issue   # some of them

Each shape is a packed batch (rows of a prompt and its completions,
:func:`rcpo_losses.training.packing.pack_prefix_shared`) and one attention layer's heads:
``q (1, H, P, D)``, ``k, v (1, H_kv, P, D)``, bf16, forward and backward (gradient of ones).
``dense``: the layer as transformers runs it with the dense mask (its ``sdpa_attention_forward``
with :func:`rcpo_losses.training.packing.dense_attention_mask`'s bool ``(1, 1, P, P)`` mask, which
repeats the key/value heads for grouped queries); ``segments``:
:func:`rcpo_losses.training.segment_attention.segment_attention_forward` with the batch's
:func:`~rcpo_losses.training.segment_attention.segments`. Each path runs in a fresh subprocess
(``tests/peak_memory.py``, ``MALLOC_MMAP_THRESHOLD_=65536``, so the resident set tracks live
tensors); after a warm-up call, its peak is above ``q, k, v`` and the batch, and counts the mask's
construction. Time: the third call in that process.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]

# name: (rows as (prompt length, number of completions, completion lengths lo..hi), heads H, key/value heads, D)
SHAPES = {
    # issue 32's: one 2,000-token prompt, 32 completions of about 20 tokens, 16 query heads on 2 key/value heads
    "issue": ([(2000, 32, (16, 24))], 16, 2, 64),
    "issue_half": ([(1000, 16, (16, 24))], 16, 2, 64),  # tests/test_segment_attention.py measures this one
    # bench_ranked_step.py's step: one prompt, 5 completions of 200 to 600 tokens, 8 heads
    "ranked_step": ([(185, 5, (200, 600))], 8, 8, 64),
    # four such prompts in one packed sequence
    "four_prompts": ([(185, 5, (200, 600))] * 4, 8, 8, 64),
    # many short completions of a long prompt, 32 heads on 8, head size 128
    "many_short": ([(1500, 64, (4, 12))], 32, 8, 128),
    # a long prompt and a few long completions, grouped queries
    "long_completions": ([(1000, 4, (1000, 1500))], 16, 4, 64),
}

SCRIPT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import segment_attention_memory as bench
print(json.dumps(bench.measure(sys.argv[2], sys.argv[3], start, peak, timed=len(sys.argv) < 5)))
"""


def packed_batch(rows) -> dict:
    """The packed batch of ``rows`` (``(prompt length, completions, (lo, hi))``), lengths drawn with seed 0."""
    import torch

    from rcpo_losses.training.packing import pack_prefix_shared

    g = torch.Generator().manual_seed(0)
    prompts, completions = [], []
    for n, count, (lo, hi) in rows:
        prompts.append([5] * n)
        completions.append([[7] * int(torch.randint(lo, hi + 1, (), generator=g)) for _ in range(count)])
    return pack_prefix_shared(prompts, completions, max(count for _, count, _ in rows))


def measure(path: str, shape: str, start, peak, timed: bool = True) -> dict:
    """In the subprocess: peak bytes above the inputs and seconds of one forward and backward of ``path``.

    ``timed=False``: the peak only (no second call).
    """
    import time
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rcpo_losses.training.packing import dense_attention_mask
    from rcpo_losses.training.segment_attention import KWARG, segment_attention_forward, segments

    rows, heads, kv_heads, dim = SHAPES[shape]
    batch = packed_batch(rows)
    P = batch["input_ids"].shape[-1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, P, dim, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, kv_heads, P, dim, generator=g).bfloat16().requires_grad_() for _ in range(2))
    module = types.SimpleNamespace(config=None, layer_idx=0, training=True, num_key_value_groups=heads // kv_heads)

    def run():
        if path == "dense":
            out = sdpa_attention_forward(module, q, k, v, dense_attention_mask(batch))[0]
        else:
            layout = segments(batch, {None: (None, None)})
            out = segment_attention_forward(module, q, k, v, None, **{KWARG: layout})[0]
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    run()  # warm-up: lazy imports (torch._dynamo) and the first call's one-off allocations are not the layer's
    base = start()
    run()
    measured = peak() - base
    t0 = time.perf_counter()
    if timed:
        run()
    return {"P": P, "peak_bytes": measured, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    import peak_memory
    import torch

    from rcpo_losses.training.packing import attended_pairs

    print(f"{torch.get_num_threads()} threads")
    print("| shape | P | heads (kv) | P^2 | attended | attention | peak above q, k, v | forward + backward |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        rows, heads, kv_heads, dim = SHAPES[shape]
        batch = packed_batch(rows)
        P, pairs = batch["input_ids"].shape[-1], attended_pairs(batch)
        for path in ("dense", "segments"):
            out = peak_memory.run(SCRIPT, ROOT, path, shape, timeout=1200, threads=torch.get_num_threads())
            print(f"| {shape} | {P:,} | {heads} ({kv_heads}) x {dim} | {P * P / 1e6:.1f} M | {pairs / P**2:.0%} | "
                  f"{path} | {out['peak_bytes'] / 1e6:.0f} MB | {out['seconds']:.2f} s |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
