"""Controlled sentiment on a real LM: reward against KL(pi || pi_ref) for each ranked objective.

    python examples/sentiment.py --out /tmp/sentiment            # the full run (see docs/experiments.md)
    python examples/sentiment.py --quick --out /tmp/sentiment    # the same pipeline, small

The DPO paper's controlled experiment (section 6.1, Fig. 2) on SmolLM2-135M-Instruct
(examples/smollm.py): the policy should write positive short reviews, as scored by VADER's
compound score. Steps:

1. Prompts: requests for one-sentence reviews of films, books, restaurants, products, ...,
   written from seeded templates (`make_prompts`); held-out prompts for evaluation about
   items (films, books, ...) that no training prompt reviews (`split_prompts`).
2. One ranked dataset: `rcpo_losses.training.generate.rank_completions` samples S = 5 completions of each
   training prompt from the base model (temperature 1, no top-k or top-p) and scores the distinct
   ones with VADER. Each row keeps the token ids as sampled and whether each completion was cut
   at the length cap: training scores exactly the tokens the model produced. Ties (VADER gives
   exactly 0 to text without sentiment words) follow the collator's default rule,
   `ties="leave_out"`: never ordered by position, tied completions above the first untied one
   leave the row's assortment, a tie further down ends its list. The pairwise objectives read
   each row's best and worst untied completions (`pair_rows`). The reference statistics are
   computed once (`rcpo_losses.training.precompute`) and shared.
3. Every objective (`OBJECTIVES`) trains from the base with `RCPOTrainer` on that dataset, with
   the same steps, batch, optimizer (AdamW, constant lr, fp32 master weights) and beta grid,
   for each seed (the seed sets the data order and the evaluation samples).
4. At checkpoints, on the held-out prompts: samples y ~ pi(.|x) (temperature 1, the policy's own
   distribution, which the KL estimate needs); their mean reward; the sequence-level
   KL(pi || pi_ref) estimated as the mean of log pi(y|x) - log pi_ref(y|x) (`kl_estimate`); the
   win rate against the base model's samples of the same prompts (`win_rate`); lengths and the
   share of samples cut at the length cap; and, as a length control, the reward of each
   sample's first `PREFIX_WORDS` words.

Gradient clipping is off (`max_grad_norm=0`): the losses' gradient norms are 6-30, so a clip at
1.0 would rescale every step to norm 1 on top of Adam's own per-coordinate normalisation. Adam
makes the update invariant to a loss's overall scale either way (up to its eps); what the
objectives change is the direction of the gradient, and how far a given lr takes each of them
is what the KL axis measures. The gradient norms are logged.

Writes DIR/results.json (rewritten after every checkpoint), DIR/sentiment.png (reward, win
rate and cut share against KL), DIR/table.md, DIR/ranked.jsonl (the dataset) and DIR/<objective>/
(the first beta's first seed's final policy and its tokenizer, fp32 safetensors, loadable with
`from_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from smollm import load_smollm2
from transformers import TrainerCallback, TrainingArguments
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rcpo_losses.training.data import RankedPreferenceCollator, best_and_worst
from rcpo_losses.training.generate import rank_completions
from rcpo_losses.training.precompute import precompute_reference_stats
from rcpo_losses.training.trainer import PAIRWISE, RCPOTrainer

# name: (RCPOTrainer loss, k). mnl_pairwise on the best and the worst of 5 is DPO on that pair;
# dpo_all_pairs is DPO on the 10 pairs the full ranking implies; k=None with 5 samples is the
# full ranking (a top-4 list); mallows_pairwise is Mallows-RMJ on the best and the worst.
OBJECTIVES = {
    "dpo": ("mnl_pairwise", None),
    "dpo_all_pairs": ("dpo_all_pairs", None),
    "mnl_top2": ("mnl_topk", 2),
    "mallows_top2": ("mallows_rmj_topk", 2),
    "mnl_full": ("mnl_topk", None),
    "mallows_pairwise": ("mallows_rmj_pairwise", None),
    "mallows_full": ("mallows_rmj_topk", None),
}
NUM_SAMPLES = 5
PREFIX_WORDS = 12

ITEMS = {
    "film": ("the film", ["The {A} {N}", "{N} of the {A} {M}", "Return to {P}", "The Last {N}"]),
    "novel": ("the novel", ["The {A} {N}", "A {N} in {P}", "The {N}'s Daughter", "{A} {M}s"]),
    "restaurant": ("the restaurant", ["{F}'s Kitchen", "The {A} Spoon", "Cafe {P}", "{F}'s Bistro"]),
    "hotel": ("the hotel", ["The {P} Grand", "Hotel {F}", "The {A} Inn"]),
    "headphones": ("the wireless headphones", ["{B} Sound {D}", "{B} Air {D}"]),
    "blender": ("the kitchen blender", ["{B} Blend {D}", "{B} Mix Pro {D}"]),
    "video game": ("the video game", ["{N} Quest", "The {A} {N}", "{P} Racers {D}"]),
    "album": ("the album", ["{A} {M}s", "Songs from {P}", "The {N} Sessions"]),
    "phone app": ("the phone app", ["{B} Notes", "{B} Fit", "{N}Tracker"]),
}
WORDS = {
    "A": ["Silent", "Golden", "Broken", "Hidden", "Crimson", "Quiet", "Wild", "Electric", "Distant", "Paper"],
    "N": ["Harbor", "Garden", "River", "Lantern", "Mountain", "Mirror", "Empire", "Orchard", "Signal", "Voyage"],
    "M": ["Star", "Winter", "Echo", "Bridge", "Storm", "Shadow", "Island", "Letter"],
    "P": ["Venice", "Oslo", "Marrakesh", "Kyoto", "Lisbon", "Havana", "Dublin", "Cairo"],
    "F": ["Luigi", "Rosa", "Hamid", "Mei", "Oscar", "Ingrid", "Tomas", "Amara"],
    "B": ["Aero", "Nova", "Zenith", "Pulse", "Vertex", "Lumo", "Orbit"],
    "D": ["300", "X2", "Pro", "5", "Max", "Mini"],
}
REQUESTS = [
    "Write a one-sentence review of {item}.",
    "In one sentence, review {item}.",
    "Give a short, one-sentence review of {item}.",
    "Write a brief review of {item} in a single sentence.",
    "Review {item} in one sentence.",
]


def _requests(seed: int):
    """Endless draws ``(item, prompt)`` from the templates with ``random.Random(seed)``: what it reviews, the prompt."""
    rng = random.Random(seed)
    while True:
        noun, names = ITEMS[rng.choice(sorted(ITEMS))]
        name = rng.choice(names).format(**{key: rng.choice(words) for key, words in WORDS.items()})
        item = f'{noun} "{name}"'
        yield item, rng.choice(REQUESTS).format(item=item)


def _distinct(draws, n: int) -> list[tuple[str, str]]:
    """The first ``n`` draws ``(item, prompt)`` with distinct prompts, from at most ``100 n`` draws."""
    found: dict[str, str] = {}
    for _ in range(100 * n):
        if len(found) == n:
            break
        item, prompt = next(draws)
        found.setdefault(prompt, item)
    if len(found) < n:
        raise ValueError(f"n: the templates give fewer than {n} distinct prompts")
    return [(item, prompt) for prompt, item in found.items()]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct review requests, drawn from the templates with ``random.Random(seed)``."""
    return [prompt for _, prompt in _distinct(_requests(seed), n)]


def split_prompts(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training prompts (``make_prompts(n_train, seed)``) and held-out prompts about items none of them reviews.

    The split is by item, not by prompt: two requests for the same item in other words
    (``Review the film "X" in one sentence.``) are the same test, so a held-out prompt
    reviews an item that no training prompt reviews, and no other held-out prompt either.
    The held-out prompts continue the training prompts' draws, skipping the items already taken.
    """
    draws = _requests(seed)
    train = _distinct(draws, n_train)
    taken = {item for item, _ in train}
    held_out = []
    for _ in range(100 * (n_train + n_held_out)):
        if len(held_out) == n_held_out:
            break
        item, prompt = next(draws)
        if item not in taken:
            taken.add(item)
            held_out.append(prompt)
    if len(held_out) < n_held_out:
        raise ValueError(f"n_held_out: the templates give fewer than {n_held_out} items beside the training ones")
    return [prompt for _, prompt in train], held_out


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


_VADER = SentimentIntensityAnalyzer()


def vader(texts: list[str]) -> list[float]:
    """VADER's compound score of each text, in [-1, 1]."""
    return [_VADER.polarity_scores(t)["compound"] for t in texts]


def text(completion) -> str:
    """A completion's text: a string, or chat messages (the last one's content)."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def reward(prompts, completions, **columns) -> list[float]:
    """The reward (TRL's convention, which passes ``completion_ids`` and the rows' columns too): VADER compound
    of the completion; positive is the target."""
    return vader([text(c) for c in completions])


def first_words(text: str, n: int = PREFIX_WORDS) -> str:
    return " ".join(text.split()[:n])


def pair_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """For the pairwise objectives: each row cut to its best and worst untied completion (`best_and_worst`),
    as the online trainer does; rows without such a pair are left out, and counted."""
    pairs = [best_and_worst(row) for row in rows]
    return [p for p in pairs if p is not None], sum(p is None for p in pairs)


def win_rate(policy: list[list[float]], base: list[list[float]]) -> float:
    r"""Mean over prompts of P(r_policy > r_base) over all pairs of their samples, a tie counting 1/2.

    ``policy[i]`` and ``base[i]`` are the rewards of prompt ``i``'s samples.
    """
    if len(policy) != len(base) or not policy:
        raise ValueError(f"policy, base: expected the same nonzero number of prompts, got {len(policy)}, {len(base)}")
    rates = []
    for i, (p, b) in enumerate(zip(policy, base, strict=True)):
        if not p or not b:
            raise ValueError(f"policy[{i}], base[{i}]: no samples")
        rates.append(sum((x > y) + 0.5 * (x == y) for x in p for y in b) / (len(p) * len(b)))
    return sum(rates) / len(rates)


def kl_estimate(policy_logps: list[float], ref_logps: list[float]) -> tuple[float, float]:
    r"""KL(pi || pi_ref) from samples y ~ pi: the mean of log pi(y|x) - log pi_ref(y|x), and its standard error."""
    if len(policy_logps) != len(ref_logps) or len(policy_logps) < 2:
        raise ValueError("policy_logps, ref_logps: expected two equally long lists of at least 2 samples")
    d = [p - r for p, r in zip(policy_logps, ref_logps, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


def completion_mask(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """``[N, T]`` mask of the generated tokens up to and including the first ``eos`` (all, if none)."""
    is_eos = (tokens == eos).int()
    return (is_eos.cumsum(-1) - is_eos) == 0


@torch.no_grad()
def sequence_logps(model, input_ids, attention_mask, n_prompt: int, mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` summed log-probs of the tokens after ``n_prompt`` where ``mask`` (left-padded prompts)."""
    # The positions generate() used; rotary models are unchanged by the shift, absolute-position ones are not.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)[0]
    logits = model.lm_head(hidden[:, n_prompt - 1 : -1]).float()
    logps = logits.log_softmax(-1).gather(-1, input_ids[:, n_prompt:, None])[..., 0]
    return (logps * mask).sum(-1)


@torch.no_grad()
def sample(model, tokenizer, prompts, *, num_samples, max_new_tokens, seed, batch_size=16, ref=None,
           keep_tokens=False) -> dict:  # fmt: skip
    """``num_samples`` samples y ~ pi(.|x) of each prompt (temperature 1, no truncation), with their statistics.

    Returns per prompt the texts, the rewards, the rewards of the first `PREFIX_WORDS` words,
    and per sample the token count (EOS included), whether it was cut at ``max_new_tokens``,
    log pi(y|x) (from the sampling logits) and log pi_ref(y|x) (``ref``: a forward; default pi).
    ``keep_tokens``: also ``batches``, each batch's ``(sequences, attention_mask, n_prompt, mask)``
    for `sequence_logps` (the samples in order, ``num_samples`` per prompt).
    """
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    out = {k: [] for k in ("texts", "rewards", "prefix_rewards", "lengths", "cut", "logps", "ref_logps", "batches")}
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer.apply_chat_template(
            [chat(p) for p in chunk], add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1_000_003 + start)
            gen = model.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples, output_logits=True, return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        n_prompt = enc["input_ids"].shape[1]
        tokens = gen.sequences[:, n_prompt:]
        mask = completion_mask(tokens, eos)
        logits = torch.stack(gen.logits, 1).float()
        logps = (logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0] * mask).sum(-1)
        del logits
        attention = torch.cat([enc["attention_mask"].repeat_interleave(num_samples, 0), mask.long()], 1)
        ref_logps = logps if ref is None else sequence_logps(ref, gen.sequences, attention, n_prompt, mask)
        if keep_tokens:
            out["batches"].append((gen.sequences, attention, n_prompt, mask))
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scores, prefix = vader(texts), vader([first_words(t) for t in texts])
        for i in range(len(chunk)):
            sl = slice(i * num_samples, (i + 1) * num_samples)
            out["texts"].append(texts[sl])
            out["rewards"].append(scores[sl])
            out["prefix_rewards"].append(prefix[sl])
        out["lengths"] += mask.sum(-1).tolist()
        out["cut"] += (~(tokens == eos).any(-1)).tolist()
        out["logps"] += logps.tolist()
        out["ref_logps"] += ref_logps.tolist()
    model.train(was_training)
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(found: dict, base: dict | None) -> dict:
    """The evaluation numbers of one set of samples (``base``: the base model's samples, for the win rate)."""
    flat = [r for rs in found["rewards"] for r in rs]
    kl, kl_se = kl_estimate(found["logps"], found["ref_logps"])
    sd = math.sqrt(sum((r - mean(flat)) ** 2 for r in flat) / (len(flat) - 1))
    return {
        "reward": mean(flat),
        "reward_se": sd / math.sqrt(len(flat)),
        "reward_prefix": mean(r for rs in found["prefix_rewards"] for r in rs),
        "kl": kl,
        "kl_se": kl_se,
        "win_rate": win_rate(found["rewards"], base["rewards"]) if base is not None else 0.5,
        "length": mean(found["lengths"]),
        "cut": mean(map(float, found["cut"])),
        "example": found["texts"][0][0],
    }


class Checkpoints(TrainerCallback):
    """Calls ``fn(step, model)`` at the given global steps."""

    def __init__(self, steps, fn):
        self.steps, self.fn = set(steps), fn

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.fn(state.global_step, model)


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``points`` sorted by x; NaN outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def gain_per_nat(points: list[tuple[float, float]]) -> float:
    """Least-squares slope through the origin of (KL, reward gain) points: sum(x y) / sum(x^2)."""
    return sum(x * y for x, y in points) / sum(x * x for x, _ in points)


def common_kl(runs: list[dict]) -> float:
    """The KL at which runs are compared: the smallest final KL among them (0 if that is negative).

    Each run's curve from (0, base) through its checkpoints reaches every KL up to its final
    one, so every run has a reward there. (Not the smallest of the runs' largest KLs: a run whose
    KL went down at its last checkpoint would be read past where it ended.)
    """
    return max(0.0, min(r["checkpoints"][-1]["kl"] for r in runs))


def summary_table(results: dict) -> list[dict]:
    """One line per (objective, beta): final numbers as mean and half-range over seeds, and reward at a common KL.

    The common KL of a beta is the smallest final KL among its runs, so every curve reaches it;
    each run's reward there is interpolated through (0, base reward) and its checkpoints. The
    gain per nat is `gain_per_nat` of each run's checkpoints (reward minus the base's).
    """
    base = results["base"]
    runs = [r for r in results["runs"] if r and r["checkpoints"]]
    lines = []
    for beta in sorted({r["beta"] for r in runs}):
        of_beta = [r for r in runs if r["beta"] == beta]
        common = common_kl(of_beta)
        for name in [n for n in results["config"]["objectives"] if any(r["objective"] == n for r in of_beta)]:
            mine = [r for r in of_beta if r["objective"] == name]
            line = {"objective": name, "beta": beta, "seeds": len(mine), "steps": mine[0]["checkpoints"][-1]["step"]}
            for key in ("reward", "reward_prefix", "kl", "win_rate", "length", "cut"):
                values = [r["checkpoints"][-1][key] for r in mine]
                line[key] = mean(values)
                line[key + "_spread"] = (max(values) - min(values)) / 2
            at = [interpolate([(0.0, base["reward"])] + [(c["kl"], c["reward"]) for c in r["checkpoints"]], common)
                  for r in mine]  # fmt: skip
            line["common_kl"] = common
            line["reward_at_common_kl"] = mean(at)
            line["reward_at_common_kl_spread"] = (max(at) - min(at)) / 2
            slopes = [gain_per_nat([(c["kl"], c["reward"] - base["reward"]) for c in r["checkpoints"]]) for r in mine]
            line["gain_per_nat"] = mean(slopes)
            line["gain_per_nat_spread"] = (max(slopes) - min(slopes)) / 2
            norms = sorted(g for r in mine for g in r["grad_norms"])
            line["grad_norm_median"] = norms[len(norms) // 2] if norms else math.nan
            lines.append(line)
    return lines


def plus_minus(line: dict, key: str, fmt: str) -> str:
    return f"{line[key]:{fmt}} ± {line[key + '_spread']:{fmt}}"


def markdown_table(results: dict) -> str:
    b = results["base"]
    columns = ["objective", "beta", "seeds", "reward", f"reward, first {PREFIX_WORDS} words", "KL (nats)",
               "win rate vs base", "reward at common KL", "reward gain per nat", "tokens", "cut at cap",
               "median grad norm"]  # fmt: skip
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        f"| base | - | - | {b['reward']:.3f} | {b['reward_prefix']:.3f} | {b['kl']:.2f} | 0.5 | - | - "
        f"| {b['length']:.1f} | {b['cut']:.0%} | - |",
    ]
    for ln in summary_table(results):
        cells = [ln["objective"], ln["beta"], ln["seeds"]]
        formats = {
            "reward": ".3f",
            "reward_prefix": ".3f",
            "kl": ".2f",
            "win_rate": ".3f",
            "reward_at_common_kl": ".3f",
        }
        cells += [plus_minus(ln, key, fmt) for key, fmt in formats.items()]
        cells[-1] += f" (KL {ln['common_kl']:.2f})"
        cells.append(plus_minus(ln, "gain_per_nat", ".3f"))
        cells += [f"{ln['length']:.1f}", f"{ln['cut']:.0%}", f"{ln['grad_norm_median']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def seed_curves(results: dict) -> dict:
    """``{(objective, beta): [point, ...]}``: (0, base), then each checkpoint step's mean and half-range over seeds."""
    base = results["base"]
    keys = ("kl", "reward", "win_rate", "cut")
    curves = {}
    for run in filter(None, results["runs"]):
        curves.setdefault((run["objective"], run["beta"]), []).append({c["step"]: c for c in run["checkpoints"]})
    out = {}
    for name, runs in curves.items():
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        points = [
            {**{k: base[k] for k in ("reward", "cut")}, "kl": 0.0, "win_rate": 0.5, "kl_err": 0.0, "reward_err": 0.0}
        ]
        for step in steps:
            point = {k: mean(r[step][k] for r in runs) for k in keys}
            for k in ("kl", "reward"):
                values = [r[step][k] for r in runs]
                point[k + "_err"] = (max(values) - min(values)) / 2
            points.append(point)
        if len(points) > 1:
            out[name] = points
    return out


def plot(results: dict, path: Path) -> None:
    """Reward against KL for each beta, win rate and cut share against KL: seed means, bars the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = results["config"]["betas"]
    fig, axes = plt.subplots(1, len(betas) + 2, figsize=(4.2 * (len(betas) + 2), 4.2))
    colors = dict(zip(results["config"]["objectives"], plt.cm.tab10.colors, strict=False))
    styles = ["-", "--", ":", "-."]
    for (name, beta), points in seed_curves(results).items():
        kl = [p["kl"] for p in points]
        style = dict(color=colors[name], marker="o", ms=3, alpha=0.85, ls=styles[betas.index(beta) % len(styles)])
        errors = {"xerr": [p["kl_err"] for p in points], "yerr": [p["reward_err"] for p in points]}
        axes[betas.index(beta)].errorbar(kl, [p["reward"] for p in points], capsize=2, label=name, **errors, **style)
        for ax, key in zip(axes[len(betas) :], ("win_rate", "cut"), strict=True):
            ax.plot(kl, [p[key] for p in points], label=f"{name} β={beta}", **style)
    titles = [f"VADER reward, β = {b}" for b in betas] + ["win rate against the base's samples", "share cut at the cap"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("KL(π ‖ π_ref), nats per completion")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = len(results["config"]["seeds"])
    fig.suptitle(f"SmolLM2-135M-Instruct, positive one-sentence reviews, held-out prompts: mean of {seeds} seeds "
                 "(bars: half their range), through (0, base) and each checkpoint", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency: a 64-colour palette keeps the PNG small

    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a file


def ranked_rows(ref, tokenizer, train_prompts, cfg, path: Path) -> tuple[dict, dict]:
    """The ranked dataset (`rank_completions` of the base, resumed from ``path``) with the reference's statistics.

    Returns ``({"listwise": rows, "pairwise": pair_rows(rows)}, statistics of the dataset)``.
    """
    t = time.time()
    ranked = rank_completions(
        ref, tokenizer, [chat(p) for p in train_prompts], reward, num_samples=NUM_SAMPLES,
        max_new_tokens=cfg["max_new_tokens"], temperature=1.0, top_p=1.0, batch_size=8, seed=0, out=path,
    )  # fmt: skip
    scores = [s for row in ranked for s in row["scores"]]
    rows = list(ranked)  # as sampled: ties follow the trainer's ties="leave_out"
    pairs, no_pair = pair_rows(rows)
    by_rank = [sorted(row["scores"], reverse=True) for row in ranked]
    stats = {
        "rows": len(rows),
        "rows_with_ties": sum(len(set(row["scores"])) < len(row["scores"]) for row in rows),
        "samples_merged": ranked.stats.merged,
        "skipped_identical": ranked.stats.skipped_identical,
        "skipped_tied": ranked.stats.skipped_tied,
        "pair_rows": len(pairs),
        "rows_without_a_pair": no_pair,
        "prompts": len(train_prompts),
        "mean_score": mean(scores),
        "mean_score_by_rank": [mean(r[i] for r in by_rank if len(r) > i) for i in range(max(map(len, by_rank)))],
        "share_zero_score": mean(float(s == 0.0) for s in scores),
        "share_above_0.9": mean(float(s > 0.9) for s in scores),
        "cut": mean(float(c) for row in ranked for c in (row.get("truncated") or []) if c is not None)
        if any(row.get("truncated") for row in ranked) else None,
        "seconds": time.time() - t,
    }  # fmt: skip
    collator = RankedPreferenceCollator(tokenizer)
    rows = {
        name: precompute_reference_stats(ref, part, collator, batch_size=2, progress=False)
        for name, part in (("listwise", rows), ("pairwise", pairs))
    }
    return rows, stats


def evaluator(run, tokenizer, ref, eval_prompts, base, *, seed, cfg, on_checkpoint, measure=None):
    """``evaluate(step, model)``: held-out samples of the model, `summarize`d into ``run["checkpoints"]``.

    ``measure(model) -> dict``: more numbers for the checkpoint. ``on_checkpoint(run)`` after each;
    the time spent accumulates in ``run["eval_s"]``.
    """
    run.setdefault("eval_s", 0.0)

    def evaluate(step, model):
        t = time.time()
        # eval_samples_mid (if set): fewer samples at the checkpoints before the last
        n = cfg["eval_samples"] if step == cfg["checkpoints"][-1] else cfg.get("eval_samples_mid", cfg["eval_samples"])
        found = sample(model, tokenizer, eval_prompts, num_samples=n, max_new_tokens=cfg["max_new_tokens"],
                       seed=1000 + seed, ref=ref)  # fmt: skip
        point = {"step": step, "samples": n * len(eval_prompts), **summarize(found, base)}
        point.update(measure(model) if measure else {})
        point["eval_s"] = time.time() - t
        run["checkpoints"].append(point)
        run["eval_s"] += point["eval_s"]
        print(f"  {run['objective']} beta={run['beta']} seed={seed} step {step}: reward {point['reward']:.3f} "
              f"KL {point['kl']:.2f} win {point['win_rate']:.2f} cut {point['cut']:.0%}", flush=True)  # fmt: skip
        on_checkpoint(run)

    return evaluate


def train_one(rows, tokenizer, ref, eval_prompts, base, *, objective, beta, seed, cfg, on_checkpoint, save_to=None,
              measure=None):  # fmt: skip
    """Train one objective from the base; evaluate at cfg checkpoints (``on_checkpoint(dict)`` after each).

    ``rows``: ``{"listwise": rows, "pairwise": pair rows}``, each with the reference's statistics.
    ``measure``: as `evaluator`'s.
    """
    loss, k = OBJECTIVES[objective]
    rows = rows["pairwise" if loss in PAIRWISE else "listwise"]
    policy, _ = load_smollm2(torch.float32)
    run = {"objective": objective, "loss": loss, "k": k, "beta": beta, "seed": seed, "checkpoints": []}
    evaluate = evaluator(run, tokenizer, ref, eval_prompts, base, seed=seed, cfg=cfg, on_checkpoint=on_checkpoint,
                         measure=measure)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=cfg["steps"],
            per_device_train_batch_size=cfg["prompts_per_device"],
            gradient_accumulation_steps=cfg["prompts_per_step"] // cfg["prompts_per_device"],
            learning_rate=cfg["lr"],
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,  # no clipping: see the module docstring
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            disable_tqdm=True,
        )
        trainer = RCPOTrainer(
            policy, args=args, train_dataset=rows, processing_class=tokenizer, loss=loss, beta=beta, k=k,
            callbacks=[Checkpoints(cfg["checkpoints"], evaluate)],
        )  # fmt: skip
        t = time.time()
        trainer.train()
        run["train_s"] = time.time() - t - run["eval_s"]
    logs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    run["losses"] = [h["loss"] for h in logs]
    run["grad_norms"] = [h["grad_norm"] for h in logs]
    run["saved"] = None
    if save_to is not None:
        policy.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
        run["saved"] = str(save_to)
    on_checkpoint(run)
    del trainer, policy
    return run


CONFIGS = {
    # sized for 75 minutes on 2 idle cores (docs/experiments.md has the arithmetic)
    "full": dict(train_prompts=72, eval_prompts=24, eval_samples=2, base_samples=4, max_new_tokens=32,
                 steps=12, prompts_per_step=4, prompts_per_device=2, checkpoints=[6, 12], lr=1.5e-5,
                 betas=[0.1, 0.5], seeds=[0, 1], split="by_item"),
    "quick": dict(train_prompts=8, eval_prompts=4, eval_samples=1, base_samples=2, max_new_tokens=12,
                  steps=2, prompts_per_step=2, prompts_per_device=2, checkpoints=[2], lr=1e-5,
                  betas=[0.1], seeds=[0], split="by_item"),
}  # fmt: skip
# split: the held-out prompts' rule (split_prompts), so that a results.json of the earlier split by
# prompt is not resumed with its base samples of other prompts.


def same_setup(a: dict, b: dict) -> bool:
    """Whether two configurations differ at most in their objectives."""
    return {**a, "objectives": None} == {**b, "objectives": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="the same pipeline, small (a few minutes)")
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS["quick" if args.quick else "full"], objectives=args.objectives)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
               "load_at_start": os.getloadavg()}  # fmt: skip
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    results = {"config": cfg, "command": command, "cpu": cpu_name(), "sessions": [], "elapsed_s": 0.0, "runs": []}
    # Run again with the same --out and configuration (objectives may be added): finished runs are
    # kept, the rest done.
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    if earlier is not None and not same_setup(earlier["config"], cfg):  # its ranked.jsonl and policies are another's
        changed = sorted(k for k in {**earlier["config"], **cfg} if k != "objectives" and earlier["config"].get(k)
                         != cfg.get(k))  # fmt: skip
        raise SystemExit(f"--out: {out} holds a run of another configuration ({', '.join(changed)} differ): "
                         "use another folder")  # fmt: skip
    if earlier is not None and "base_rewards" in earlier:
        done = [r for r in earlier["runs"] if r and "train_s" in r and r["objective"] in cfg["objectives"]]
        results = {**earlier, "config": cfg, "runs": done}
    results["sessions"].append(session)
    before = results["elapsed_s"]
    train_prompts, eval_prompts = split_prompts(cfg["train_prompts"], cfg["eval_prompts"], seed=0)

    # 1. the ranked dataset, sampled from the base model, which is also the reference; its statistics once
    ref, tokenizer = load_smollm2(torch.float32)
    ref.eval().requires_grad_(False)
    rows, results["dataset"] = ranked_rows(ref, tokenizer, train_prompts, cfg, out / "ranked.jsonl")
    print("dataset:", results["dataset"], flush=True)

    # 2. the base's held-out samples
    t = time.time()
    if "base_rewards" not in results:
        found = sample(ref, tokenizer, eval_prompts, num_samples=cfg["base_samples"],
                       max_new_tokens=cfg["max_new_tokens"], seed=999, ref=ref)  # fmt: skip
        results["base"] = {**summarize(found, None), "seconds": time.time() - t}
        results["base_rewards"] = found["rewards"]
    base = {"rewards": results["base_rewards"]}
    print("base:", results["base"], flush=True)
    results["elapsed_s"] = before + time.time() - started
    write_json(results, out / "results.json")

    # 3. every objective, beta and seed; the first beta's first seed's policy is saved
    for beta in cfg["betas"]:
        for seed in cfg["seeds"]:
            for objective in cfg["objectives"]:
                if any((r["objective"], r["beta"], r["seed"]) == (objective, beta, seed) for r in results["runs"]):
                    continue
                first = beta == cfg["betas"][0] and seed == cfg["seeds"][0]
                slot = len(results["runs"])
                results["runs"].append(None)

                def record(run, slot=slot):
                    results["runs"][slot] = run
                    results["elapsed_s"] = before + time.time() - started
                    write_json(results, out / "results.json")

                train_one(rows, tokenizer, ref, eval_prompts, base, objective=objective, beta=beta, seed=seed,
                          cfg=cfg, on_checkpoint=record, save_to=out / objective if first else None)  # fmt: skip
                results["summary"] = summary_table(results)
                write_json(results, out / "results.json")
                plot(results, out / "sentiment.png")
    results["elapsed_s"] = before + time.time() - started
    results["summary"] = summary_table(results)
    write_json(results, out / "results.json")
    (out / "table.md").write_text(markdown_table(results))
    plot(results, out / "sentiment.png")
    print(markdown_table(results))
    print(f"done in {results['elapsed_s']:.0f} s: {out}")


if __name__ == "__main__":
    main()
