"""A training step with precomputed reference statistics against the live reference: forwards and memory.

python benchmarks/bench_reference.py [--steps 3] [--hidden 256] [--vocab 8192]

Each route runs in a fresh interpreter (``MALLOC_MMAP_THRESHOLD_=65536``, tests/peak_memory.py):
build the policy and an ``RCPOTrainer`` over 16 ranked rows, then train ``--steps`` steps. A
forward hook on every module whose class is the policy's counts the forwards per step that
are not the policy's own (the reference's); the parameter bytes alive in the process and the
peak resident set during the steps (above the interpreter before the model was built) show
whether a reference copy is held. Not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import importlib.util
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(json.dumps(m.measure(*json.loads(sys.argv[2]), start, peak)))
"""


def measure(route: str, steps: int, hidden: int, vocab: int, start, peak) -> dict:
    """One route (``"live"`` or ``"precomputed"``) in this process: forwards, parameter bytes and peak RSS."""
    import gc
    import tempfile

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

    from rcpo_losses.training.trainer import RCPOTrainer

    torch.set_num_threads(2)
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 3, (n,), generator=g))

    rows = [{"prompt": text(16), "completions": [text(24) for _ in range(4)], "scores": [3.0, 2.0, 1.0, 0.0]}
            for _ in range(16)]  # fmt: skip
    base = start()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True)  # fmt: skip
        trainer = RCPOTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer, fused_linear=True,
                              precompute_ref=route == "precomputed")  # fmt: skip
        gc.collect()
        models_ = [m for m in gc.get_objects() if type(m) is LlamaForCausalLM]
        counts = {"policy": 0, "other": 0}
        for m in models_:
            key = "policy" if m is model else "other"
            m.register_forward_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
        params = {p.data_ptr(): p.numel() * p.element_size() for m in models_ for p in m.parameters()}
        start()  # the peak of the training steps alone
        trainer.train()
        top = peak()
    return {
        "route": route,
        "models": len(models_),
        "policy_forwards_per_step": counts["policy"] / steps,
        "reference_forwards_per_step": counts["other"] / steps,
        "parameter_MiB_held": sum(params.values()) / 2**20,
        "policy_parameter_MiB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "peak_rss_MiB_during_steps_above_start": (top - base) / 2**20,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    a = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import peak_memory

    results = []
    for route in ("live", "precomputed"):
        args = json.dumps([route, a.steps, a.hidden, a.vocab])
        results.append(peak_memory.run(_SCRIPT, str(Path(__file__).resolve()), args, timeout=600))
        print(json.dumps(results[-1]))
    return results


if __name__ == "__main__":
    main()
