"""What the prefix-shared layout's first-seen check costs: the first training step against later ones.

    PYTHONPATH=. python benchmarks/prefix_check_cost.py      # Llama (no window) and Mistral (window 4096)
    PYTHONPATH=. python benchmarks/prefix_check_cost.py --window 1024
    PYTHONPATH=. python benchmarks/prefix_check_cost.py --reach  # the probe again when a batch reaches a length

The step is ``bench_ranked_step.py``'s (policy forward and backward, reference forward,
Mallows-RMJ top-k loss) on its prefix-shared batch and its model sizes (4 layers, hidden 512,
vocab 32000; bf16, ``RCPO_BENCH_DTYPE=fp32`` for fp32), with a ``LlamaConfig`` or a
``MistralConfig(sliding_window=W)``. The first step runs the probe of
:func:`rcpo_losses.training.model_stats.prefix_shared_problem` (one forward of each layout on about
``W + 30`` tokens, once for each of policy and reference: a verdict is per model instance); later steps run
none. After a warm-up step with the check off (the one-off costs of a first call are not the
check's), columns: the step with the check off (``rcpo_losses.training.model_stats.VERIFY = False``,
mean of 2), the probe alone, the first step with the check on (probe included), the mean of
2 later steps; peak memory above the models and the batch of the first checked step and of
the next one (CPU: resident set in a fresh subprocess,
``tests/peak_memory.py``; CUDA: ``max_memory_allocated``).

``--reach``: the probes of one Llama instance of those sizes with ``max_position_embeddings``
2048 (a length threshold of :func:`rcpo_losses.training.model_stats.length_thresholds`) on the
step's batch of ``--prompts`` prompts: the first probe (no batch), the probe again when the
batch's packed length passes 2048 (its probe packs at least 2049 tokens), and a check of a
batch already covered (no probe: the mean of 20 calls of ``check_prefix_shared``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ranked_step as ranked  # noqa: E402
from common import DEVICE, sync  # noqa: E402

import rcpo_losses.training.model_stats as model_stats  # noqa: E402


def models(window: int | None):
    from transformers import LlamaConfig, MistralConfig

    torch.manual_seed(0)
    sizes = dict(vocab_size=ranked.V, hidden_size=ranked.H, intermediate_size=ranked.FFN,
                 num_hidden_layers=ranked.LAYERS, num_attention_heads=ranked.HEADS, max_position_embeddings=8192,
                 tie_word_embeddings=False)  # fmt: skip
    config = LlamaConfig(**sizes) if window is None else MistralConfig(**sizes, sliding_window=window)
    from transformers import AutoModelForCausalLM

    impl = "flex_attention" if DEVICE == "cuda" else "sdpa"
    policy = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(DEVICE, ranked.DTYPE)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(DEVICE, ranked.DTYPE)
    ref.load_state_dict(policy.state_dict())
    return policy, ref.eval().requires_grad_(False)


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def row(window: int | None) -> dict:
    policy, ref = models(window)
    batch = ranked.make_batch("ranked", "prefix_shared")

    def step():
        return ranked.step(policy, ref, batch, "ranked", "prefix_shared")

    model_stats.VERIFY = False
    try:
        timed(step)  # warm-up, the check off: the one-off costs of a first call are not the check's
        unchecked = sum(timed(step) for _ in range(2)) / 2
    finally:
        model_stats.VERIFY = True
    model_stats._VERIFIED.clear()
    probe = timed(lambda: model_stats._probe(policy))
    model_stats._VERIFIED.clear()
    first = timed(step)
    later = sum(timed(step) for _ in range(2)) / 2
    return {"probe_s": probe, "first_s": first, "later_s": later, "unchecked_s": unchecked,
            "tokens": batch["input_ids"].numel()}  # fmt: skip


_SCRIPT = """
import importlib.util
spec = importlib.util.spec_from_file_location("cost", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
policy, ref = m.models(json.loads(sys.argv[2]))
batch = m.ranked.make_batch("ranked", "prefix_shared")
m.model_stats.VERIFY = False
m.ranked.step(policy, ref, batch, "ranked", "prefix_shared")  # warm-up, the check off
m.model_stats.VERIFY = True
m.model_stats._VERIFIED.clear()
out = {}
for name in ("first", "later"):
    base = start()
    m.ranked.step(policy, ref, batch, "ranked", "prefix_shared")
    out[name] = peak() - base
print(json.dumps(out))
"""


def memory(window: int | None) -> dict:
    """Peak bytes above the models and the batch: the first step (with the probe) and the next one."""
    if DEVICE == "cuda":
        policy, ref = models(window)
        batch = ranked.make_batch("ranked", "prefix_shared")
        model_stats.VERIFY = False
        ranked.step(policy, ref, batch, "ranked", "prefix_shared")  # warm-up (FlexAttention compiles), check off
        model_stats.VERIFY = True
        model_stats._VERIFIED.clear()
        out = {}
        for name in ("first", "later"):
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ranked.step(policy, ref, batch, "ranked", "prefix_shared")
            sync()
            out[name] = torch.cuda.max_memory_allocated() - base
        return out
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import json

    import peak_memory

    return peak_memory.run(_SCRIPT, os.path.abspath(__file__), json.dumps(window), timeout=1200,
                           threads=torch.get_num_threads())  # fmt: skip


def reach(prompts: int) -> None:
    """Seconds of the probe at construction, of the probe a batch past a length threshold adds, of a covered check."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=ranked.V, hidden_size=ranked.H, intermediate_size=ranked.FFN,
                         num_hidden_layers=ranked.LAYERS, num_attention_heads=ranked.HEADS,
                         max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    impl = "flex_attention" if DEVICE == "cuda" else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).to(DEVICE, ranked.DTYPE)
    batch = ranked.make_batch("ranked", "prefix_shared", prompts)
    model_stats._VERIFIED.clear()
    first = timed(lambda: model_stats.check_prefix_shared(model))
    again = timed(lambda: model_stats.check_prefix_shared(model, batch))
    verdict = next(iter(model_stats._VERIFIED[model].values()))
    covered = sum(timed(lambda: model_stats.check_prefix_shared(model, batch)) for _ in range(20)) / 20
    print(f"packed length {batch['input_ids'].shape[-1]}, longest sequence {int(batch['position_ids'].max()) + 1}")
    print("| probe | packed tokens probed | seconds |")
    print("|---|---|---|")
    print(f"| first (construction) | ~35 | {first:.2f} |")
    print(f"| the batch passes max_position_embeddings = 2048 | {verdict.tokens} | {again:.2f} |")
    print(f"| a covered batch (check only) | 0 | {covered * 1e3:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=4096, help="the Mistral row's sliding window")
    parser.add_argument("--reach", action="store_true", help="the probes a batch's lengths add (see above)")
    parser.add_argument("--prompts", type=int, default=1, help="--reach: prompts in the batch")
    args = parser.parse_args()
    print(f"device {DEVICE}, dtype {ranked.DTYPE}, threads {torch.get_num_threads()}")
    if args.reach:
        reach(args.prompts)
        return
    print("| model | packed tokens | check off s | probe s | first step s | later step s | first MB | later MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, window in (("llama", None), (f"mistral w={args.window}", args.window)):
        t, mem = row(window), memory(window)
        print(f"| {name} | {t['tokens']} | {t['unchecked_s']:.2f} | {t['probe_s']:.2f} | {t['first_s']:.2f} | "
              f"{t['later_s']:.2f} | {mem['first'] / 1e6:.0f} | {mem['later'] / 1e6:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
