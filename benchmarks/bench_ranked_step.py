"""One RCPO training step on a tiny Llama: padded vs prefix-shared layout, and a DPO pair step on the same prompts.

Run (not collected by the normal test run, which only looks in tests/):

    python -m pytest benchmarks/bench_ranked_step.py --benchmark-json=out.json
    python benchmarks/bench_ranked_step.py --paper-table      # token counts for Llama-3-8B, no model

A step: policy forward and backward, reference forward under ``no_grad``, the loss
(``mallows_rmj_topk`` with the reference entropies' dispersion for ``|S| = 5``;
``mnl_pairwise``, i.e. DPO, for the pair step), ``loss.backward()``. Layouts (``layout``):

- ``padded_all_rows``: what ``RCPOTrainer`` did before the prefix-shared layout: ``[B * S, L]``
  right-padded sequences, the fused LM head on every position
  (``fused_linear_response_stats`` on ``final_hidden_states``), targets masked;
- ``padded``: the same ``[B * S, L]`` sequences through :func:`rcpo_losses.response_stats`,
  the LM head only on the rows that predict a completion token;
- ``prefix_shared``: one packed sequence, each prompt once, no padding, through
  :func:`rcpo_losses.response_stats` (CPU: the segment attention, ``sdpa`` per prompt and per
  completion with its prompt, :mod:`rcpo_losses.training.segment_attention`; CUDA: ``flex_attention``
  with a ``BlockMask``);
- ``prefix_shared_dense`` (CPU only): the same, with ``sdpa`` and the dense ``[1, 1, P, P]`` mask
  (``rcpo_losses.ops.backend.CPU_SEGMENT_ATTENTION = False``).

``dpo_pair-*`` rows run the pair step (completions 0 and 1 of each prompt, the first the
chosen one) in the ``padded_all_rows`` layout (as TRL's DPO: both sequences padded, the LM
head on every position) and in the ``prefix_shared`` one.

Model: ``LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376,
num_hidden_layers=4, num_attention_heads=8)``, random weights (no download), bf16
(``RCPO_BENCH_DTYPE=fp32`` for fp32). Lengths (seeded, ``torch.Generator().manual_seed(0)``): ``B`` prompts
(``RCPO_BENCH_PROMPTS``, default 1 on the CPU, 16 on CUDA) of uniform ``[140, 200]`` tokens
(mean 170), each with 5 completions of uniform ``[200, 600]`` tokens (400 +- 200); token
ids uniform in ``[3, 32000)``; the ranks a random full order of the 5.

``extra_info``: ``tokens_fed`` (input positions, padding included), ``lm_head_rows``,
``prompt_tokens`` and ``completion_tokens`` (each prompt once), ``tokens_ratio``
(``tokens_fed / (prompt_tokens + completion_tokens)``), ``peak_mb`` (CUDA:
``max_memory_allocated``; CPU: peak resident set of one step in a fresh subprocess,
``tests/peak_memory.py``, ``MALLOC_MMAP_THRESHOLD_=65536``).
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also from a subprocess
from common import DEVICE, peak_bytes, sync

from rcpo_losses import (
    entropy_dispersion,
    final_hidden_states,
    fused_linear_response_stats,
    lm_head_spec,
    mallows_rmj_topk,
    mnl_pairwise,
    response_stats,
)
from rcpo_losses.ops import backend
from rcpo_losses.training.packing import pack_prefix_shared

V, H, LAYERS, FFN, HEADS = 32000, 512, 4, 1376, 8
S = 5
PROMPT_LEN, COMPLETION_LEN = (140, 200), (200, 600)
NUM_PROMPTS = int(os.environ.get("RCPO_BENCH_PROMPTS", 16 if DEVICE == "cuda" else 1))
ROUNDS = 10 if DEVICE == "cuda" else 2  # a CPU step takes seconds to tens of seconds
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[os.environ.get("RCPO_BENCH_DTYPE", "bf16")]
# prefix_shared_dense (CPU): sdpa with the dense [P, P] mask instead of the segment attention
LAYOUTS = ("padded_all_rows", "padded", "prefix_shared") + (("prefix_shared_dense",) if DEVICE == "cpu" else ())
ROWS = [("ranked", layout) for layout in LAYOUTS] + [("dpo_pair", "padded_all_rows"), ("dpo_pair", "prefix_shared")]


def make_rows(num_prompts: int = NUM_PROMPTS, seed: int = 0):
    """``(prompts, completions, ranks)``: token-id lists from the seeded length distribution above."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(3, V, (n,), generator=g).tolist()

    prompts = [ids(*PROMPT_LEN) for _ in range(num_prompts)]
    completions = [[ids(*COMPLETION_LEN) for _ in range(S)] for _ in range(num_prompts)]
    ranks = torch.stack([torch.randperm(S, generator=g) for _ in range(num_prompts)])
    return prompts, completions, ranks


def padded_batch(prompts, completions, ranks) -> dict:
    """The ``[B, S, L]`` layout of :class:`rcpo_losses.training.data.RankedPreferenceCollator` (``layout="padded"``)."""
    B, n = len(prompts), len(completions[0])
    L = max(len(p) + len(c) for p, cs in zip(prompts, completions, strict=True) for c in cs)
    input_ids = torch.zeros(B, n, L, dtype=torch.int64)
    attention = torch.zeros(B, n, L, dtype=torch.int64)
    completion_mask = torch.zeros(B, n, L, dtype=torch.bool)
    for b, (p, cs) in enumerate(zip(prompts, completions, strict=True)):
        for j, c in enumerate(cs):
            input_ids[b, j, : len(p) + len(c)] = torch.tensor(p + c)
            attention[b, j, : len(p) + len(c)] = 1
            completion_mask[b, j, len(p) : len(p) + len(c)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask, "ranks": ranks}


def make_batch(kind: str, layout: str, num_prompts: int = NUM_PROMPTS) -> dict:
    prompts, completions, ranks = make_rows(num_prompts)
    if kind == "dpo_pair":  # completion 0 chosen over completion 1
        completions = [cs[:2] for cs in completions]
        ranks = torch.tensor([[0, -1]] * len(prompts))  # 0: chosen, UNRANKED (-1): the other
    if layout.startswith("prefix_shared"):
        batch = {"ranks": ranks, **pack_prefix_shared(prompts, completions, ranks.shape[1])}
    else:
        batch = padded_batch(prompts, completions, ranks)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    dtype = DTYPE
    policy = LlamaForCausalLM(config).to(DEVICE, dtype)
    ref = LlamaForCausalLM(config).to(DEVICE, dtype).eval().requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    return policy, ref


def set_layout_attention(model, layout: str) -> None:
    """flex_attention for the packed layout on CUDA (a BlockMask); sdpa elsewhere (the dense or 2D mask)."""
    model.set_attn_implementation(
        "flex_attention" if layout.startswith("prefix_shared") and DEVICE == "cuda" else "sdpa"
    )


def all_rows_stats(model, batch, entropy: bool):
    """The pre-prefix-shared trainer: the fused LM head on every position of the ``[B * S, T]`` sequences."""
    B, n, L = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(B * n, L)
    hidden = final_hidden_states(model, ids, batch["attention_mask"].reshape(B * n, L))
    return fused_linear_response_stats(
        hidden,
        labels=ids,
        mask=batch["completion_mask"].reshape(B * n, L),
        shift_labels=True,
        num_responses=n,
        entropy=entropy,
        validate=False,
        **lm_head_spec(model).as_kwargs(),
    )


def step(policy, ref, batch, kind: str, layout: str) -> torch.Tensor:
    backend.CPU_SEGMENT_ATTENTION = False if layout == "prefix_shared_dense" else None
    try:
        return _step(policy, ref, batch, kind, layout)
    finally:
        backend.CPU_SEGMENT_ATTENTION = None


def _step(policy, ref, batch, kind: str, layout: str) -> torch.Tensor:
    stats = all_rows_stats if layout == "padded_all_rows" else response_stats
    pol = stats(policy, batch, entropy=False)
    with torch.no_grad():
        rf = stats(ref, batch, entropy=True)
    ranks = batch["ranks"]
    if kind == "dpo_pair":
        loss = mnl_pairwise(pol.logps[:, 0], pol.logps[:, 1], rf.logps[:, 0], rf.logps[:, 1], beta=0.1)
    else:
        phi = entropy_dispersion(rf.entropy_sums, rf.lengths, ranks, V)
        loss = mallows_rmj_topk(pol.logps, rf.logps, ranks, beta=0.1, neg_log_phi=phi)
    loss.backward()
    policy.zero_grad(set_to_none=True)
    return loss.detach()


def token_counts(batch, layout: str) -> dict:
    if layout.startswith("prefix_shared"):
        fed, rows = batch["input_ids"].numel(), batch["target_ids"].numel()
    else:
        keep = batch["attention_mask"].bool().reshape(-1, batch["input_ids"].shape[-1])
        fed = keep.shape[0] * int(keep.any(0).nonzero().max() + 1)
        rows = fed if layout == "padded_all_rows" else int(batch["completion_mask"][..., 1:].sum())
    return {"tokens_fed": fed, "lm_head_rows": rows}


def content_tokens(kind: str) -> dict:
    prompts, completions, _ = make_rows()
    n = 2 if kind == "dpo_pair" else S
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c) for cs in completions for c in cs[:n])
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def cpu_peak_bytes(kind: str, layout: str, start, peak) -> int:
    """In a fresh subprocess: peak resident set above the models and the batch during one step.

    No warm-up step (it would double the time of a CPU row): the one-off allocations of a
    first call are counted, a few MB against the hundreds a step holds.
    """
    policy, ref = models()
    for m in (policy, ref):
        set_layout_attention(m, layout)
    batch = make_batch(kind, layout)
    base = start()
    step(policy, ref, batch, kind, layout)
    return peak() - base


@pytest.fixture(scope="module")
def policy_ref():
    pytest.importorskip("transformers")
    return models()


@pytest.mark.parametrize(("kind", "layout"), ROWS, ids=[f"{k}-{la}" for k, la in ROWS])
def test_ranked_step(benchmark, policy_ref, kind, layout):
    policy, ref = policy_ref
    for m in (policy, ref):
        set_layout_attention(m, layout)
    batch = make_batch(kind, layout)

    def run():
        out = step(policy, ref, batch, kind, layout)
        sync()
        return out

    run()  # warm-up (FlexAttention compiles on CUDA)
    peak = peak_bytes(run, __file__, kind, layout)
    benchmark.group = f"ranked step B={NUM_PROMPTS}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    counts = {**token_counts(batch, layout), **content_tokens(kind)}
    counts["tokens_ratio"] = counts["tokens_fed"] / (counts["prompt_tokens"] + counts["completion_tokens"])
    benchmark.extra_info.update(
        kind=kind,
        layout=layout,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu {torch.backends.cpu.get_cpu_capability()}",
        **counts,
    )
    if peak is not None:
        benchmark.extra_info.update(peak_mb=peak / 1e6)
    if layout.startswith("prefix_shared"):  # the targets, on the counts (not timed)
        assert counts["tokens_fed"] <= 1.05 * (counts["prompt_tokens"] + counts["completion_tokens"])
        assert counts["lm_head_rows"] == counts["completion_tokens"]


# ---------------------------------------------------------------------------------------------------------------
# Token counts at the paper's setup (Llama-3-8B, global batch 112 prompts, max length 4096): no model runs.

BODY_PARAMS_8B = 6.98e9  # Llama-3-8B without the embedding and the LM head (8.03e9 - 2 * 128256 * 4096)
HEAD_FLOP_8B = 2 * 4096 * 128256  # one LM-head row, forward: 1.05 GFLOP


def paper_counts(micro_batch: int, global_batch: int = 112, max_length: int = 4096, seed: int = 0) -> dict:
    """Tokens and LM-head rows of one optimizer step (``global_batch`` prompts in micro-batches of ``micro_batch``).

    Padded layouts pad every sequence of a micro-batch to its longest (prompt + completion, cut at
    ``max_length``) and run the LM head on every position, as TRL's DPO and the pre-prefix-shared
    trainer do; the prefix-shared layout feeds each prompt once plus each completion and runs the head
    on the completion tokens only.
    """
    prompts, completions, _ = make_rows(global_batch, seed)
    out = {}
    for name, n in (("dpo_pair_padded", 2), ("padded_S5", 5), ("prefix_shared_S5", 5)):
        fed = rows = 0
        for a in range(0, global_batch, micro_batch):
            ps, cs = prompts[a : a + micro_batch], [c[:n] for c in completions[a : a + micro_batch]]
            cs = [[c[: max_length - len(p)] for c in row] for p, row in zip(ps, cs, strict=True)]
            if name == "prefix_shared_S5":
                fed += sum(len(p) + sum(map(len, row)) for p, row in zip(ps, cs, strict=True))
                rows += sum(len(c) for row in cs for c in row)
            else:
                L = max(len(p) + len(c) for p, row in zip(ps, cs, strict=True) for c in row)
                fed += len(ps) * n * L
                rows += len(ps) * n * L
        flop = 4 * (2 * BODY_PARAMS_8B * fed + HEAD_FLOP_8B * rows)  # policy fwd + bwd (3x) and reference fwd (1x)
        out[name] = {"tokens": fed, "lm_head_rows": rows, "pflop": flop / 1e15}
    return out


def interleaved(rounds: int = 3) -> None:
    """Every row once per round, round after round, in one process: ratios that a shared machine's load cancels."""
    import statistics
    import time

    policy, ref = models()
    batches = {row: make_batch(*row) for row in ROWS}
    times: dict = {row: [] for row in ROWS}
    for r in range(rounds + 1):  # round 0 warms up
        for row in ROWS:
            for m in (policy, ref):
                set_layout_attention(m, row[1])
            t0 = time.perf_counter()
            step(policy, ref, batches[row], *row)
            sync()
            if r:
                times[row].append(time.perf_counter() - t0)
    med = {row: statistics.median(t) for row, t in times.items()}
    print(f"B={NUM_PROMPTS} prompts, {rounds} rounds, {DTYPE}, {DEVICE}")
    print("| step | layout | tokens fed | LM-head rows | median step (s) | rounds (s) |")
    print("|---|---|---|---|---|---|")
    for (kind, layout), t in times.items():
        c = token_counts(batches[kind, layout], layout)
        rounds_s = ", ".join(f"{x:.2f}" for x in t)
        fed, rows = c["tokens_fed"], c["lm_head_rows"]
        print(f"| {kind} | {layout} | {fed:,} | {rows:,} | {med[kind, layout]:.2f} | {rounds_s} |")
    per_round = {row: t for row, t in times.items()}

    def ratio(a, b) -> str:
        rs = [x / y for x, y in zip(per_round[a], per_round[b], strict=True)]
        return f"{statistics.median(rs):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in rs)})"

    print("padded_all_rows / prefix_shared:", ratio(("ranked", "padded_all_rows"), ("ranked", "prefix_shared")))
    print("padded / prefix_shared:", ratio(("ranked", "padded"), ("ranked", "prefix_shared")))
    print("padded / prefix_shared, FLOP-count limit:", flop_limit())
    if ("ranked", "prefix_shared_dense") in per_round:
        print("padded / prefix_shared_dense:", ratio(("ranked", "padded"), ("ranked", "prefix_shared_dense")))
        print(
            "prefix_shared_dense / prefix_shared:",
            ratio(("ranked", "prefix_shared_dense"), ("ranked", "prefix_shared")),
        )
    print("|S|=5 / DPO, padded_all_rows:", ratio(("ranked", "padded_all_rows"), ("dpo_pair", "padded_all_rows")))
    print("|S|=5 / DPO, prefix_shared:", ratio(("ranked", "prefix_shared"), ("dpo_pair", "prefix_shared")))
    print(
        "|S|=5 prefix_shared / DPO padded_all_rows:",
        ratio(("ranked", "prefix_shared"), ("dpo_pair", "padded_all_rows")),
    )


def flop_limit() -> str:
    """padded / prefix_shared in FLOPs of the ranked step: the speed-up a step could reach if time followed FLOPs.

    Linear layers ``2 x params`` per token, attention ``4 x H`` per (query, key) pair and layer (``QK^T``
    and ``PV``), both 4x (policy forward, its backward 2x, reference forward); the LM head
    ``2 x V x H`` per target row, 5x (the fused backward recomputes the logits). Pairs: prefix-shared
    the mask's nonzeros (:func:`rcpo_losses.training.packing.attended_pairs`); padded causal ``L (L + 1) / 2``
    per sequence of the padded length ``L`` (the least), or ``L^2`` (what ``sdpa`` computes with a
    padding mask, no causal skip).
    """
    from rcpo_losses.training.packing import attended_pairs

    packed, padded = make_batch("ranked", "prefix_shared"), make_batch("ranked", "padded")
    B, n, L = padded["input_ids"].shape
    body, pair, row = 2 * LAYERS * (4 * H * H + 3 * H * FFN), 4 * H * LAYERS, 2 * V * H
    rows = packed["target_ids"].numel()

    def flop(tokens, pairs):
        return 4 * (body * tokens + pair * pairs) + 5 * row * rows

    prefix = flop(packed["input_ids"].numel(), attended_pairs(packed))
    causal, full = flop(B * n * L, B * n * L * (L + 1) // 2), flop(B * n * L, B * n * L * L)
    return f"{causal / prefix:.2f}x (padded attention causal), {full / prefix:.2f}x (padded attention L^2)"


def attention_cost(rounds: int = 3) -> None:
    """One attention call (sdpa, forward + backward, 8 heads of 64) of the packed dense mask vs the padded batch."""
    import statistics
    import time

    from rcpo_losses.training.packing import attended_pairs, dense_attention_mask

    packed, padded = make_batch("ranked", "prefix_shared"), make_batch("ranked", "padded")
    P = packed["input_ids"].shape[-1]
    B, n, L = padded["input_ids"].shape
    mask = dense_attention_mask(packed)
    pad_mask = padded["attention_mask"].reshape(B * n, 1, 1, L).bool() & torch.ones(L, L, dtype=torch.bool).tril()
    F = torch.nn.functional

    def run(shape, m):
        q, k, v = (torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
        out = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()
            sync()
            out.append(time.perf_counter() - t0)
        return statistics.median(out[1:])

    t_packed = run((1, HEADS, P, H // HEADS), mask)
    t_padded = run((B * n, HEADS, L, H // HEADS), pad_mask)
    print(f"packed P={P}: dense mask {P * P / 1e6:.1f} M pairs ({mask.numel() / 1e6:.1f} MB bool), "
          f"attended {attended_pairs(packed) / 1e6:.2f} M; sdpa fwd+bwd {t_packed * 1e3:.0f} ms per layer")  # fmt: skip
    print(f"padded {B * n} x L={L}: {B * n * L * L / 1e6:.1f} M pairs; sdpa fwd+bwd {t_padded * 1e3:.0f} ms per layer")


def print_paper_table() -> None:
    print("| micro-batch | layout | tokens / step | LM-head rows / step | PFLOP / step (linear layers) | vs DPO |")
    print("|---|---|---|---|---|---|")
    for mb in (1, 4):
        counts = paper_counts(mb)
        dpo = counts["dpo_pair_padded"]["pflop"]
        for name, c in counts.items():
            print(f"| {mb} | {name} | {c['tokens']:,} | {c['lm_head_rows']:,} | {c['pflop']:.1f} | "
                  f"{c['pflop'] / dpo:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-table", action="store_true", help="print the Llama-3-8B token-count table")
    parser.add_argument("--interleaved", type=int, metavar="ROUNDS", help="time every row round-robin")
    parser.add_argument("--attention", action="store_true", help="time one sdpa call: dense packed vs padded")
    args = parser.parse_args()
    if args.paper_table:
        print_paper_table()
    if args.attention:
        attention_cost()
    if args.interleaved:
        interleaved(args.interleaved)
