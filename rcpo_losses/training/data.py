"""From rows of ranked completions to the ``[B, S, L]`` tensors and ``[B, S]`` ranks the losses read.

A row is a prompt, its completions and the feedback on them::

    {"prompt": "2 + 2 =", "completions": [" 4", " 5", " four"], "scores": [1.0, 0.0, 0.5]}
    {"prompt": [{"role": "user", "content": "Hi"}],                     # conversational
     "completions": [[{"role": "assistant", "content": "Hello!"}], "Hey."],
     "ranking": [1]}                                                    # completion 1 best; a top-1 list

and a sampled row (:func:`rcpo_losses.training.generate.rank_completions`) also carries the
token ids as sampled, which are trained as they are, never re-tokenized::

    {"prompt": ..., "completions": [...], "scores": [...],
     "completion_ids": [[...], ...], "truncated": [...], "prompt_ids": [...]}

:class:`RankedPreferenceCollator` tokenizes a batch of rows; :func:`row_ranks` is its
feedback-to-ranks step alone (for instance, to filter a dataset before training). Only
torch is needed: the tokenizer is any object with the Hugging Face tokenizer interface.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..ranks import IGNORE, UNRANKED
from .packing import pack_prefix_shared

TIES = ("error", "prefix", "leave_out")
LAYOUTS = ("padded", "prefix_shared")
# Reference statistics stored with the rows (rcpo_losses.training.precompute): one value per completion.
REF_COLUMNS = ("ref_logps", "ref_entropy_sums", "ref_lengths")
# ...and the fingerprint of the token ids they were computed on (prompt and completions, as collated): one per row.
REF_TOKEN_HASH = "ref_token_hash"
PRECOMPUTED_COLUMNS = (*REF_COLUMNS, REF_TOKEN_HASH)
# The columns of a row the collator reads (a trainer keeps them in a datasets.Dataset).
ROW_COLUMNS = ("prompt", "completions", "scores", "ranking", "completion_ids", "truncated", "prompt_ids")


def token_hash(prompt: Sequence[int], completions: Sequence[Sequence[int]]) -> int:
    """A 63-bit fingerprint (an int64) of a row's prompt token ids and each completion's token ids."""
    text = repr(([int(t) for t in prompt], [[int(t) for t in c] for c in completions]))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _prompt_start(prompt: Any, width: int = 40) -> str:
    """The start of a prompt, plain text or a conversation's messages, to name a row by."""
    if is_conversational(prompt):
        prompt = " ".join(str(m.get("content")) for m in prompt)
    text = str(prompt)
    return repr(text if len(text) <= width else text[:width] + "...")


def _where(row: Mapping[str, Any], index: int | None, position: int | None = None) -> str:
    """``row 9 (prompt 'What is...')``: the dataset index when known, else the position in the batch."""
    if index is not None:
        name = f"row {index}"
    elif position is not None:
        name = f"row at position {position} of the batch"
    else:
        name = "row"
    return f"{name} (prompt {_prompt_start(row.get('prompt'))})"


def row_ranks(
    row: Mapping[str, Any], *, k: int | None = None, ties: str = "leave_out", index: int | None = None
) -> list[int]:
    """The rank of each completion of one row: ``0 .. k_b - 1`` for its top-k list, ``UNRANKED`` otherwise.

    Feedback is ``row["scores"]`` (one number per completion, higher is better) or
    ``row["ranking"]`` (completion indices, best first; a prefix such as a top-2 list is
    fine). ``k`` caps the list length (``None``: as long as the feedback allows).

    Tied scores have no order, so they are never ordered by position. ``ties`` says what
    to do when a tie decides the top-k list (two tied completions both in it, or one in it
    and one just outside); ties among completions left out of the list never matter:

    - ``"leave_out"`` (default): the list is the strictly ordered prefix, as ``"prefix"``,
      of the completions that remain once every tied group scoring above the first untied
      completion has left the assortment (``IGNORE``). ``scores = [3, 3, 2, 1]`` gives
      ``[IGNORE, IGNORE, 0, 1]`` (completion 2 beats 3; the tied best are in no choice set),
      ``[3, 2, 2, 1]`` gives ``[0, UNRANKED, UNRANKED, UNRANKED]``. It raises only when no
      top-k list exists that orders no tie: when no completion holds a score of its own above
      another's (all scores equal, or ``[2, 2, 1]``; :func:`has_ranking` is False).
    - ``"prefix"``: keep only the strictly ordered prefix of the list, the completions
      that beat everything after them. ``scores = [3, 2, 2, 1]`` gives the top-1 list
      ``[0, UNRANKED, UNRANKED, UNRANKED]``, since completions 1 and 2 tie for second. If the
      best score itself is tied there is nothing to rank, and it raises.
    - ``"error"``: raise ``ValueError`` naming the row.

    Under ``"leave_out"`` the MNL top-k loss is the exact negative log-likelihood of an event
    the scores show: by Luce's choice axiom, Plackett-Luce restricted to the completions that
    remain is Plackett-Luce on them (docs/losses.md, "Ties").

    ``scores`` and ``ranking`` may be lists, tuples, 1-d numpy arrays or tensors; ranking
    indices may be numpy or tensor integers (``np.argsort(-scores)``).

    Raises ``ValueError`` naming the row (``index``, and the start of its prompt) and the field for fewer than two
    completions, feedback that is not a list (a scalar, a string), a score that is not a
    number (``None``) or not finite, scores of the wrong length, a ranking that is not a list
    of distinct completion indices, both or neither of ``scores`` and ``ranking``.
    """
    return _row_ranks(row, k, ties, _where(row, index))


def has_ranking(scores: Sequence[float]) -> bool:
    """Whether some completion holds a score of its own above another's: a top-k list exists that orders no tie.

    ``ties="leave_out"`` ranks exactly the rows where it is True; ``rank_completions`` writes no
    row where it is False (all scores equal, or only tied scores above the lowest).
    """
    counts: dict[float, int] = {}
    for s in scores:
        counts[s] = counts.get(s, 0) + 1
    return any(n == 1 and s > min(counts) for s, n in counts.items())


# The columns that hold one entry per completion (rank_completions' rows and the online trainer's).
PER_COMPLETION_COLUMNS = ("completions", "completion_ids", "truncated", "scores", "samples")


def best_and_worst(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """``row`` cut to its best and its worst completion among those whose score no other completion shares.

    What a pairwise loss (DPO on the best and the worst) reads of a scored row with ties: the
    best untied completion is the first pick of the ``ties="leave_out"`` list; the worst untied one
    is the lowest completion that no tie leaves ambiguous; choosing among tied completions would
    order them by position. ``None`` when fewer than two scores stand alone (``[2, 2, 1, 1]``).
    The other columns are kept; those of :data:`PER_COMPLETION_COLUMNS` are cut to the pair.
    """
    scores = [float(s) for s in row["scores"]]
    untied = sorted((j for j, s in enumerate(scores) if scores.count(s) == 1), key=lambda j: -scores[j])
    if len(untied) < 2:
        return None
    keep = (untied[0], untied[-1])
    cut = {k: [row[k][j] for j in keep] for k in PER_COMPLETION_COLUMNS if row.get(k) is not None}
    return {**row, **cut}


def _row_ranks(row: Mapping[str, Any], k: int | None, ties: str, where: str) -> list[int]:
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive int or None, got {k!r}")
    completions = row.get("completions")
    if not isinstance(completions, Sequence) or isinstance(completions, str) or len(completions) < 2:
        got = (
            len(completions) if isinstance(completions, Sequence) and not isinstance(completions, str) else completions
        )
        raise ValueError(f"{where}: 'completions' must be a list of at least 2 completions, got {got!r}")
    n = len(completions)
    scores, ranking = row.get("scores"), row.get("ranking")
    if (scores is None) == (ranking is None):
        raise ValueError(f"{where}: give exactly one of 'scores' and 'ranking'")
    kk = n if k is None else min(k, n)
    ranks = [UNRANKED] * n
    if ranking is not None:
        given = _feedback_list(ranking, "ranking", "completion indices", where)
        ranking = [_index(i) for i in given]
        bad = not ranking or any(i is None or not 0 <= i < n for i in ranking)
        if bad or len(set(ranking)) != len(ranking):
            raise ValueError(
                f"{where}: 'ranking' must list distinct completion indices in [0, {n}), best first, got {given}"
            )
        order = ranking[:kk]
    else:
        scores = [_score(s, j, where) for j, s in enumerate(_feedback_list(scores, "scores", "numbers", where))]
        if len(scores) != n:
            raise ValueError(f"{where}: {len(scores)} scores for {n} completions")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"{where}: scores must be finite, got {scores}")
        # Sort by score only; position never decides an order that is kept (ties below are checked).
        order = sorted(range(n), key=lambda j: -scores[j])
        if ties == "leave_out":
            if not has_ranking(scores):
                raise ValueError(
                    f"{where}: no completion holds a score of its own above another's (scores {scores}), so no "
                    "top-k list exists that orders no tie; rank_completions writes no such row: filter it out"
                )
            first = next(i for i, j in enumerate(order) if scores.count(scores[j]) == 1)
            for j in order[:first]:  # the tied groups above the first untied completion
                ranks[j] = IGNORE
            order = order[first:]
            kk = min(kk, len(order))
        tied = [i for i in range(min(kk, len(order) - 1)) if scores[order[i]] == scores[order[i + 1]]]
        if tied:
            i = tied[0]
            if ties == "error":
                group = [j for j in range(n) if scores[j] == scores[order[i]]]
                raise ValueError(
                    f"{where}: completions {group} tie at score {scores[order[i]]} and the tie decides the "
                    f"top-{kk} list; pass ties='leave_out' or 'prefix' to keep only the strictly ordered part"
                )
            if i == 0:
                group = [j for j in range(n) if scores[j] == scores[order[0]]]
                raise ValueError(
                    f"{where}: the best score {scores[order[0]]} is shared by completions {group}, so "
                    "ties='prefix' leaves nothing to rank; use ties='leave_out', or filter such rows out"
                )
            kk = i
        order = order[:kk]
    for position, j in enumerate(order):
        ranks[j] = position
    return ranks


def _feedback_list(value: Any, field: str, what: str, where: str) -> list:
    """``value`` as a list: a list, tuple, numpy array or tensor of one dimension, not a scalar or a string."""
    if isinstance(value, (str, bytes, Mapping)) or getattr(value, "ndim", 1) != 1 or not isinstance(value, Iterable):
        raise ValueError(f"{where}: '{field}' must be a list of {what}, got {type(value).__name__} {value!r}")
    return list(value)


def _index(i: Any) -> int | None:
    """An integer-like index (int, numpy integer, integer 0-d tensor) as an int; None for anything else, bools too."""
    if isinstance(i, bool) or str(getattr(i, "dtype", "")).endswith("bool"):
        return None
    try:
        return operator.index(i)
    except TypeError:
        return None


def _score(s: Any, j: int, where: str) -> float:
    if isinstance(s, (str, bytes)) or s is None:
        raise ValueError(f"{where}: 'scores'[{j}] = {s!r} is not a number")
    try:
        return float(s)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'scores'[{j}] = {s!r} is not a number") from None


def is_conversational(x: Any) -> bool:
    """Whether ``x`` is a list of chat messages (mappings with ``role`` and ``content``), not text."""
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(m, Mapping) for m in x)


def encode_prompt(tokenizer, prompt: Any, where: str = "prompt") -> tuple[str, list[int]]:
    """The text a model continues for ``prompt``, and its token ids: the one encoding of a prompt.

    A plain-text prompt is continued as it is, tokenized with the tokenizer's special tokens
    (BOS); chat messages go through the chat template with the generation prompt and are
    tokenized without added special tokens (the template writes them). The sampler of
    :mod:`rcpo_losses.training.generate` feeds these ids to the model, and the collator puts
    them before each completion (and checks a row's stored ``prompt_ids`` against them).

    Raises ``ValueError`` naming ``where`` for an empty prompt (``""``, no messages, no token),
    chat messages without a chat template, a chat template that refuses them (its own
    ``raise_exception``), and a prompt that is neither text nor messages.
    """
    if isinstance(prompt, str):
        text, special = prompt, True
    elif is_conversational(prompt):
        if not prompt:
            raise ValueError(f"{where}: has no messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{where}: is a list of chat messages, but the tokenizer has no chat template "
                "(set tokenizer.chat_template, or give plain-text prompts)"
            )
        try:
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template's raise_exception (roles that do not alternate, ...) or a bad message
            raise ValueError(f"{where}: the tokenizer's chat template refuses it: {e}") from e
        special = False
    else:
        raise ValueError(f"{where}: the prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if not text:
        raise ValueError(f"{where}: the prompt is empty")
    ids = [int(t) for t in tokenizer(text, add_special_tokens=special)["input_ids"]]
    if not ids:
        raise ValueError(f"{where}: the prompt is empty after tokenization")
    return text, ids


def completion_text(completion: Any) -> str | None:
    """A completion's text: the string, or the content of a single assistant message; None for anything else."""
    if isinstance(completion, str):
        return completion
    if is_conversational(completion) and len(completion) == 1 and isinstance(completion[0].get("content"), str):
        return completion[0]["content"]
    return None


class RankedPreferenceCollator:
    """Tokenize rows of a prompt and its ranked completions into ``[B, S, L]`` tensors.

    Args:
        tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=...)``,
            ``pad_token_id``, ``eos_token_id``, and ``apply_chat_template`` for conversational rows).
        max_length: most tokens of prompt plus completion; longer completions are cut at
            the end (their start is kept). A prompt that leaves no room for one completion
            token raises ``ValueError``: the prompt is never cut silently.
        max_prompt_length: cut prompts longer than this to their last ``max_prompt_length``
            tokens (the end, next to the completion), as TRL does; only when asked.
        k: longest top-k list kept (``None``: all that the feedback orders).
        ties: what to do about tied scores, see :func:`row_ranks`: ``"leave_out"`` (default),
            ``"prefix"`` or ``"error"``.
        layout: ``"padded"`` (default): the ``[B, S, L]`` tensors below. ``"prefix_shared"``:
            all rows packed into one sequence, each prompt once followed by its completions,
            no padding (:func:`rcpo_losses.training.packing.pack_prefix_shared`): ``ranks`` and the keys
            listed there; :func:`rcpo_losses.response_stats` reads either layout.

    Rows: ``{"prompt", "completions", "scores" | "ranking"}``. A plain-text prompt is
    tokenized with the tokenizer's special tokens (BOS), each completion without them,
    followed by EOS. A conversational prompt (a list of ``{"role", "content"}`` messages)
    goes through the chat template with the generation prompt; each completion (a list of
    assistant messages, or a string: one assistant message) is the rest of the template
    applied to prompt plus completion. Rows may have different numbers of completions.
    ``truncated[j]`` True (a completion cut at a length cap) gives completion ``j`` no end
    token: a plain one gets no EOS, a chat one only its content's tokens.

    Sampled rows (:func:`rcpo_losses.training.generate.rank_completions`) carry
    ``completion_ids`` (each completion's token ids as sampled, its end token included when
    the model produced one) and ``prompt_ids``: the completion tokens are exactly those ids,
    after the prompt's :func:`encode_prompt` ids, never re-tokenized and never given an end
    token. Ids that the tokenizer cannot have produced for this row raise ``ValueError``
    naming the row and the completion: ``prompt_ids`` that are not the prompt's encoding
    (another tokenizer or chat template, an edited prompt), an id outside ``[0,
    len(tokenizer))``, an empty list, or a completion text that is not what its ids decode to
    (``tokenizer.decode(ids, skip_special_tokens=True)``, as the sampler decodes: an edited
    completion, another tokenizer).

    Returns a dict of:
        - ``input_ids``: int64 ``(B, S, L)``, right-padded with ``pad_token_id`` (EOS, else 0).
        - ``attention_mask``: int64 ``(B, S, L)``.
        - ``completion_mask``: bool ``(B, S, L)``, True on completion tokens.
        - ``ranks``: int64 ``(B, S)``: ``0..k_b-1``, ``UNRANKED``, and ``IGNORE`` for the slots
          past a row's completions. Those slots hold the prompt alone (attended, so a model can
          run on them) with an empty completion mask. A completion that ``ties="leave_out"``
          takes out of the assortment is ``IGNORE`` too, its tokens in place.
        - ``token_hash``: int64 ``(B,)``, each row's :func:`token_hash` (its prompt and completion
          token ids as collated); ``precompute_reference_stats`` stores it as ``ref_token_hash``.
        - ``ref_logps``, ``ref_entropy_sums``: fp32 ``(B, S)`` (fp64 for an fp64 model's values),
          ``ref_lengths``: int64 ``(B, S)``, only when the rows carry them
          (:func:`rcpo_losses.training.precompute.precompute_reference_stats`); 0 in the padding slots, as
          the model statistics there. A row whose tokens differ from those the statistics were
          computed on (its ``ref_token_hash``, ``ref_lengths``) raises ``ValueError`` naming it:
          the statistics are stale.

    Errors name the row: ``row 9 (prompt '...')`` with its dataset index when the caller passes
    ``indices`` (``precompute_reference_stats`` does), else its position in the batch, and
    always the start of its prompt.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        k: int | None = None,
        ties: str = "leave_out",
        layout: str = "padded",
    ):
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length), ("k", k)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length: must leave room for a prompt and a completion token, got {max_length}")
        if ties not in TIES:
            raise ValueError(f"ties: expected one of {TIES}, got {ties!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.k = k
        self.ties = ties

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={type(self.tokenizer).__name__}, max_length={self.max_length}, "
            f"max_prompt_length={self.max_prompt_length}, k={self.k}, ties={self.ties!r}, "
            f"layout={self.layout!r})"
        )

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _tokenize_row(self, row: Mapping[str, Any], where: str) -> tuple[list[int], list[list[int]]]:
        """Token ids of the prompt and of each completion (untruncated)."""
        prompt, completions = row.get("prompt"), row["completions"]
        truncated = row.get("truncated")
        if truncated is not None and (isinstance(truncated, (str, Mapping)) or len(truncated) != len(completions)):
            raise ValueError(f"{where}: 'truncated' must be a list of one flag per completion, got {truncated!r}")
        cut = [bool(t) for t in truncated] if truncated is not None else [False] * len(completions)
        if row.get("completion_ids") is not None:
            return self._sampled_ids(row, where)
        if row.get("prompt_ids") is not None:
            raise ValueError(f"{where}: has 'prompt_ids' but no 'completion_ids'; give both, or neither")
        if is_conversational(prompt):
            prompt_text, prompt_ids = encode_prompt(self.tokenizer, prompt, where)
            template = self.tokenizer.apply_chat_template
            outs = []
            for j, completion in enumerate(completions):
                messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
                if not is_conversational(messages):
                    raise ValueError(f"{where}: completion {j} must be a string or a list of messages")
                full = template(list(prompt) + list(messages), tokenize=False)
                if not full.startswith(prompt_text):
                    raise ValueError(
                        f"{where}: the chat template of prompt + completion {j} does not start with the "
                        "template of the prompt alone, so the completion tokens cannot be told apart"
                    )
                rest = full[len(prompt_text) :]
                if cut[j]:  # the model wrote the content alone: no end-of-turn token after it
                    content = completion_text(messages)
                    if content is None or not rest.startswith(content):
                        raise ValueError(
                            f"{where}: completion {j} is truncated, but the chat template does not write its "
                            "content first, so its end token cannot be left off; store its completion_ids"
                        )
                    rest = content
                outs.append(self._ids(rest, False))
            return prompt_ids, outs
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        outs = []
        for j, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise ValueError(f"{where}: completion {j} must be a string for a plain-text prompt")
            outs.append(self._ids(completion, False) + ([] if cut[j] else eos))
        return self._ids(prompt, True), outs

    def _sampled_ids(self, row: Mapping[str, Any], where: str) -> tuple[list[int], list[list[int]]]:
        """A sampled row's prompt ids and ``completion_ids``, checked against the tokenizer (see the class)."""
        completions, stored = row["completions"], row["completion_ids"]
        if isinstance(stored, (str, Mapping)) or not isinstance(stored, Iterable):
            raise ValueError(f"{where}: 'completion_ids' must be a list of token-id lists, got {type(stored).__name__}")
        stored = list(stored)
        if len(stored) != len(completions):
            raise ValueError(f"{where}: {len(stored)} completion_ids for {len(completions)} completions")
        _, prompt_ids = encode_prompt(self.tokenizer, row.get("prompt"), where)
        given = row.get("prompt_ids")
        if given is not None:
            given = [_index(t) for t in given]
            if given != prompt_ids:
                at = next((t for t, (a, b) in enumerate(zip(given, prompt_ids, strict=False)) if a != b),
                          min(len(given), len(prompt_ids)))  # fmt: skip
                raise ValueError(
                    f"{where}: 'prompt_ids' ({len(given)} tokens) are not the tokenizer's encoding of the prompt "
                    f"({len(prompt_ids)} tokens; they differ from token {at} on): sampled with another tokenizer "
                    "or chat template, or the prompt was edited"
                )
        vocab = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        decode = getattr(self.tokenizer, "decode", None)
        outs = []
        for j, ids in enumerate(stored):
            ids = None if isinstance(ids, (str, Mapping)) or not isinstance(ids, Iterable) else [_index(t) for t in ids]
            if not ids or any(t is None or t < 0 or (vocab is not None and t >= vocab) for t in ids):
                raise ValueError(
                    f"{where}: completion_ids[{j}] must be a nonempty list of token ids in [0, {vocab}), "
                    f"got {stored[j]!r}"
                )
            text = completion_text(completions[j])
            if text is not None and decode is not None:
                found = decode(ids, skip_special_tokens=True)
                if found != text:
                    raise ValueError(
                        f"{where}: completion {j} is {text[:40]!r}, but its completion_ids decode to {found[:40]!r}: "
                        "the row was edited, or sampled with another tokenizer"
                    )
            outs.append(ids)
        return prompt_ids, outs

    def __call__(self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Collate ``rows``; ``indices[b]``, the dataset index of ``rows[b]`` where known, names it in errors."""
        if not rows:
            raise ValueError("rows: empty batch")
        if indices is not None and len(indices) != len(rows):
            raise ValueError(f"indices: {len(indices)} indices for {len(rows)} rows")
        ranks, sequences, wheres = [], [], []  # sequences[b] = (prompt ids, [completion ids])
        for b, row in enumerate(rows):
            where = _where(row, None if indices is None else indices[b], b)
            wheres.append(where)
            ranks.append(_row_ranks(row, self.k, self.ties, where))
            prompt, completions = self._tokenize_row(row, where)
            if self.max_prompt_length is not None:
                prompt = prompt[-self.max_prompt_length :]
            if self.max_length is not None:
                if len(prompt) >= self.max_length:
                    raise ValueError(
                        f"{where}: the prompt has {len(prompt)} tokens, max_length = {self.max_length} leaves no "
                        "room for a completion; raise max_length or set max_prompt_length"
                    )
                completions = [c[: self.max_length - len(prompt)] for c in completions]
            if not prompt:
                raise ValueError(f"{where}: the prompt is empty after tokenization")
            if not all(completions):
                j = [len(c) for c in completions].index(0)
                raise ValueError(f"{where}: completion {j} is empty after tokenization")
            sequences.append((prompt, completions))
        B, S = len(rows), max(len(r) for r in ranks)
        hashes = torch.tensor([token_hash(p, cs) for p, cs in sequences], dtype=torch.int64)
        refs = {"token_hash": hashes, **reference_columns(rows, sequences, hashes, S, wheres, ranks)}
        if self.layout == "prefix_shared":
            return self._prefix_shared(sequences, ranks, S, refs)
        L = max(len(p) + len(c) for p, cs in sequences for c in cs)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        input_ids = torch.full((B, S, L), 0 if pad is None else pad, dtype=torch.int64)
        attention_mask = torch.zeros(B, S, L, dtype=torch.int64)
        completion_mask = torch.zeros(B, S, L, dtype=torch.bool)
        out_ranks = torch.full((B, S), IGNORE, dtype=torch.int64)
        for b, (prompt, completions) in enumerate(sequences):
            out_ranks[b, : len(ranks[b])] = torch.tensor(ranks[b])
            P = len(prompt)
            for j in range(S):
                c = completions[j] if j < len(completions) else []
                input_ids[b, j, : P + len(c)] = torch.tensor(prompt + c, dtype=torch.int64)
                attention_mask[b, j, : P + len(c)] = 1
                completion_mask[b, j, P : P + len(c)] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "ranks": out_ranks,
            **refs,
        }

    def _prefix_shared(self, sequences: list, ranks: list[list[int]], S: int, refs: dict) -> dict[str, Tensor]:
        out_ranks = torch.full((len(ranks), S), IGNORE, dtype=torch.int64)
        for b, r in enumerate(ranks):
            out_ranks[b, : len(r)] = torch.tensor(r)
        prompts, completions = zip(*sequences, strict=True)
        return {
            "ranks": out_ranks,
            **pack_prefix_shared(prompts, completions, S),
            **refs,
        }  # ranks first: the batch size


def reference_columns(
    rows: Sequence[Mapping[str, Any]],
    sequences: list,
    hashes: Tensor,
    S: int,
    wheres: Sequence[str],
    ranks: Sequence[Sequence[int]] | None = None,
) -> dict[str, Tensor]:
    """The rows' precomputed ``ref_*`` columns as ``(B, S)`` tensors (0 in padding slots); ``{}`` if none has them.

    ``sequences[b]`` are the prompt and completion token ids of row ``b`` as collated now,
    ``hashes[b]`` their :func:`token_hash`. Statistics computed on other tokens (another
    completion count or tokenization, an edited prompt, another ``max_length`` or
    ``max_prompt_length``: the row's ``ref_token_hash`` differs) raise ``ValueError`` naming the
    row (``wheres[b]``), so stale numbers are never paired with new text. A completion that
    ``ranks[b]`` leaves out of the assortment (``IGNORE``, ``ties="leave_out"``) has statistics
    0 and length 0, as :func:`rcpo_losses.response_stats` gives it. ``ref_logps`` and
    ``ref_entropy_sums`` are fp32, or fp64 when a stored value is not an fp32 number (an fp64
    model's statistics): never rounded.
    """
    has = [any(name in row for name in PRECOMPUTED_COLUMNS) for row in rows]
    if not any(has):
        return {}
    out = {name: torch.zeros(len(rows), S, dtype=torch.float64) for name in REF_COLUMNS[:2]}
    out["ref_lengths"] = torch.zeros(len(rows), S, dtype=torch.int64)
    for b, row in enumerate(rows):
        missing = [name for name in PRECOMPUTED_COLUMNS if row.get(name) is None]
        if missing == [REF_TOKEN_HASH]:
            raise ValueError(
                f"{wheres[b]}: has precomputed reference statistics but no {REF_TOKEN_HASH}, the fingerprint of the "
                "tokens they were computed on (precomputed by an older rcpo_losses?); rerun precompute_reference_stats"
            )
        if missing:
            raise ValueError(
                f"{wheres[b]}: has no {missing} while rows of the batch carry precomputed reference statistics; "
                "precompute them for every row (rcpo_losses.precompute_reference_stats)"
            )
        lengths = [len(c) for c in sequences[b][1]]
        if ranks is not None:
            lengths = [0 if r == IGNORE else n for n, r in zip(lengths, ranks[b], strict=True)]
        n = len(lengths)
        stored = [list(row[name]) for name in REF_COLUMNS]
        if any(len(values) != n for values in stored) or [int(x) for x in stored[2]] != lengths:
            raise ValueError(
                f"{wheres[b]}: the precomputed reference statistics are stale: ref_lengths = {stored[2]} but its "
                f"{n} completions tokenize to lengths {lengths} now; rerun precompute_reference_stats"
            )
        if int(row[REF_TOKEN_HASH]) != int(hashes[b]):
            raise ValueError(
                f"{wheres[b]}: the precomputed reference statistics were computed on other tokens than the row "
                "collates to now (its prompt or completions changed, or max_prompt_length, max_length, the "
                "tokenizer or the chat template differ); rerun precompute_reference_stats with this collator"
            )
        for name, values in zip(REF_COLUMNS, stored, strict=True):
            out[name][b, :n] = torch.tensor(values, dtype=out[name].dtype)
    for name in REF_COLUMNS[:2]:  # an fp32 (or bf16) model's statistics are fp32 numbers: exact in fp32
        if torch.equal(out[name].float().double(), out[name]):
            out[name] = out[name].float()
    return out
