"""Sample, score, rank: ranked rows from prompts, a policy and a reward (the paper's data recipe, appendix G).

For each prompt, sample ``S`` completions from the model, score each with a reward, and keep
the row ``{"prompt", "completions", "scores"}`` that :class:`~rcpo_losses.training.data.RankedPreferenceCollator`
reads (it ranks by score). :func:`rank_completions` does it in batches, writes each finished row
to a JSONL file at once, and resumes an interrupted run::

    from rcpo_losses.training.generate import rank_completions

    rows = rank_completions(model, tokenizer, prompts, reward, num_samples=5, out="ranked.jsonl")

or from the command line::

    python -m rcpo_losses.training.generate --model DIR --prompts prompts.jsonl --reward module:function \\
        --num-samples 5 --out ranked.jsonl

Beside :mod:`rcpo_losses.training.precompute` at the integration layer: the core never imports it, and
transformers and tqdm are imported only when used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import is_conversational

__all__ = ["GenerationStats", "RankedRows", "RewardModel", "rank_completions"]

# A completion as the generate= callable may return it: its text, or (text, cut at max_new_tokens).
Completion = str | tuple[str, bool]


@dataclasses.dataclass
class GenerationStats:
    """What one :func:`rank_completions` call did."""

    rows_written: int = 0  # rows appended to ``out`` (or returned) by this call
    rows_resumed: int = 0  # rows found in ``out`` from an earlier run
    skipped_identical: int = 0  # prompts whose completions were all the same text (SimPO's rule)
    truncated: int = 0  # completions cut at ``max_new_tokens`` in the rows written
    generated_tokens: int = 0  # tokens sampled (by the default generate only)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = (
            f", {self.generated_tokens / self.seconds:.0f} tokens/s" if self.generated_tokens and self.seconds else ""
        )
        return (
            f"{self.rows_written} rows written, {self.rows_resumed} already there, "
            f"{self.skipped_identical} prompts skipped (all completions identical), "
            f"{self.truncated} completions cut at max_new_tokens; {self.seconds:.1f} s{rate}"
        )


class RankedRows(list):
    """The rows of :func:`rank_completions` (a ``list`` of dicts), with its :class:`GenerationStats` as ``.stats``."""

    stats: GenerationStats


def _name(index: int, prompt: Any) -> str:
    """``prompt 12 ('Write a short review of ...')``: the index and the start of the text, for errors."""
    text = " ".join(str(m.get("content", "")) for m in prompt) if is_conversational(prompt) else str(prompt)
    text = " ".join(text.split())
    return f"prompt {index} ({text[:40] + ('...' if len(text) > 40 else '')!r})"


def _prompt_text(tokenizer, prompt: Any, index: int) -> str:
    """The text the model continues: the prompt, or the chat template applied with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not is_conversational(prompt):
        raise TypeError(f"prompts: {_name(index, prompt)} is a {type(prompt).__name__}, not a string or a list of "
                        "{'role', 'content'} messages")  # fmt: skip
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"prompts: {_name(index, prompt)} is a list of chat messages, but the tokenizer has no chat template "
            "(set tokenizer.chat_template, or give plain-text prompts)"
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch``: a function of ``(seed, batch)`` alone, so a resumed run redraws it."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)


def hf_generate(
    model,
    tokenizer,
    texts: list[str],
    add_special_tokens: list[bool],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[list[list[tuple[str, bool]]], int]:
    """Sample ``num_samples`` completions of each text with ``model.generate``; ``(completions, tokens sampled)``.

    The batch is left-padded by hand (a decoder-only model continues from the last position), so
    the tokenizer's ``padding_side`` is never touched. Each completion is ``(text, cut)``: decoded
    without special tokens, ``cut`` when no EOS came within ``max_new_tokens``. Sampling draws from
    torch's global generator: seed it first.
    """
    ids = [
        list(tokenizer(t, add_special_tokens=s)["input_ids"]) for t, s in zip(texts, add_special_tokens, strict=True)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    width = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # temperature and top_p alone, as the paper's vLLM sampling (transformers defaults to 50)
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=pad,
    )
    new = out[:, width:].tolist()
    eos = _eos_ids(model, tokenizer)
    completions, tokens = [], 0
    for row in new:
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos), None)
        cut = end is None
        row = row if cut else row[:end]
        tokens += len(row)
        completions.append((tokenizer.decode(row, skip_special_tokens=True), cut))
    return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(texts))], tokens


class RewardModel:
    """A Hugging Face sequence-classification reward model as a reward function ``(prompts, completions) -> scores``.

    Each (prompt, completion) pair becomes the conversation ``prompt + [assistant: completion]``
    (a plain-text prompt is one user message), formatted by the reward tokenizer's chat template,
    and is scored in batches of ``batch_size`` by ``model(...).score`` (ArmoRM) or
    ``model(...).logits[:, 0]`` (Skywork-Reward and other ``*ForSequenceClassification`` models),
    as SimPO and RLHFlow score their on-policy data.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("RewardModel: the reward tokenizer has no chat template to format the conversations")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            messages = list(prompt) if is_conversational(prompt) else [{"role": "user", "content": prompt}]
            messages += completion if is_conversational(completion) else [{"role": "assistant", "content": completion}]
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                add_special_tokens=False,  # the chat template writes BOS where the model wants one
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            out = self.model(**batch)
            score = getattr(out, "score", None)
            score = out.logits[:, 0] if score is None else score.reshape(len(batch["input_ids"]), -1)[:, 0]
            scores += score.float().tolist()
        return scores


def _as_reward(reward) -> Callable[[list, list], Sequence[float]]:
    if isinstance(reward, tuple) and len(reward) == 2:
        return RewardModel(*reward)
    if not callable(reward):
        raise TypeError(
            "reward: expected a function (prompts, completions) -> scores, a RewardModel, or a tuple "
            f"(sequence-classification model, tokenizer), got {type(reward).__name__}"
        )
    return reward


def _read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete rows of a JSONL file; a torn last line (a kill mid-write: no final newline) is cut off the file."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"out: line {n} of {path} is not JSON ({e}); it was not written by rank_completions"
            ) from e
    return rows


def _score_batch(reward, indices: list[int], prompts: list, completions: list[list[Any]]) -> list[list[float]]:
    """``reward`` on a batch of prompts (each repeated for its completions), checked; scores per prompt.

    A reward that raises on the batch is retried prompt by prompt to name the prompt it fails on.
    """

    def call(ks: list[int]) -> Sequence[float]:
        flat_p = [prompts[k] for k in ks for _ in completions[k]]
        flat_c = [c for k in ks for c in completions[k]]
        return reward(flat_p, flat_c)

    where = _name(indices[0], prompts[0]) + (f" .. prompt {indices[-1]}" if len(indices) > 1 else "")
    ks = list(range(len(indices)))
    try:
        found = call(ks)
    except Exception as e:
        for k in ks:
            try:
                call([k])
            except Exception as e_k:
                raise RuntimeError(f"reward raised on {_name(indices[k], prompts[k])}: {e_k!r}") from e_k
        raise RuntimeError(f"reward raised on the batch {where}: {e!r}") from e
    n = sum(len(completions[k]) for k in ks)
    try:
        found = [float(s) for s in found]
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward: returned {type(found).__name__} for the batch {where}, not numbers ({e})") from e
    if len(found) != n:
        raise ValueError(f"reward: returned {len(found)} scores for {n} completions, batch {where}")
    out, start = [], 0
    for k in ks:
        scores = found[start : start + len(completions[k])]
        start += len(completions[k])
        bad = [j for j, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"reward: {_name(indices[k], prompts[k])}: completion {bad[0]} scored {scores[bad[0]]}, not finite"
            )
        out.append(scores)
    return out


def rank_completions(
    model,
    tokenizer,
    prompts: Sequence[Any],
    reward,
    *,
    num_samples: int = 5,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.95,
    batch_size: int = 8,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    generate: Callable[[list[str], int, int], Sequence[Sequence[Completion]]] | None = None,
    progress: bool = True,
) -> RankedRows:
    r"""Sample ``num_samples`` completions of each prompt, score them with ``reward``: the ranked rows.

    Each row is::

        {"prompt": prompt, "completions": [S strings], "scores": [S floats],
         "truncated": [S bools], "prompt_index": i}

    as :class:`~rcpo_losses.training.data.RankedPreferenceCollator` reads it (it ranks by ``scores`` and
    ignores the other keys): ``truncated[j]`` is True when completion ``j`` was cut at
    ``max_new_tokens`` (None when a ``generate=`` callable did not say), ``prompt_index`` the
    prompt's position in ``prompts``. A prompt whose completions are all the same text has
    nothing to rank and gets no row (SimPO's rule); ``stats.skipped_identical`` counts them.

    Prompts are strings, continued as they are (tokenized with the tokenizer's special tokens,
    BOS, as the collator does), or chat messages ``[{"role", "content"}, ...]``, formatted by the
    tokenizer's chat template with the generation prompt. Completions are decoded without
    special tokens.

    Sampling (the default ``generate``): ``model.generate`` with ``temperature`` and ``top_p``
    (no top-k), ``batch_size`` prompts x ``num_samples`` samples per call, left-padded.

    Resume and determinism: the prompts go in fixed batches by index, batch ``i`` being
    ``prompts[i * batch_size : (i + 1) * batch_size]``, and torch's generator is seeded with
    :func:`batch_seed` ``(seed, i)`` (inside ``torch.random.fork_rng``: the caller's generator is
    left as it was) before batch ``i`` is sampled. A batch's samples depend on the prompts that
    share it (the padding, and the one generator that ``generate`` draws from for the whole
    batch: a generator per prompt would mean one ``generate`` call per prompt), so fixing each
    batch's composition and seed makes the samples of every prompt a function of ``(prompts,
    seed, batch_size)`` alone. With ``out``, rows found in the file are kept; a batch with any
    prompt missing is sampled and scored again whole (a reward model's scores may depend on the
    batch's padding too) and only its missing rows are written, so a resumed run writes exactly
    what an uninterrupted run would have (same arguments, model and hardware), never a row
    twice. A prompt skipped for identical completions has no row and is redrawn on resume.

    Args:
        model: a causal LM with Hugging Face's ``generate`` (unused with ``generate=``).
        tokenizer: its tokenizer (chat template for chat prompts).
        prompts: a sequence of prompts (strings or message lists).
        reward: a function ``reward(prompts, completions) -> list[float]`` (TRL's convention),
            called once per batch on the flat lists of ``(prompt, completion)`` pairs: a chat
            prompt's completions come as ``[{"role": "assistant", "content": text}]``, a text
            prompt's as strings. Or a :class:`RewardModel`, or a tuple ``(model, tokenizer)`` of a
            sequence-classification reward model (wrapped in a :class:`RewardModel`).
        num_samples: completions per prompt (``S``, at least 2).
        max_new_tokens, temperature, top_p: the sampling.
        batch_size: prompts per ``generate`` call (and per reward call).
        seed: the sampling seed.
        out: a JSONL path: each finished row is appended and flushed at once; rows already in it
            are skipped (resume). A torn last line, left by a kill mid-write, is dropped.
        generate: instead of ``model.generate``, a callable ``generate(texts, num_samples, seed)``
            returning, for each text (the prompt, chat-formatted), ``num_samples`` completions, each
            a string or a ``(string, truncated)`` pair; ``seed`` is the batch's seed. See
            docs/api.md for vLLM.
        progress: a tqdm bar (prompts, tokens/s) and a summary on stderr at the end.

    Returns:
        :class:`RankedRows`: the rows of every prompt that has one, in prompt order (those read
        from ``out`` included), with ``.stats`` (:class:`GenerationStats`).

    Raises:
        ValueError / TypeError / RuntimeError naming the prompt (index and start of text) for a
        chat prompt without a chat template, a reward that raises, returns the wrong number of
        scores or a non-finite score. Rows written before the error stay in ``out``.
    """
    for name, value, low in (("num_samples", num_samples, 2), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0 (sampling), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p!r}")
    prompts = list(prompts)
    reward = _as_reward(reward)
    texts = [_prompt_text(tokenizer, p, i) for i, p in enumerate(prompts)]  # bad prompts fail before any sampling

    start_time = time.perf_counter()
    stats = GenerationStats()
    done: dict[int, dict[str, Any]] = {}
    if out is not None and os.path.exists(out):
        for row in _read_rows(out):
            i = row.get("prompt_index")
            if not isinstance(i, int) or not 0 <= i < len(prompts) or row.get("prompt") != prompts[i]:
                raise ValueError(
                    f"out: {out} holds a row for prompt_index {i!r} whose prompt is not that of the prompts given "
                    "(another run's file?): use a new out path"
                )
            if len(row.get("completions", ())) != num_samples:
                raise ValueError(
                    f"out: {out} holds a row for {_name(i, prompts[i])} with {len(row.get('completions', ()))} "
                    f"completions, not num_samples = {num_samples}: resume with the arguments of the first run"
                )
            done[i] = row
        stats.rows_resumed = len(done)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="rank_completions", unit="prompt", disable=not progress)
    bar.update(len(done))
    sink = open(out, "a") if out is not None else None  # noqa: SIM115 (closed in finally)
    was_training = getattr(model, "training", False)
    if generate is None:
        model.eval()
    try:
        for b, first in enumerate(range(0, len(prompts), batch_size)):
            indices = list(range(first, min(first + batch_size, len(prompts))))
            missing = [i for i in indices if i not in done]
            if not missing:
                continue
            completions = _sample(model, tokenizer, texts, prompts, indices, num_samples, max_new_tokens,
                                  temperature, top_p, batch_seed(seed, b), generate, stats)  # fmt: skip
            # The whole batch is scored, written rows included: a reward may depend on its batch (padding).
            keep = [i for i in indices if len({c for c, _ in completions[i]}) > 1]
            stats.skipped_identical += sum(i not in keep for i in missing)
            chat = [is_conversational(prompts[i]) for i in keep]
            as_reward = [
                [[{"role": "assistant", "content": c}] if chat[k] else c for c, _ in completions[i]]
                for k, i in enumerate(keep)
            ]
            scores = _score_batch(reward, keep, [prompts[i] for i in keep], as_reward) if keep else []
            for i, s in zip(keep, scores, strict=True):
                if i in done:
                    continue
                row = {
                    "prompt": prompts[i],
                    "completions": [c for c, _ in completions[i]],
                    "scores": s,
                    "truncated": [t for _, t in completions[i]],
                    "prompt_index": i,
                }
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")  # one write, newline last: a kill leaves a torn line at worst
                    sink.flush()
                done[i] = row
                stats.rows_written += 1
                stats.truncated += sum(bool(t) for t in row["truncated"])
            bar.update(len(missing))
            elapsed = time.perf_counter() - start_time
            if stats.generated_tokens:
                bar.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tokens/s")
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        if generate is None:
            model.train(was_training)
    stats.seconds = time.perf_counter() - start_time
    if progress:
        print(f"rank_completions: {stats}" + (f" -> {out}" if out is not None else ""), file=sys.stderr)
    rows = RankedRows(done[i] for i in sorted(done))
    rows.stats = stats
    return rows


def _sample(model, tokenizer, texts, prompts, indices, num_samples, max_new_tokens, temperature, top_p, seed,
            generate, stats) -> dict[int, list[tuple[str, bool | None]]]:  # fmt: skip
    """The completions of the batch ``indices`` as ``{prompt index: [(text, truncated)]}``, sampled under ``seed``."""
    batch = [texts[i] for i in indices]
    if generate is not None:
        found = list(generate(batch, num_samples, seed))
        if len(found) != len(indices):
            raise ValueError(f"generate: returned {len(found)} lists of completions for {len(indices)} prompts")
        result = {}
        for i, cs in zip(indices, found, strict=True):
            cs = [(c, None) if isinstance(c, str) else (str(c[0]), None if c[1] is None else bool(c[1])) for c in cs]
            if len(cs) != num_samples:
                raise ValueError(f"generate: returned {len(cs)} completions for {_name(i, prompts[i])}, "
                                 f"expected num_samples = {num_samples}")  # fmt: skip
            result[i] = cs
        return result
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        found, tokens = hf_generate(
            model, tokenizer, batch, [isinstance(prompts[i], str) for i in indices], num_samples=num_samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        )  # fmt: skip
    stats.generated_tokens += tokens
    return dict(zip(indices, found, strict=True))


def _load_function(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the current folder is importable under ``python -m``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward: expected module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _read_prompts(path: str) -> list[Any]:
    """A JSONL of prompts: each line ``{"prompt": text or messages, ...}`` or a bare JSON string."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, Mapping):
                if "prompt" not in item:
                    raise ValueError(f"--prompts: line {n} of {path} has no 'prompt' key")
                item = item["prompt"]
            prompts.append(item)
    return prompts


def main(argv: Sequence[str] | None = None) -> RankedRows:
    parser = argparse.ArgumentParser(
        prog="python -m rcpo_losses.training.generate",
        description="Sample completions of each prompt, score them, write ranked rows (JSONL); rerun to resume.",
    )
    parser.add_argument("--model", required=True, help="folder or hub id of the causal LM (and its tokenizer)")
    parser.add_argument("--prompts", required=True, help='JSONL: {"prompt": text or chat messages} per line')
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward", help="module:function, reward(prompts, completions) -> list of floats")
    reward.add_argument("--reward-model", help="folder or hub id of a sequence-classification reward model")
    parser.add_argument("--out", required=True, help="the JSONL of ranked rows (appended to: resumes)")
    parser.add_argument("--num-samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reward-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.reward is not None:
        score = _load_function(args.reward)
    else:
        rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, dtype=dtype).to(args.device)
        score = RewardModel(rm.eval(), AutoTokenizer.from_pretrained(args.reward_model),
                            batch_size=args.reward_batch_size)  # fmt: skip
    return rank_completions(
        model, tokenizer, _read_prompts(args.prompts), score, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, seed=args.seed, out=args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
