"""Sample, score, rank: ranked rows from prompts, a policy and a reward (the paper's data recipe, appendix G).

For each prompt, sample ``S`` completions from the model, merge the identical ones, score the
distinct ones with a reward, and keep the row that
:class:`~rcpo_losses.training.data.RankedPreferenceCollator` reads: the prompt, each completion's
text, its token ids as sampled (``completion_ids``, trained as they are) and whether it was cut
at ``max_new_tokens``, the scores. :func:`rank_completions` does it in batches, writes each
finished row to a JSONL file at once, and resumes an interrupted run::

    from rcpo_losses.training.generate import rank_completions

    rows = rank_completions(model, tokenizer, prompts, reward, num_samples=5, out="ranked.jsonl")

or from the command line::

    python -m rcpo_losses.training.generate --model DIR --prompts prompts.jsonl --reward module:function \\
        --num-samples 5 --out ranked.jsonl

:func:`rank_samples` is the step from one batch's samples to its rows (merge, score, rank), with
no file: the collator takes its rows to a batch.

Beside :mod:`rcpo_losses.training.precompute` at the integration layer: the core never imports it, and
transformers and tqdm are imported only when used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import versions
from ..tokens.lm_head import eval_mode
from .data import PRECOMPUTED_COLUMNS, encode_prompt, has_ranking, is_conversational

__all__ = [
    "GenerationStats",
    "RankedRows",
    "RankedSamples",
    "RewardModel",
    "Sample",
    "rank_completions",
    "rank_samples",
]

logger = logging.getLogger(__name__)

# Columns a prompt row may not carry: rank_completions writes them, or passes them to the reward itself.
RESERVED = ("prompts", "completions", "completion_ids", "truncated", "scores", "ranking", "samples", "prompt_ids",
            "prompt_index", *PRECOMPUTED_COLUMNS)  # fmt: skip
META_FORMAT = "rcpo_losses rank_completions 1"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sampled completion: its text, its token ids as sampled (None: unknown), whether it was cut."""

    text: str
    ids: tuple[int, ...] | None = None  # the end token included when the model produced one
    truncated: bool | None = None  # cut at max_new_tokens (None: the sampler did not say)


@dataclasses.dataclass
class GenerationStats:
    """What one :func:`rank_completions` call did."""

    rows_written: int = 0  # rows appended to ``out`` (or returned) by this call
    rows_resumed: int = 0  # rows found in ``out`` from an earlier run
    merged: int = 0  # samples merged into an earlier sample of the same text (prompts sampled by this call)
    skipped_identical: int = 0  # prompts with no row: one distinct completion (this call's or recorded in ``out``)
    skipped_tied: int = 0  # prompts with no row: scores that rank nothing without ordering a tie (``has_ranking``)
    truncated: int = 0  # completions cut at ``max_new_tokens`` in the rows written
    generated_tokens: int = 0  # tokens sampled (by the default generate only)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = (
            f", {self.generated_tokens / self.seconds:.0f} tokens/s" if self.generated_tokens and self.seconds else ""
        )
        return (
            f"{self.rows_written} rows written, {self.rows_resumed} already there, "
            f"{self.merged} samples merged into an identical one, "
            f"{self.skipped_identical} prompts skipped (one distinct completion), "
            f"{self.skipped_tied} prompts skipped (ties leave nothing to rank), "
            f"{self.truncated} completions cut at max_new_tokens; {self.seconds:.1f} s{rate}"
        )


class RankedRows(list):
    """The rows of :func:`rank_completions` (a ``list`` of dicts), with its :class:`GenerationStats` as ``.stats``."""

    stats: GenerationStats


class RankedSamples(NamedTuple):
    """What :func:`rank_samples` makes of one batch; each list is aligned with its prompts."""

    rows: list[dict[str, Any] | None]  # None: no row (see ``skipped``)
    merged: list[int]  # samples merged into an earlier one of the same text
    skipped: list[str | None]  # "identical" (one distinct completion), "tied" (no ranking), or None


def _name(index: int, prompt: Any) -> str:
    """``prompt 12 ('Write a short review of ...')``: the index and the start of the text, for errors."""
    text = " ".join(str(m.get("content", "")) for m in prompt) if is_conversational(prompt) else str(prompt)
    text = " ".join(text.split())
    return f"prompt {index} ({text[:40] + ('...' if len(text) > 40 else '')!r})"


def _prompt_row(index: int, item: Any) -> tuple[Any, dict[str, Any]]:
    """A prompt (text or messages) and the other columns of its row: a dict ``{"prompt", ...}``, or the prompt alone."""
    if isinstance(item, Mapping):
        if "prompt" not in item:
            raise ValueError(f"prompts: item {index} is a dict without a 'prompt' key (keys {sorted(item)})")
        prompt, columns = item["prompt"], {k: v for k, v in item.items() if k != "prompt"}
        clash = [k for k in columns if k in RESERVED]
        if clash:
            raise ValueError(
                f"prompts: {_name(index, prompt)} has a column {clash[0]!r}, a name rank_completions writes or passes "
                "to the reward itself; rename it"
            )
    else:
        prompt, columns = item, {}
    if not (isinstance(prompt, str) or is_conversational(prompt)):
        raise TypeError(f"prompts: {_name(index, prompt)} is a {type(prompt).__name__}, not a string or a list of "
                        "{'role', 'content'} messages")  # fmt: skip
    return prompt, columns


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch``: a function of ``(seed, batch)`` alone, so a resumed run redraws it."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


# generation_config fields that are token ids or bookkeeping, not sampling settings.
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_NOT_SAMPLING = {*_SPECIAL_IDS, "transformers_version", "_from_model_config", "use_cache", "output_attentions",
                 "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "max_length",
                 "cache_implementation"}  # fmt: skip


def _generation_configs(model) -> list:
    """The modules of ``model`` that hold their own ``generation_config`` (the model, or the one a wrapper holds)."""
    versions.require("transformers")
    from transformers import GenerationConfig

    return [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]


def ignored_generation_settings(model) -> dict[str, Any]:
    """The sampling settings of ``model.generation_config`` that :func:`plain_sampling` leaves out."""
    found = {}
    for m in _generation_configs(model):
        found.update({k: v for k, v in m.generation_config.to_diff_dict().items() if k not in _NOT_SAMPLING})
    return found


@contextlib.contextmanager
def plain_sampling(model) -> Iterator[None]:
    """``model.generate`` inside sees a ``generation_config`` with the model's special token ids and nothing else.

    transformers fills every argument ``generate`` is not given from the model's own
    ``generation_config`` (``repetition_penalty``, ``min_new_tokens``, ``no_repeat_ngram_size``,
    ``top_k``, ...), so a checkpoint's settings would silently change the sampling; inside the
    block the only settings are those passed. Restored after.
    """
    versions.require("transformers")
    from transformers import GenerationConfig

    saved = [(m, m.generation_config) for m in _generation_configs(model)]
    try:
        for m, config in saved:
            ids = {k: getattr(config, k, None) for k in _SPECIAL_IDS}
            m.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        yield
    finally:
        for m, config in saved:
            m.generation_config = config


def hf_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
) -> tuple[list[list[Sample]], int]:
    """Sample ``num_samples`` completions of each prompt's ids with ``model.generate``; ``(samples, tokens sampled)``.

    Plain sampling (:func:`plain_sampling`): ``temperature``, ``top_p`` and ``top_k`` (0: none), nothing from
    the model's ``generation_config`` but its token ids. A completion ends at the first end
    token (the model's ``eos_token_id`` values and the tokenizer's EOS), which its ids keep; one
    with none within ``max_new_tokens`` is ``truncated``. Its text is decoded without special
    tokens. The batch is left-padded by hand (a decoder-only model continues from the last
    position), so the tokenizer's ``padding_side`` is never touched. Sampling draws from
    torch's global generator: seed it first.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    width = max(len(x) for x in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=device)
    eos = _eos_ids(model, tokenizer)
    with plain_sampling(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,  # 0: temperature and top_p alone, as the paper's vLLM sampling (transformers defaults to 50)
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
    samples, tokens = [], 0
    for row in out[:, width:].tolist():
        end = next((t + 1 for t, tok in enumerate(row) if tok in eos), None)
        ids = row[:max_new_tokens] if end is None else row[:end]
        tokens += len(ids)
        samples.append(Sample(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), end is None))
    return [samples[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))], tokens


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (or any keyword)."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class RewardModel:
    """A Hugging Face sequence-classification reward model as a reward function ``(prompts, completions) -> scores``.

    Each (prompt, completion) pair becomes the conversation ``prompt + [assistant: completion]``
    (a plain-text prompt is one user message), formatted by the reward tokenizer's chat template,
    and is scored in batches of ``batch_size`` by ``model(...).score`` (ArmoRM) or
    ``model(...).logits[:, label]`` (Skywork-Reward and other ``*ForSequenceClassification``
    models), as SimPO and RLHFlow score their on-policy data:

    - in eval mode (no dropout; every module's train/eval flag is restored after);
    - at the last real token of each conversation, whatever the pad ids: the batch is
      left-padded and goes in as ``inputs_embeds`` with its attention mask and position ids,
      so the model reads its last position and never looks for ``pad_token_id`` (which
      misreads a conversation that ends with that id, and a tokenizer that pads with another);
    - cut to ``max_length`` tokens by dropping the start of the prompt, never the completion (a
      completion longer than ``max_length`` on its own raises ``ValueError``);
    - a classifier with ``num_labels > 1`` is refused unless ``label`` says which logit is the
      reward.

    Args:
        model: a sequence-classification model (``model(inputs_embeds=, attention_mask=)``
            returning ``.logits`` ``[B, num_labels]`` or ``.score``).
        tokenizer: its tokenizer, with a chat template.
        batch_size: conversations per forward.
        max_length: most tokens per conversation (``None``: no cut).
        label: the logit (or score column) to read; needed when there are several.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 label: int | None = None):  # fmt: skip
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("RewardModel: the reward tokenizer has no chat template to format the conversations")
        for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 2), ("label", label, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if label is not None and isinstance(labels, int) and label >= labels:
            raise ValueError(f"label: {label} is not a logit of a model with num_labels = {labels}")
        if label is None and isinstance(labels, int) and labels > 1 and type(model).__name__.endswith("Classification"):
            raise ValueError(
                f"RewardModel: the model is a classifier with num_labels = {labels} logits; pass label= (the index "
                "of the logit that is the reward)"
            )
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length, self.label = max_length, label

    def _ids(self, prompt: Any, completion: Any, index: int) -> list[int]:
        """The conversation's token ids, the start of the prompt cut off beyond ``max_length``."""
        head = list(prompt) if is_conversational(prompt) else [{"role": "user", "content": prompt}]
        tail = completion if is_conversational(completion) else [{"role": "assistant", "content": completion}]
        text = self.tokenizer.apply_chat_template(head + list(tail), tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes BOS
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        start = self.tokenizer.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
        if not text.startswith(start):
            raise ValueError(
                f"RewardModel: pair {index} has {len(ids)} tokens > max_length = {self.max_length}, and the chat "
                "template of the prompt alone does not start the conversation, so the prompt cannot be cut alone"
            )
        rest = list(self.tokenizer(text[len(start) :], add_special_tokens=False)["input_ids"])
        room = self.max_length - len(rest)
        if room < 1:
            raise ValueError(
                f"RewardModel: the completion of pair {index} has {len(rest)} tokens (with the template's end), "
                f"max_length = {self.max_length} leaves no room for its prompt; the completion is never cut"
            )
        return list(self.tokenizer(start, add_special_tokens=False)["input_ids"])[-room:] + rest

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
        sequences = [self._ids(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        device = next(self.model.parameters()).device
        embed = self.model.get_input_embeddings()
        positions = _takes(self.model.forward, "position_ids")
        pad = self.tokenizer.pad_token_id or 0  # any id: padding is masked out
        scores: list[float] = []
        with eval_mode(self.model):
            for start in range(0, len(sequences), self.batch_size):
                batch = sequences[start : start + self.batch_size]
                width = max(len(s) for s in batch)
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch], device=device)
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=device)
                inputs = {"inputs_embeds": embed(ids), "attention_mask": mask}
                if positions:  # each conversation at the positions it has alone
                    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(**inputs)
                values = getattr(out, "score", None)
                values = (out.logits if values is None else values).reshape(len(batch), -1)
                if values.shape[1] > 1 and self.label is None:
                    raise ValueError(
                        f"RewardModel: the model gives {values.shape[1]} scores per conversation; pass label= (the "
                        "index of the one that is the reward)"
                    )
                scores += values[:, self.label or 0].float().tolist()
        return scores


def _as_reward(reward) -> Callable[..., Sequence[float]]:
    """``reward`` as a function of TRL's keywords: all of them if it takes ``**kwargs``, else those it names."""
    if isinstance(reward, tuple) and len(reward) == 2:
        return RewardModel(*reward)
    if not callable(reward):
        raise TypeError(
            "reward: expected a function reward(prompts, completions, **kwargs) -> scores, a RewardModel, or a "
            f"tuple (sequence-classification model, tokenizer), got {type(reward).__name__}"
        )
    try:
        params = inspect.signature(reward).parameters
    except (TypeError, ValueError):  # a callable without a signature: give it every keyword
        return reward
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return reward
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [n for n in ("prompts", "completions") if n not in named]
    if missing:
        raise TypeError(
            f"reward: takes no keyword {missing[0]!r}; a reward is called as reward(prompts=, completions=, "
            "completion_ids=, <the other columns of the prompt rows>=) (TRL's convention): name its parameters so, "
            "and take **kwargs"
        )

    def call(**kwargs):
        return reward(**{k: v for k, v in kwargs.items() if k in named})

    return call


def _score_batch(reward, names: list[str], prompts: list, completions: list[list[Any]], ids: list, columns: list):
    """``reward`` on a batch of prompts (each repeated for its completions), checked; scores per prompt.

    Called with TRL's keywords on the flat lists: ``prompts``, ``completions``, ``completion_ids``
    (None where unknown), and each other column of the prompt rows (None where a row lacks it).
    A reward that raises on the batch is retried prompt by prompt to name the prompt it fails on.
    """
    keys = list(dict.fromkeys(k for c in columns for k in c))

    def call(ks: list[int]) -> Sequence[float]:
        flat = [(k, j) for k in ks for j in range(len(completions[k]))]
        return reward(
            prompts=[prompts[k] for k, _ in flat],
            completions=[completions[k][j] for k, j in flat],
            completion_ids=[None if ids[k] is None else ids[k][j] for k, j in flat],
            **{key: [columns[k].get(key) for k, _ in flat] for key in keys},
        )

    where = names[0] + (f" .. {names[-1].split(' (')[0]}" if len(names) > 1 else "")
    ks = list(range(len(names)))
    try:
        found = call(ks)
    except Exception as e:
        for k in ks:
            try:
                call([k])
            except Exception as e_k:
                raise RuntimeError(f"reward raised on {names[k]}: {e_k!r}") from e_k
        raise RuntimeError(f"reward raised on the batch {where}: {e!r}") from e
    n = sum(len(c) for c in completions)
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
            raise ValueError(f"reward: {names[k]}: completion {bad[0]} scored {scores[bad[0]]}, not finite")
        out.append(scores)
    return out


def rank_samples(
    prompts: Sequence[Any],
    samples: Sequence[Sequence[Sample]],
    reward,
    *,
    prompt_ids: Sequence[Sequence[int] | None] | None = None,
    indices: Sequence[int] | None = None,
) -> RankedSamples:
    """Merge each prompt's identical samples, score the distinct ones in one reward call, and make the rows.

    The step from a batch's samples to the rows the collator reads, shared by
    :func:`rank_completions` (which writes the rows) and a trainer that samples online (which
    collates them at once: ``RankedPreferenceCollator(tokenizer)([r for r in out.rows if r])``).

    Samples of the same text are one response of the assortment: the first is kept (its ids
    and flag) and ``samples`` counts them. A prompt with one distinct text has nothing to rank
    (``"identical"``, SimPO's rule), nor one whose scores rank nothing without ordering a tie
    (``"tied"``: :func:`~rcpo_losses.training.data.has_ranking` is False); neither gets a row
    or, for ``"identical"``, a reward call. Each row is::

        {"prompt": prompt, "completions": [n texts], "completion_ids": [n id lists],
         "truncated": [n flags], "scores": [n floats], "samples": [n counts],
         "prompt_ids": [ids], "prompt_index": i, **the prompt row's other columns}

    ``completion_ids`` and ``prompt_ids`` only when every sample has ids, ``prompt_index`` only
    with ``indices``.

    Args:
        prompts: prompts (text or messages), or rows ``{"prompt": ..., **columns}``.
        samples: ``samples[k]``: the :class:`Sample` of ``prompts[k]``.
        reward: called as ``reward(prompts=, completions=, completion_ids=, **columns)`` on the
            flat lists of (prompt, distinct completion) pairs (TRL's convention); a chat
            prompt's completions as ``[{"role": "assistant", "content": text}]``. A function
            without ``**kwargs`` gets the keywords it names.
        prompt_ids: each prompt's ids as the sampler fed them (``encode_prompt``).
        indices: each prompt's index in the dataset, named in errors and written as ``prompt_index``.

    Raises ``ValueError`` / ``RuntimeError`` naming the prompt for a reward that raises,
    returns the wrong number of scores or a score that is not finite.
    """
    if len(samples) != len(prompts):
        raise ValueError(f"samples: {len(samples)} lists of samples for {len(prompts)} prompts")
    numbered = indices is not None
    indices = list(range(len(prompts))) if indices is None else list(indices)
    reward = _as_reward(reward)
    items = [_prompt_row(i, p) for i, p in zip(indices, prompts, strict=True)]
    distinct, counts, merged = [], [], []
    for group in samples:
        by_text: dict[str, list[Sample]] = {}
        for s in group:
            by_text.setdefault(s.text, []).append(s)
        distinct.append([same[0] for same in by_text.values()])
        counts.append([len(same) for same in by_text.values()])
        merged.append(len(group) - len(by_text))
    keep = [k for k in range(len(items)) if len(distinct[k]) > 1]
    with_ids = [all(s.ids is not None for s in d) for d in distinct]
    scores = dict.fromkeys(keep)
    if keep:
        found = _score_batch(
            reward,
            [_name(indices[k], items[k][0]) for k in keep],
            [items[k][0] for k in keep],
            [[[{"role": "assistant", "content": s.text}] if is_conversational(items[k][0]) else s.text
              for s in distinct[k]] for k in keep],
            [[list(s.ids) for s in distinct[k]] if with_ids[k] else None for k in keep],
            [items[k][1] for k in keep],
        )  # fmt: skip
        scores = dict(zip(keep, found, strict=True))
    rows, skipped = [], []
    for k, (prompt, columns) in enumerate(items):
        reason = "identical" if k not in scores else None if has_ranking(scores[k]) else "tied"
        skipped.append(reason)
        if reason is not None:
            rows.append(None)
            continue
        row: dict[str, Any] = {"prompt": prompt, "completions": [s.text for s in distinct[k]]}
        if with_ids[k]:
            row["completion_ids"] = [list(s.ids) for s in distinct[k]]
        row.update(truncated=[s.truncated for s in distinct[k]], scores=scores[k], samples=counts[k])
        if with_ids[k] and prompt_ids is not None and prompt_ids[k] is not None:
            row["prompt_ids"] = list(prompt_ids[k])
        if numbered:
            row["prompt_index"] = indices[k]
        rows.append({**row, **columns})
    return RankedSamples(rows, merged, skipped)


def model_fingerprint(model) -> str:
    """A short hash of a model's parameters: each one's name, shape, dtype and first and last 8 values.

    Cheap (no full pass over the weights) and enough to tell another checkpoint, a further
    trained policy or another dtype from the model that sampled a file.
    """
    h = hashlib.blake2b(type(model).__name__.encode(), digest_size=8)
    for name, p in model.named_parameters():
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        flat = p.detach().reshape(-1)
        with contextlib.suppress(RuntimeError, NotImplementedError):  # meta or sharded tensors: shapes only
            h.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary, special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else type(tokenizer).__name__
    found = [vocab, getattr(tokenizer, "chat_template", None)]
    found += [getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return hashlib.blake2b(json.dumps(found, default=str).encode(), digest_size=8).hexdigest()


class _Output:
    """``out``: the JSONL of rows, ``<out>.meta.json`` (the arguments, the prompts without a row), ``<out>.lock``.

    :meth:`read` only reads (and refuses a file of other arguments or prompts); :meth:`open`
    takes the lock, reads again, and only then cuts a torn last line and writes.
    """

    def __init__(self, path: str | os.PathLike, arguments: dict[str, Any]):
        self.path = Path(path)
        self.meta_path = Path(f"{path}.meta.json")
        self.lock_path = Path(f"{path}.lock")
        self.arguments = arguments
        self.rows: dict[int, dict[str, Any]] = {}
        self.skipped: dict[int, str] = {}
        self.complete_bytes = self.size = 0
        self.sink = self.lock = None

    def read(self, prompts: list[tuple[Any, dict[str, Any]]]) -> None:
        meta = None
        if self.meta_path.exists():
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
                raise ValueError(f"out: {self.meta_path} was not written by rank_completions: use a new out path")
            old = meta.get("arguments", {})
            for key in dict.fromkeys([*self.arguments, *old]):
                if old.get(key) != self.arguments.get(key):
                    raise ValueError(
                        f"out: {self.path} was sampled with {key} = {old.get(key)!r}, not {self.arguments.get(key)!r} "
                        f"({self.meta_path}); rerun with the first run's arguments to resume it, or use a new out path"
                    )
        data = self.path.read_bytes() if self.path.exists() else b""
        if meta is None and data.strip():
            raise ValueError(
                f"out: {self.path} holds rows but no {self.meta_path.name} with the arguments they were sampled with "
                "(written by an older rank_completions, or by hand): use a new out path"
            )
        self.size, self.complete_bytes = len(data), data.rfind(b"\n") + 1  # a kill mid-write leaves a torn line
        self.rows, self.skipped = {}, {}
        for n, line in enumerate(data[: self.complete_bytes].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"out: line {n} of {self.path} is not JSON ({e}); not written by rank_completions"
                ) from e
            i = row.get("prompt_index") if isinstance(row, dict) else None
            ok = isinstance(i, int) and 0 <= i < len(prompts) and i not in self.rows
            if not ok or row.get("prompt") != prompts[i][0] or any(row.get(k) != v for k, v in prompts[i][1].items()):
                raise ValueError(
                    f"out: line {n} of {self.path} is a row for prompt_index {i!r} that is not that prompt of the "
                    "prompts given (another run's file?): use a new out path"
                )
            self.rows[i] = row
        for reason, found in (meta or {}).get("skipped", {}).items():
            for i in found:
                if not isinstance(i, int) or not 0 <= i < len(prompts) or i in self.rows:
                    raise ValueError(f"out: {self.meta_path} lists prompt {i!r} as skipped, which is not a prompt "
                                     "without a row: use a new out path")  # fmt: skip
                self.skipped[i] = reason

    def open(self, prompts: list[tuple[Any, dict[str, Any]]]) -> None:
        """Take the lock (a second writer is refused), read again, then cut a torn line and open for appending."""
        try:
            self.lock = open(self.lock_path, "a")  # noqa: SIM115 (closed in close)
        except OSError as e:
            raise OSError(f"out: cannot write beside {self.path} ({e})") from e
        try:
            import fcntl

            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except BlockingIOError:
            self.close()
            raise RuntimeError(
                f"out: another process is writing {self.path} (it holds the lock {self.lock_path}); wait for it to "
                "finish, or use another out path"
            ) from None
        self.read(prompts)  # what the last writer left
        if self.size > self.complete_bytes:
            with open(self.path, "rb+") as f:
                f.truncate(self.complete_bytes)
        self.save()
        self.sink = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def save(self) -> None:
        """Write ``<out>.meta.json`` whole (a new file renamed over the old: never half written)."""
        skipped: dict[str, list[int]] = {"identical": [], "tied": []}
        for i, reason in sorted(self.skipped.items()):
            skipped.setdefault(reason, []).append(i)
        meta = {"format": META_FORMAT, "arguments": self.arguments, "skipped": skipped}
        tmp = Path(f"{self.meta_path}.tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.meta_path)

    def write(self, row: dict[str, Any]) -> None:
        self.sink.write(json.dumps(row) + "\n")  # one write, newline last: a kill leaves a torn line at worst
        self.sink.flush()

    def close(self) -> None:
        for f in (self.sink, self.lock):  # closing the lock file releases the lock
            if f is not None:
                f.close()
        self.sink = self.lock = None


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
    generate: Callable[[list[str], int, int], Sequence[Sequence[Any]]] | None = None,
    progress: bool = True,
) -> RankedRows:
    r"""Sample ``num_samples`` completions of each prompt, score the distinct ones with ``reward``: the ranked rows.

    Each row (:func:`rank_samples`) is::

        {"prompt": prompt, "completions": [n texts], "completion_ids": [n id lists],
         "truncated": [n flags], "scores": [n floats], "samples": [n counts],
         "prompt_ids": [ids], "prompt_index": i, **the prompt row's other columns}

    as :class:`~rcpo_losses.training.data.RankedPreferenceCollator` reads it: it trains each
    completion on its ``completion_ids``, the tokens the model produced (the end token
    included when the model ended, none when it was cut at ``max_new_tokens``:
    ``truncated[j]``), after ``prompt_ids``, the prompt's tokens as the model saw them; and it
    ranks by ``scores`` (ties: its ``ties`` rule). The ``n <= num_samples`` completions are the
    distinct texts in the order first sampled; ``samples[j]`` counts the samples of text ``j``
    (identical samples are one response). A prompt with one distinct text, or whose scores rank
    nothing without ordering a tie (all equal, or ``[1, 1, 0]``), gets no row;
    ``stats.skipped_identical`` and ``stats.skipped_tied`` count them, ``stats.merged`` the
    samples merged.

    Prompts are strings, continued as they are (tokenized with the tokenizer's special tokens,
    BOS, as the collator does), or chat messages ``[{"role", "content"}, ...]``, formatted by
    the tokenizer's chat template with the generation prompt
    (:func:`~rcpo_losses.training.data.encode_prompt`); or rows ``{"prompt": ..., **columns}``,
    whose other columns go to the reward and into the row. Completions are decoded without
    special tokens.

    Sampling (the default ``generate``): ``model.generate`` with ``temperature`` and ``top_p``
    (no top-k), ``batch_size`` prompts x ``num_samples`` samples per call, left-padded, and
    nothing else: the model's own ``generation_config`` settings (``repetition_penalty``,
    ``min_new_tokens``, ``no_repeat_ngram_size``, ...) are not applied (one logged warning names
    them; :func:`plain_sampling`).

    Resume and determinism: the prompts go in fixed batches by index, batch ``i`` being
    ``prompts[i * batch_size : (i + 1) * batch_size]``, and torch's generator is seeded with
    :func:`batch_seed` ``(seed, i)`` (inside ``torch.random.fork_rng``: the caller's generator is
    left as it was) before batch ``i`` is sampled. A batch's samples depend on the prompts that
    share it (the padding, and the one generator that ``generate`` draws from for the whole
    batch), so fixing each batch's composition and seed makes the samples of every prompt a
    function of ``(prompts, seed, batch_size)`` alone. With ``out``, rows found in the file are
    kept; a batch with any prompt missing is sampled and scored again whole (a reward model's
    scores may depend on the batch's padding too) and only its missing rows are written, so a
    resumed run writes exactly what an uninterrupted run would have (same arguments, model and
    hardware), never a row twice.

    The file ``<out>.meta.json`` beside ``out`` records the arguments the rows were sampled
    with (``num_samples``, ``max_new_tokens``, ``temperature``, ``top_p``, ``batch_size``,
    ``seed``, the sampler, a fingerprint of the model's parameters and one of the tokenizer)
    and the prompts that got no row. A rerun with another value of any of them is refused,
    naming it, and so is a file of other prompts, before anything is written. A run that finds
    every prompt done only reads (a read-only path is fine); one that writes holds an
    exclusive lock on ``<out>.lock`` (``fcntl.flock``), so a second concurrent writer is refused.

    Args:
        model: a causal LM with Hugging Face's ``generate`` (unused with ``generate=``).
        tokenizer: its tokenizer (chat template for chat prompts).
        prompts: a sequence of prompts (strings or message lists) or of rows ``{"prompt", ...}``.
        reward: a function called once per batch as ``reward(prompts=, completions=,
            completion_ids=, **columns)`` (TRL's convention) on the flat lists of (prompt,
            distinct completion) pairs: a chat prompt's completions come as ``[{"role":
            "assistant", "content": text}]``, a text prompt's as strings, ``completion_ids`` as
            lists (None from a ``generate=`` that gives no ids), and each other column of the
            prompt rows as a list (None where a row lacks it). A function without ``**kwargs``
            gets only the keywords it names, ``prompts`` and ``completions`` at least. Or a
            :class:`RewardModel`, or a tuple ``(model, tokenizer)`` of a sequence-classification
            reward model (wrapped in a :class:`RewardModel`).
        num_samples: completions sampled per prompt (``S``, at least 2).
        max_new_tokens, temperature, top_p: the sampling.
        batch_size: prompts per ``generate`` call (and per reward call).
        seed: the sampling seed (an int >= 0).
        out: a JSONL path: each finished row is appended and flushed at once; rows already in it
            are kept (resume). A torn last line, left by a kill mid-write, is dropped.
        generate: instead of ``model.generate``, a callable ``generate(texts, num_samples, seed)``
            returning, for each text (the prompt, chat-formatted), ``num_samples`` completions,
            each a string, a pair ``(text, truncated)``, a triple ``(text, truncated, token
            ids)`` or a :class:`Sample`; ``seed`` is the batch's seed. Without ids the rows carry
            none and the collator tokenizes their text. See docs/api.md for vLLM.
        progress: a tqdm bar (prompts, tokens/s) and a summary on stderr at the end.

    Returns:
        :class:`RankedRows`: the rows of every prompt that has one, in prompt order (those read
        from ``out`` included), with ``.stats`` (:class:`GenerationStats`).

    Raises:
        ValueError / TypeError naming the argument or the prompt (index and start of text), before
        ``out`` is read or written: a bad argument (``seed=-1``), an empty prompt, a chat prompt
        without a chat template or one the template refuses, a prompt row with a reserved column,
        a reward that takes no ``prompts`` or ``completions``; a file of other arguments or
        prompts. RuntimeError for a second writer of ``out``. ValueError / RuntimeError naming the
        prompt for a reward that raises, returns the wrong number of scores or a non-finite
        score; the rows written before it stay in ``out``.
    """
    for name, value, low in (("num_samples", num_samples, 2), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("seed", seed, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0 (sampling), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p!r}")
    if model is None and generate is None:
        raise ValueError("model: needed to sample (or pass generate=)")
    if tokenizer is None and generate is None:
        raise ValueError("tokenizer: needed to sample with model.generate")
    items = list(prompts)
    rows_in = [_prompt_row(i, item) for i, item in enumerate(items)]
    reward = _as_reward(reward)
    texts, prompt_ids = [], []  # bad prompts fail here, before any file is touched
    for i, (prompt, columns) in enumerate(rows_in):
        where = f"prompts: {_name(i, prompt)}"
        if tokenizer is None:  # a generate= without a tokenizer: text prompts, continued as they are
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{where}: needs a tokenizer (chat messages), or is empty")
            texts.append(prompt)
            prompt_ids.append(None)
        else:
            text, ids = encode_prompt(tokenizer, prompt, where)
            texts.append(text)
            prompt_ids.append(ids)
        if out is not None:
            try:
                json.dumps([prompt, columns])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: cannot be written to out as JSON ({e})") from e

    start_time = time.perf_counter()
    stats = GenerationStats()
    output = None
    if out is not None:
        sampler = "model.generate" if generate is None else f"generate={_qualname(generate)}"
        output = _Output(out, {
            "num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "batch_size": batch_size, "seed": seed, "sampler": sampler,
            "model": None if model is None else model_fingerprint(model),
            "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        })  # fmt: skip
        output.read(rows_in)
    batches = [list(range(first, min(first + batch_size, len(items)))) for first in range(0, len(items), batch_size)]

    def missing(indices: list[int]) -> list[int]:
        return [] if output is None else [i for i in indices if i not in output.rows and i not in output.skipped]

    done: dict[int, dict[str, Any]] = {} if output is None else output.rows
    if output is not None and any(missing(b) for b in batches):
        output.open(rows_in)  # the file is accepted: now it may be written
        done = output.rows
    skipped: dict[int, str] = {} if output is None else output.skipped
    stats.rows_resumed = len(done)
    if generate is None and (ignored := ignored_generation_settings(model)):
        logger.warning("rank_completions: plain sampling leaves out the model's generation_config settings %s", ignored)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="rank_completions", unit="prompt", disable=not progress)
    bar.update(len(done) + len(skipped))
    try:
        with eval_mode(model) if generate is None else contextlib.nullcontext():
            for b, indices in enumerate(batches):
                todo = missing(indices) if output is not None else indices
                if not todo:
                    continue
                samples, tokens = sample_completions(
                    model, tokenizer, [items[i] for i in indices], [texts[i] for i in indices],
                    [prompt_ids[i] for i in indices], num_samples=num_samples, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, seed=batch_seed(seed, b), generate=generate,
                    names=[_name(i, rows_in[i][0]) for i in indices],
                )  # fmt: skip
                stats.generated_tokens += tokens
                # The whole batch is scored, written rows included: a reward may depend on its batch (padding).
                ranked = rank_samples([items[i] for i in indices], samples, reward,
                                      prompt_ids=[prompt_ids[i] for i in indices], indices=indices)  # fmt: skip
                for k, i in enumerate(indices):
                    if i not in todo:
                        continue
                    stats.merged += ranked.merged[k]
                    row = ranked.rows[k]
                    if row is None:
                        skipped[i] = ranked.skipped[k]
                        continue
                    if output is not None:
                        output.write(row)
                    done[i] = row
                    stats.rows_written += 1
                    stats.truncated += sum(bool(t) for t in row["truncated"])
                if output is not None and any(i in skipped for i in todo):
                    output.save()
                bar.update(len(todo))
                if stats.generated_tokens:
                    bar.set_postfix_str(f"{stats.generated_tokens / (time.perf_counter() - start_time):.0f} tokens/s")
    finally:
        bar.close()
        if output is not None:
            output.close()
    stats.skipped_identical = sum(reason == "identical" for reason in skipped.values())
    stats.skipped_tied = sum(reason == "tied" for reason in skipped.values())
    stats.seconds = time.perf_counter() - start_time
    if progress:
        print(f"rank_completions: {stats}" + (f" -> {out}" if out is not None else ""), file=sys.stderr)
    rows = RankedRows(done[i] for i in sorted(done))
    rows.stats = stats
    return rows


def _qualname(function: Callable) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Any],
    texts: Sequence[str],
    prompt_ids: Sequence[Sequence[int] | None],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    seed: int,
    generate: Callable | None = None,
    names: Sequence[str] | None = None,
) -> tuple[list[list[Sample]], int]:
    """``num_samples`` completions of each prompt, sampled under ``seed``: ``(samples per prompt, tokens sampled)``.

    The one sampler of the library: :func:`rank_completions` and the online trainer
    (:class:`~rcpo_losses.training.online.OnlineRCPOTrainer`) both call it. With ``generate=None``,
    :func:`hf_generate` on ``prompt_ids`` (:func:`~rcpo_losses.training.data.encode_prompt`), seeded
    without touching the caller's generator; else ``generate(texts, num_samples, seed)``, whose
    completions may be strings, ``(text, truncated)``, ``(text, truncated, ids)`` or :class:`Sample`
    (tokens sampled: 0, as the hook does not say). ``names`` name the prompts in errors.
    """
    names = [_name(i, p) for i, p in enumerate(prompts)] if names is None else list(names)
    if generate is not None:
        found = list(generate(list(texts), num_samples, seed))
        if len(found) != len(texts):
            raise ValueError(f"generate: returned {len(found)} lists of completions for {len(texts)} prompts")
        result = []
        for name, completions in zip(names, found, strict=True):
            samples = [_as_sample(c, name) for c in completions]
            if len(samples) != num_samples:
                raise ValueError(f"generate: returned {len(samples)} completions for {name}, "
                                 f"expected num_samples = {num_samples}")  # fmt: skip
            if len({s.ids is None for s in samples}) > 1:
                raise ValueError(f"generate: gave token ids for some completions of {name} only")
            result.append(samples)
        return result, 0
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return hf_generate(
            model, tokenizer, list(prompt_ids), num_samples=num_samples, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k,
        )  # fmt: skip


def _as_sample(completion: Any, name: str) -> Sample:
    """What a ``generate=`` callable returned for one completion, as a :class:`Sample`."""
    if isinstance(completion, Sample):
        return completion
    if isinstance(completion, str):
        return Sample(completion)
    if isinstance(completion, (tuple, list)) and len(completion) in (2, 3) and isinstance(completion[0], str):
        cut = None if completion[1] is None else bool(completion[1])
        ids = None if len(completion) == 2 or completion[2] is None else tuple(int(t) for t in completion[2])
        return Sample(completion[0], ids, cut)
    raise ValueError(
        f"generate: returned {completion!r} for {name}; a completion is a string, (text, truncated), "
        "(text, truncated, token ids) or a Sample"
    )


def _load_function(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (the current folder is importable under ``python -m``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--reward: expected module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _read_prompts(path: str) -> list[Any]:
    """A JSONL of prompts (UTF-8): per line a row ``{"prompt": text or messages, ...}`` (kept whole), or a string."""
    prompts = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"--prompts: line {n} of {path} is not UTF-8 ({e})") from e
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts: line {n} of {path} is not JSON ({e})") from e
            if isinstance(item, Mapping) and "prompt" not in item:
                raise ValueError(f"--prompts: line {n} of {path} has no 'prompt' key (keys {sorted(item)})")
            if not isinstance(item, (str, Mapping)):
                raise ValueError(
                    f'--prompts: line {n} of {path} is a JSON {type(item).__name__}, not a row {{"prompt": ...}} '
                    "or a string"
                )
            prompts.append(item)
    return prompts


def main(argv: Sequence[str] | None = None) -> RankedRows:
    parser = argparse.ArgumentParser(
        prog="python -m rcpo_losses.training.generate",
        description="Sample completions of each prompt, score them, write ranked rows (JSONL); rerun to resume.",
    )
    parser.add_argument("--model", required=True, help="folder or hub id of the causal LM (and its tokenizer)")
    parser.add_argument("--prompts", required=True,
                        help='JSONL (UTF-8): a row {"prompt": text or chat messages, ...} per line; the other '
                             "columns go to the reward and into the rows")  # fmt: skip
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward", help="module:function, reward(prompts, completions, **kwargs) -> list of floats")
    reward.add_argument("--reward-model", help="folder or hub id of a sequence-classification reward model")
    parser.add_argument("--reward-label", type=int, default=None,
                        help="the logit of a reward model with several labels that is the reward")  # fmt: skip
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
    prompts = _read_prompts(args.prompts)  # a bad file fails before any model is loaded

    versions.require("transformers")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.reward is not None:
        score = _load_function(args.reward)
    else:
        rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, dtype=dtype).to(args.device)
        score = RewardModel(rm, AutoTokenizer.from_pretrained(args.reward_model), batch_size=args.reward_batch_size,
                            label=args.reward_label)  # fmt: skip
    return rank_completions(
        model, tokenizer, prompts, score, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        batch_size=args.batch_size, seed=args.seed, out=args.out,
    )  # fmt: skip


if __name__ == "__main__":
    main()
