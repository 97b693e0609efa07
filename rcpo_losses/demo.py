"""``python -m rcpo_losses.demo``: what ranked-choice losses buy you, on a synthetic task, in under a minute.

A toy version of the paper's experiment (section 4, appendix G). Each seed draws a world:

* prompts ``x`` and a pool of candidate responses ``y`` (Gaussian feature vectors), with
  a hidden true reward ``r*(x, y) = x^T A y``;
* for each training prompt, ``|S|`` responses drawn from the pool, which an annotator
  ranks with noise: ``mnl`` adds Gumbel noise to ``r*`` (a Plackett-Luce ranking, the
  MNL losses' own model); ``mallows`` samples a Mallows-Kendall ranking around the true
  order (``P ~ phi^(pairs out of order)``: noise that sees only ranks, never reward gaps,
  the model of neither loss); ``rmj`` (not run by default) samples from Mallows-RMJ, the
  Mallows-RMJ losses' own model, whose mistakes cluster at the bottom of the list. By
  default each ``phi`` is chosen so that every annotator agrees with the true order
  equally often (the MNL annotator's mean Kendall tau);
* a policy ``pi(y | x) = softmax_y(x^T W y)`` over the pool, trained from a frozen
  reference copy ``W0`` (a random start, which knows nothing of ``r*``) with each
  objective (``beta = 1``; Mallows weight ``-log phi(x) = 1``, a constant: with Adam any
  constant weight gives the same training), full batch, Adam with a cosine decay, the
  same number of steps and the same learning-rate grid.
  One learning rate per (objective, noise, training size) is kept, the one whose implicit
  rewards best agree with the annotator on separate validation prompts (observable
  feedback only: the true reward is never used to tune);
* on held-out prompts, the implicit reward ``beta log(pi / pi_ref)`` of every pool response
  is compared with ``r*``: Kendall tau and top-1 agreement, per prompt, averaged.

The objectives all read one annotation of the same responses: the listwise ones its
top-k list (``ranks_from_scores``), DPO-AllPairs the pairs that list implies
(``all_pairs``), the pairwise ones the annotator's best and worst response
(``top_bottom_pair``), as in the paper's pairwise setup (appendix G).

Prints a table (stdout; a tqdm progress bar goes to stderr) and writes a matplotlib
figure (``--out``) and, with ``--json``, the raw numbers. matplotlib and tqdm come with
the ``demo`` extra (``pip install "rcpo-losses[demo]"``); without them the demo still runs
and prints its table. See docs/demo.md for what it shows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .mallows import mallows_rmj_discrete, mallows_rmj_pairwise, mallows_rmj_topk
from .mnl import mnl_discrete, mnl_pairwise, mnl_topk
from .ranks import UNRANKED, all_pairs, ranks_from_scores, top_bottom_pair

NOISES = ("mnl", "mallows", "rmj")
NOISE_TITLES = {"mnl": "MNL (Gumbel) noise", "mallows": "Mallows-Kendall noise", "rmj": "Mallows-RMJ noise"}
DISTANCES = {"mallows": "kendall", "rmj": "rmj"}


@dataclass(frozen=True)
class Objective:
    name: str
    family: str  # "mnl" or "mallows"
    feedback: str  # "top-bottom", "all-pairs", "top-1", "top-k" or "rmj-pairs"


def objectives(k: int, ablation: bool = False) -> list[Objective]:
    """The paper's objectives; ``ablation`` adds two sigmoid (Mallows-style) variants of top-k.

    ``Mallows-RMJ top-k, unit weights``: the comparisons of Mallows-RMJ top-k (each pick
    against its predecessor, each unranked against the last pick), all weighted 1 instead
    of ``n - i``. ``Mallows AllPairs``: the sigmoid pairwise loss on every pair the list
    implies, as DPO-AllPairs does with the logistic loss.
    """
    objs = [
        Objective("DPO top-bottom", "mnl", "top-bottom"),
        Objective("DPO-AllPairs", "mnl", "all-pairs"),
        Objective("MNL discrete", "mnl", "top-1"),
        Objective(f"MNL top-{k}", "mnl", "top-k"),
        Objective("Mallows-RMJ pairwise", "mallows", "top-bottom"),
        Objective("Mallows-RMJ discrete", "mallows", "top-1"),
        Objective(f"Mallows-RMJ top-{k}", "mallows", "top-k"),
    ]
    if ablation:
        objs += [
            Objective(f"RMJ top-{k} unit weights", "mallows", "rmj-pairs"),
            Objective("Mallows AllPairs", "mallows", "all-pairs"),
        ]
    return objs


REFERENCE = "reference (untrained)"


# ----------------------------------------------------------------------------- data


@dataclass
class World:
    """One seed's synthetic task; leading dimension of every tensor: the seed."""

    A: Tensor  # [R, d, d] true reward r*(x, y) = x^T A y
    W0: Tensor  # [R, d, d] the reference policy
    pool: Tensor  # [R, P, d] response features
    x: Tensor  # [R, N, d] training prompts (a run with n prompts uses the first n)
    slots: Tensor  # [R, N, S] pool indices of each prompt's responses
    y: Tensor  # [R, N, S, d] their features
    val_x: Tensor  # [R, V, d]
    val_slots: Tensor  # [R, V, S]
    val_y: Tensor  # [R, V, S, d]
    test_x: Tensor  # [R, T, d]


def make_world(seeds: Sequence[int], cfg: argparse.Namespace) -> World:
    d, P, S = cfg.dim, cfg.pool, cfg.set_size
    parts = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(d, d, generator=g) * (cfg.signal / d)  # r* has standard deviation ~ signal
        W0 = torch.randn(d, d, generator=g) / d
        pool = torch.randn(P, d, generator=g)
        x = torch.randn(max(cfg.sizes), d, generator=g)
        slots = torch.rand(x.shape[0], P, generator=g).argsort(-1)[:, :S]
        val_x = torch.randn(cfg.val_prompts, d, generator=g)
        val_slots = torch.rand(cfg.val_prompts, P, generator=g).argsort(-1)[:, :S]
        test_x = torch.randn(cfg.test_prompts, d, generator=g)
        parts.append((A, W0, pool, x, slots, pool[slots], val_x, val_slots, pool[val_slots], test_x))
    return World(*(torch.stack(t) for t in zip(*parts, strict=True)))


def bilinear(x: Tensor, W: Tensor, y: Tensor) -> Tensor:
    """``x^T W y`` for ``x [..., n, d]``, ``W [..., d, d]``, ``y [..., n, s, d]``: ``[..., n, s]``."""
    return torch.einsum("...nd,...de,...nse->...ns", x, W, y)


def gumbel_annotator(r: Tensor, g: torch.Generator) -> Tensor:
    """Scores whose order is a Plackett-Luce (MNL) ranking with utilities ``r``."""
    u = torch.rand(r.shape, generator=g).clamp(1e-12, 1 - 1e-12)
    return r - torch.log(-torch.log(u))


def permutations(n: int) -> Tensor:
    """All ``n!`` orders of ``n`` items, ``[n!, n]``: entry ``[p, i]`` is the true rank of the item placed ``i``-th."""
    return torch.tensor(list(itertools.permutations(range(n))))


def mallows_distance(perms: Tensor, distance: str) -> Tensor:
    """Distance of each order from the true one: ``kendall`` (pairs out of order) or ``rmj``.

    RMJ (reverse major index, the paper's eq. 11 with ``k = n``) charges ``n - i`` for an
    item at place ``i`` (1-based) that the truth ranks below the item at place ``i + 1``:
    a mistake near the top costs more than one near the bottom.
    """
    n = perms.shape[-1]
    if distance == "kendall":
        return (perms[:, :, None] > perms[:, None, :]).triu(1).sum((-1, -2))
    descent = perms[:, :-1] > perms[:, 1:]
    return (descent * torch.arange(n - 1, 0, -1)).sum(-1)


def mallows_probs(phi: float, n: int, distance: str) -> tuple[Tensor, Tensor]:
    """Every order of ``n`` items and its probability ``phi^d / Z`` under the Mallows model."""
    perms = permutations(n)
    weights = torch.tensor(phi, dtype=torch.float64) ** mallows_distance(perms, distance)
    return perms, weights / weights.sum()


def mallows_annotator(r: Tensor, phi: float, distance: str, g: torch.Generator) -> Tensor:
    """Scores whose order is a Mallows ranking around the order of ``r``: ``P(order) ~ phi^d(order, truth)``.

    Exact sampling over all ``|S|!`` orders (``|S| <= 8``), vectorized over prompts.
    """
    flat = r.reshape(-1, r.shape[-1])
    perms, probs = mallows_probs(phi, flat.shape[-1], distance)
    place = perms[torch.multinomial(probs, flat.shape[0], replacement=True, generator=g)]  # true rank at each place
    slot = flat.argsort(-1, descending=True).gather(-1, place)  # the slot at each place
    position = torch.arange(flat.shape[-1], dtype=flat.dtype).expand_as(flat)
    return torch.empty_like(flat).scatter_(-1, slot, -position).reshape(r.shape)


def mallows_mean_tau(phi: float, n: int, distance: str) -> float:
    """Expected Kendall tau between a Mallows sample and the true order, ``n`` items."""
    perms, probs = mallows_probs(phi, n, distance)
    inversions = mallows_distance(perms, "kendall").double()
    return float((probs * (1 - 4 * inversions / (n * (n - 1)))).sum())


def calibrate_phi(target_tau: float, n: int, distance: str) -> float:
    """The ``phi`` whose Mallows samples agree with the truth as well as ``target_tau`` on average (bisection)."""
    lo, hi = 1e-6, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mallows_mean_tau(mid, n, distance) > target_tau else (lo, mid)
    return (lo + hi) / 2


def pairwise_signs(a: Tensor) -> Tensor:
    """``sign(a_i - a_j)`` for every ordered pair along the last dim: ``[..., n, n]``."""
    return torch.sign(a[..., :, None] - a[..., None, :])


def kendall_tau(a: Tensor, b: Tensor | None = None, *, b_signs: Tensor | None = None) -> Tensor:
    """Kendall tau-a between ``a`` and ``b`` along the last dim (ties count 0): ``[...]``.

    ``b_signs = pairwise_signs(b)`` may be passed instead of ``b`` when it is reused.
    """
    n = a.shape[-1]
    b_signs = pairwise_signs(b) if b_signs is None else b_signs
    return (pairwise_signs(a) * b_signs).sum((-1, -2)) / (n * (n - 1))


def top1_agreement(a: Tensor, b: Tensor) -> Tensor:
    return (a.argmax(-1) == b.argmax(-1)).float()


# ----------------------------------------------------------------------------- training


@dataclass
class Runs:
    """All (size, seed) training runs of one noise setting; run ``d = size_index * n_seeds + seed_index``.

    Datasets are nested: the run with ``n`` prompts uses the first ``n`` prompts of its
    seed's world. Training rows are ordered like the runs (size-major, then seed).
    """

    sizes: list[int]
    seed_of: Tensor  # [D] seed index of each run
    row_run: Tensor  # [N] run of each training row
    scores: Tensor  # [N, S] the annotator's scores (its ranking) of each row's responses


def make_runs(world: World, scores: Tensor, sizes: Sequence[int]) -> Runs:
    n_seeds = world.x.shape[0]
    seed_of = torch.arange(n_seeds).repeat(len(sizes))
    row_run = torch.arange(len(seed_of)).repeat_interleave(torch.tensor(list(sizes)).repeat_interleave(n_seeds))
    rows = torch.cat([scores[:, :n].flatten(0, 1) for n in sizes])
    return Runs(list(sizes), seed_of, row_run, rows)


def slot_logits(world: World, W: Tensor, sizes: Sequence[int]) -> Tensor:
    """``x^T W y`` of every training row's responses under each run's ``W [..., D, d, d]``: ``[..., N, S]``.

    ``log pi(y | x)`` is this minus ``logsumexp`` over the pool, a per-prompt constant that
    every loss here is invariant to (they see rewards only through differences within a
    prompt), so it is left out. One batched product per training size, none per row.
    """
    n_seeds, out = world.x.shape[0], []
    for j, n in enumerate(sizes):
        xw = world.x[:, :n] @ W[..., j * n_seeds : (j + 1) * n_seeds, :, :]  # [..., R, n, d]
        out.append((world.y[:, :n] @ xw[..., None])[..., 0].flatten(-3, -2))  # [..., R * n, S]
    return torch.cat(out, -2)


LossFn = Callable[[Tensor, Tensor, bool], Tensor]  # (policy [L, N, S], ref [N, S], validate) -> [L, U]


def make_loss(obj: Objective, runs: Runs, k: int, beta: float, neg_log_phi: float) -> tuple[LossFn, Tensor]:
    """The objective's per-unit losses and each unit's run (a unit is a prompt, or a pair for AllPairs)."""
    kw = {"beta": beta, "reduction": "none"}
    if obj.family == "mallows":
        kw["neg_log_phi"] = neg_log_phi
    if obj.feedback in ("top-bottom", "all-pairs", "rmj-pairs"):
        # Pairs (row, chosen slot, rejected slot), as DPO's chosen/rejected batches.
        if obj.feedback == "rmj-pairs":  # each response against its predecessor in the top-k list
            n, S = runs.scores.shape
            order = runs.scores.argsort(-1, descending=True)
            rows, lose = torch.arange(n).repeat_interleave(S - 1), order[:, 1:].flatten()
            win = order[:, torch.arange(S - 1).clamp(max=k - 1)].flatten()
        else:
            if obj.feedback == "top-bottom":
                rows, pair_ranks = torch.arange(len(runs.scores)), top_bottom_pair(runs.scores)
            else:
                rows, pair_ranks = all_pairs(ranks_from_scores(runs.scores, k))
            win, lose = ((pair_ranks == v).long().argmax(-1) for v in (0, UNRANKED))
        pairwise = mnl_pairwise if obj.family == "mnl" else mallows_rmj_pairwise

        picks = [rows * runs.scores.shape[-1] + slot for slot in (win, lose)]  # into the flattened [N, S]
        ref_picks = {}  # the reference's side is the same at every step: formed once per (ref, L)

        def loss(pol: Tensor, ref: Tensor, validate: bool) -> Tensor:
            L = pol.shape[0]
            chosen, rejected = (pol.flatten(1).index_select(1, i).flatten() for i in picks)
            if ref_picks.get("ref") is not ref or ref_picks["L"] != L:
                ref_picks.update(ref=ref, L=L, pair=[ref.flatten().index_select(0, i).repeat(L) for i in picks])
            ref_chosen, ref_rejected = ref_picks["pair"]
            return pairwise(chosen, rejected, ref_chosen, ref_rejected, validate=validate, **kw).view(L, -1)

        return loss, runs.row_run[rows]
    ranks = ranks_from_scores(runs.scores, 1 if obj.feedback == "top-1" else k)
    fn = {("mnl", "top-1"): mnl_discrete, ("mallows", "top-1"): mallows_rmj_discrete}.get(
        (obj.family, obj.feedback), mnl_topk if obj.family == "mnl" else mallows_rmj_topk
    )

    repeated = {}  # the reference and the ranks, repeated for the L slices: the same at every step

    def loss(pol: Tensor, ref: Tensor, validate: bool) -> Tensor:
        L = pol.shape[0]
        if repeated.get("of") is not ref or repeated["L"] != L:
            repeated.update(of=ref, L=L, ref=ref.expand_as(pol).flatten(0, 1), ranks=ranks.repeat(L, 1))
        out = fn(pol.flatten(0, 1), repeated["ref"], repeated["ranks"], validate=validate, **kw)
        return out.view(L, -1)

    return loss, runs.row_run


def train(obj: Objective, runs: Runs, world: World, cfg: argparse.Namespace, tick: Callable[[], None]) -> Tensor:
    """Train every (learning rate, run) of one objective at once; returns ``W [L, D, d, d]``.

    Plain Adam (torch.optim.Adam's update and defaults) with a cosine learning-rate decay
    to 0, one peak learning rate per slice ``W[l]``. Adam is elementwise and each run's
    loss reads only its own slice, so this is exactly ``L * D`` independent full-batch
    trainings.
    """
    loss_fn, unit_run = make_loss(obj, runs, cfg.k, cfg.beta, cfg.neg_log_phi)
    per_run = torch.zeros(len(runs.seed_of)).index_add_(0, unit_run, torch.ones(len(unit_run)))
    unit_weight = 1.0 / per_run[unit_run]  # mean over each run's units, summed over runs
    W0 = world.W0[runs.seed_of]  # [D, d, d]
    W = W0.expand(len(cfg.lrs), *W0.shape).clone().requires_grad_(True)
    lr = torch.tensor(cfg.lrs).view(-1, 1, 1, 1)
    m, v, (b1, b2), eps = torch.zeros_like(W), torch.zeros_like(W), (0.9, 0.999), 1e-8
    ref = slot_logits(world, W0, runs.sizes)
    for step in range(1, cfg.epochs + 1):
        loss = (loss_fn(slot_logits(world, W, runs.sizes), ref, step == 1) * unit_weight).sum()
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            decay = 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.epochs))  # cosine schedule, as in the paper
            W -= decay * lr / (1 - b1**step) * m / ((v / (1 - b2**step)).sqrt() + eps)
        tick()
    return W.detach()


# ----------------------------------------------------------------------------- experiment


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed or the bar is off."""

    def set_description(self, desc: str) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, quiet: bool = False, file=None):
    """A tqdm bar on stderr (off on a non-terminal, with ``quiet``, or without tqdm)."""
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr if file is None else file, disable=None, unit="step")


def run_experiment(cfg: argparse.Namespace) -> dict:
    """Generate, annotate, train and evaluate; returns a JSON-ready dict of results."""
    world = make_world(cfg.seeds, cfg)
    objs = objectives(cfg.k, cfg.ablation)
    r_train, r_val = bilinear(world.x, world.A, world.y), bilinear(world.val_x, world.A, world.val_y)
    r_test = torch.einsum("rnd,rde,rpe->rnp", world.test_x, world.A, world.pool)  # [R, T, P]
    test_signs = pairwise_signs(r_test)

    def annotate(noise: str) -> list[Tensor]:
        """The annotator's scores of the training and validation responses (its own random stream)."""
        out = []
        for part, r in enumerate((r_train, r_val)):
            stream = 1_000_003 * (1 + 2 * NOISES.index(noise) + part)
            gens = [torch.Generator().manual_seed(stream + seed) for seed in cfg.seeds]
            sample = [
                gumbel_annotator(ri, g) if noise == "mnl" else mallows_annotator(ri, phi[noise], DISTANCES[noise], g)
                for ri, g in zip(r, gens, strict=True)
            ]
            out.append(torch.stack(sample))
        return out

    # Mallows's phi: the one whose mean Kendall tau with the truth matches the MNL annotator's
    # (estimated on 20 fresh draws of the Gumbel noise, so that it does not depend on the sample).
    g = torch.Generator().manual_seed(12345)
    r_all = torch.cat([r_train.flatten(0, 1), r_val.flatten(0, 1)]).repeat(20, 1)
    mnl_tau = float(kendall_tau(gumbel_annotator(r_all, g), r_all).mean())
    phi = {
        noise: calibrate_phi(mnl_tau, cfg.set_size, distance) if cfg.phi == "auto" else float(cfg.phi)
        for noise, distance in DISTANCES.items()
        if noise in cfg.noise
    }
    annotations = {noise: annotate(noise) for noise in cfg.noise}
    noise_tau = {n: float(kendall_tau(annotations[n][0], r_train).mean()) for n in cfg.noise}

    ref_scores = torch.einsum("rnd,rde,rpe->rnp", world.test_x, world.W0, world.pool)
    ref_tau, ref_top1 = kendall_tau(ref_scores, r_test).mean(-1), top1_agreement(ref_scores, r_test).mean(-1)
    records = [
        {"noise": noise, "objective": REFERENCE, "n_train": n, "seed": seed, "lr": None,
         "kendall_tau": float(ref_tau[i]), "top1": float(ref_top1[i])}
        for noise in cfg.noise for n in cfg.sizes for i, seed in enumerate(cfg.seeds)
    ]  # fmt: skip
    start = time.perf_counter()
    progress = progress_bar(len(cfg.noise) * len(objs) * cfg.epochs, cfg.quiet)
    n_seeds, n_sizes = len(cfg.seeds), len(cfg.sizes)
    for noise in cfg.noise:
        train_scores, val_scores = annotations[noise]
        runs = make_runs(world, train_scores, cfg.sizes)
        for obj in objs:
            progress.set_description(f"{obj.name}, {noise} noise")
            W = train(obj, runs, world, cfg, progress.update)  # [L, D, d, d]
            with torch.no_grad():
                dW = (W - world.W0[runs.seed_of]).view(len(cfg.lrs), n_sizes, n_seeds, *W.shape[-2:])
                r_hat = cfg.beta * (world.val_y @ (world.val_x @ dW)[..., None])[..., 0]  # [L, sizes, R, V, S]
                best = kendall_tau(r_hat, val_scores).mean((-1, -2)).argmax(0)  # lr index per size
                for j, n in enumerate(cfg.sizes):
                    r_hat = cfg.beta * (world.test_x @ dW[best[j], j]) @ world.pool.transpose(-1, -2)  # [R, T, P]
                    tau = kendall_tau(r_hat, b_signs=test_signs).mean(-1)
                    top1 = top1_agreement(r_hat, r_test).mean(-1)
                    records += [
                        {"noise": noise, "objective": obj.name, "n_train": n, "seed": seed, "lr": cfg.lrs[best[j]],
                         "kendall_tau": float(tau[i]), "top1": float(top1[i])}
                        for i, seed in enumerate(cfg.seeds)
                    ]  # fmt: skip
    progress.close()
    return {
        "config": {k: v for k, v in vars(cfg).items() if k not in ("func",)},
        "phi": phi,
        "annotator_kendall_tau": noise_tau,
        "objectives": [REFERENCE] + [o.name for o in objs],
        "seconds": round(time.perf_counter() - start, 2),
        "records": records,
    }


def summarize(results: dict, metric: str) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(noise, objective, n_train) -> (mean over seeds, standard error)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for rec in results["records"]:
        groups.setdefault((rec["noise"], rec["objective"], rec["n_train"]), []).append(rec[metric])
    out = {}
    for key, vals in groups.items():
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        out[key] = (mean, math.sqrt(var / len(vals)))
    return out


METRICS = {"kendall_tau": "Kendall tau", "top1": "top-1 agreement"}


def format_table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"RCPO demo: |S|={cfg['set_size']}, k={cfg['k']}, seeds={cfg['seeds']}, {cfg['epochs']} full-batch Adam "
        f"steps, lr grid {cfg['lrs']}, beta={cfg['beta']}, held-out: {cfg['test_prompts']} prompts x "
        f"{cfg['pool']} responses. Cells: mean over seeds (standard error)."
    ]
    for noise in cfg["noise"]:
        agree = results["annotator_kendall_tau"][noise]
        extra = f", phi={results['phi'][noise]:.3f}" if noise in DISTANCES else f", signal={cfg['signal']}"
        lines.append(f"\n== {NOISE_TITLES[noise]}{extra}; annotator's Kendall tau with the truth: {agree:.3f} ==")
        for metric, title in METRICS.items():
            summary = summarize(results, metric)
            header = f"{title:<24}" + "".join(f"{'n=' + str(n):>15}" for n in cfg["sizes"])
            lines += ["", header, "-" * len(header)]
            for name in results["objectives"]:
                cells = [summary[(noise, name, n)] for n in cfg["sizes"]]
                lines.append(f"{name:<24}" + "".join(f"{m:>8.3f} ({s:.3f})" for m, s in cells))
    return "\n".join(lines)


FEEDBACK_COLORS = {  # matplotlib's default cycle
    "top-bottom": "tab:blue",
    "all-pairs": "tab:orange",
    "top-1": "tab:green",
    "top-k": "tab:red",
    "rmj-pairs": "tab:purple",
}
PLOT_EXTRA = 'the plot needs matplotlib: pip install "rcpo-losses[demo]"'


def plot(results: dict, path: str) -> None:
    """Agreement with the true reward vs number of training prompts: rows = metric, columns = noise.

    Color = feedback (top-bottom pair, all pairs, best only, top-k); solid with filled
    markers = MNL, dashed with open markers = Mallows-RMJ; the band is one standard error
    over seeds. Drawn with matplotlib's object API (no pyplot, no global backend change).
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cfg = results["config"]
    objs = objectives(cfg["k"], cfg["ablation"])
    noises, sizes = cfg["noise"], cfg["sizes"]
    fig = Figure(figsize=(max(4.6 * len(noises) + 0.6, 9.5), 7.4), layout="constrained")
    axes = fig.subplots(len(METRICS), len(noises), squeeze=False, sharex=True)
    for c, noise in enumerate(noises):
        for r, (metric, label) in enumerate(METRICS.items()):
            ax, summary = axes[r, c], summarize(results, metric)
            ref = [summary[(noise, REFERENCE, n)][0] for n in sizes]
            ax.plot(sizes, ref, color="0.55", lw=1.5, label=REFERENCE)
            for obj in objs:
                mean, se = (list(v) for v in zip(*(summary[(noise, obj.name, n)] for n in sizes), strict=True))
                mallows = obj.family == "mallows"
                color = FEEDBACK_COLORS[obj.feedback]
                ax.plot(sizes, mean, color=color, ls="--" if mallows else "-", marker="s" if mallows else "o", ms=4,
                        mfc="white" if mallows else color, lw=1.6, label=obj.name)  # fmt: skip
                lo, hi = [m - e for m, e in zip(mean, se, strict=True)], [m + e for m, e in zip(mean, se, strict=True)]
                ax.fill_between(sizes, lo, hi, color=color, alpha=0.08, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if r == 0:
                ax.set_title(NOISE_TITLES[noise])
            if r == len(METRICS) - 1:
                ax.set_xlabel("training prompts")
            if c == 0:
                ax.set_ylabel(label)
    # Legend: one column per feedback, MNL above Mallows-RMJ (an empty slot where a family lacks it).
    handle = dict(zip(*reversed(axes[0, 0].get_legend_handles_labels()), strict=True))
    blank = Line2D([], [], alpha=0)
    columns = [[handle[REFERENCE], blank]] + [
        [
            next((handle[o.name] for o in objs if o.feedback == f and o.family == family), blank)
            for family in ("mnl", "mallows")
        ]
        for f in FEEDBACK_COLORS
        if any(o.feedback == f for o in objs)
    ]
    handles = [h for column in columns for h in column]
    labels = [h.get_label() if h is not blank else "" for h in handles]
    fig.legend(handles, labels, loc="outside lower center", ncol=len(columns), frameon=False)
    fig.suptitle(
        f"RCPO demo: agreement with the true reward on held-out prompts (|S|={cfg['set_size']}, k={cfg['k']}; "
        f"mean over {len(cfg['seeds'])} seed{'s' * (len(cfg['seeds']) > 1)}, band = 1 s.e.)"
    )
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rcpo_losses.demo",
        description="Train a toy policy with each RCPO objective on synthetic ranked feedback and report how well "
        "each recovers the hidden true ranking on held-out prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512], help="training prompts")
    p.add_argument("--set-size", type=int, default=5, help="|S|, responses per prompt")
    p.add_argument("--k", type=int, default=2, help="length of the top-k list")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", nargs="+", choices=NOISES, default=list(NOISES), help="annotator noise settings")
    p.add_argument("--epochs", type=int, default=150, help="full-batch Adam steps (one per pass over the data)")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="learning-rate grid")
    p.add_argument("--beta", type=float, default=1.0, help="KL strength of the implicit reward")
    p.add_argument("--neg-log-phi", type=float, default=1.0, help="Mallows dispersion weight -log phi(x)")
    p.add_argument("--phi", default="auto", help="Mallows annotator's phi; 'auto' matches the MNL annotator's tau")
    p.add_argument("--signal", type=float, default=2.0, help="standard deviation of the true reward (MNL noise: 1.28)")
    p.add_argument("--dim", type=int, default=8, help="prompt and response feature dimension")
    p.add_argument("--pool", type=int, default=64, help="candidate responses in the pool")
    p.add_argument("--val-prompts", type=int, default=200, help="annotated validation prompts (to pick the lr)")
    p.add_argument("--test-prompts", type=int, default=300, help="held-out prompts")
    p.add_argument("--out", default="rcpo_demo.png", help="PNG path ('' for none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads: the tensors are tiny, 1 is fastest")
    p.add_argument("--ablation", action="store_true", help="add two unweighted sigmoid variants of top-k")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cfg = p.parse_args(argv)
    if not 2 <= cfg.set_size <= cfg.pool:
        p.error("--set-size must be between 2 and --pool")
    if not 1 <= cfg.k <= cfg.set_size:
        p.error("--k must be between 1 and --set-size")
    if min(cfg.sizes) < 1 or cfg.epochs < 1 or cfg.beta <= 0 or cfg.neg_log_phi <= 0 or min(cfg.lrs) <= 0:
        p.error("--sizes, --epochs, --beta, --neg-log-phi and --lrs must be positive")
    try:
        if cfg.phi != "auto" and not 0 < float(cfg.phi) <= 1:
            raise ValueError
    except ValueError:
        p.error("--phi must be 'auto' or in (0, 1]")
    if set(cfg.noise) & set(DISTANCES) and cfg.set_size > 8:
        p.error("--set-size: the Mallows annotators enumerate all |S|! orders, so |S| <= 8")
    cfg.sizes, cfg.noise = sorted(set(cfg.sizes)), [n for n in NOISES if n in cfg.noise]
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = run_experiment(cfg)
    print(format_table(results))
    if cfg.out:
        try:
            plot(results, cfg.out)
            print(f"\nplot: {os.path.abspath(cfg.out)}")
        except ImportError:
            print(f"\nplot: not written ({cfg.out}): {PLOT_EXTRA}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {os.path.abspath(cfg.json)}")
    print(f"time: {results['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
