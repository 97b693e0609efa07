"""From a causal LM and a ranked batch to per-response statistics: ``response_stats(model, batch)``.

One call for a training loop of any framework: the model runs through its own forward (so
DDP's and FSDP's hooks run), and the LM head, fused or not, runs only on the hidden rows
that predict a completion token. The batch is either layout of
:class:`rcpo_losses.training.data.RankedPreferenceCollator`: ``"padded"`` (``[B, S, L]``) or
``"prefix_shared"`` (one packed sequence, :mod:`rcpo_losses.training.packing`).

The prefix-shared layout needs attention that takes a custom mask: the model gets a 4D
mask (``sdpa``: bool, ``eager``: additive) or a FlexAttention ``BlockMask``
(``flex_attention``), one per attention layer type of its config, with the layer type's
sliding window or chunk encoded in it (:func:`prefix_shared_attention_mask`). No family is
named: the first time a model (class, config, attention implementation) meets the layout,
a small probe batch runs both ways and must agree (:func:`check_prefix_shared`). Families
whose attention the mask cannot describe are refused by name (:func:`prefix_shared_support`).
Duck-typed: nothing here imports ``transformers``.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.backend import segment_attention
from ..ranks import IGNORE
from ..tokens.fused_linear import fused_linear_token_stats
from ..tokens.lm_head import check_tolerance, config_key, eval_mode, final_hidden_states, lm_head_spec, unwrap_model
from ..tokens.stats import ResponseTokenStats, token_logps_and_entropy
from .packing import dense_attention_mask, flex_block_mask, is_prefix_shared, pack_prefix_shared
from .segment_attention import KWARG, empty_mask, segments
from .segment_attention import register as register_segment_attention

# Attention implementations that apply the attention_mask they are given. Others (flash_attention_2 / 3,
# hub kernels) ignore a custom mask and would attend across completions: RCPOTrainer switches them to
# mask_attention_implementation() around its steps.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
# What limits a query's keys, besides causality, in each attention layer type of config.layer_types:
# the config field holding the sliding window or chunk (Hugging Face's masking_utils reads the same).
LAYER_TYPES = {
    "full_attention": None,
    "sliding_attention": "sliding_window",
    "chunked_attention": "attention_chunk_size",
}
# Layer types whose state runs along the whole sequence (no mask can keep completions apart).
RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding")

# Config fields that keep an sdpa model on the dense mask instead of the segment attention
# (rcpo_losses.training.segment_attention), which sdpa's arguments cannot express: {field: why} (set and not None).
DENSE_ONLY = {"attn_logit_softcapping": "soft-capped attention logits", "sinks": "attention sinks (s_aux)"}

# The first-seen check of the prefix-shared layout against the padded one: on by default (prefix_shared_problem).
VERIFY = True


@dataclass(frozen=True)
class _Verdict:
    """A probe that agreed: with the segment attention or the dense mask, up to these lengths."""

    segments: bool  # the segment attention agreed (else the dense mask did, after the segments did not)
    tokens: int  # the probe's packed length
    length: int  # its longest sequence (prompt and completion)


# Per model instance (weights matter: a difference can hide under small weights), then per
# (config fields with the attention implementation, parameter dtypes, device type, segment attention on).
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Verdict]] = weakref.WeakKeyDictionary()

# Config fields (at any depth: sub-configs, rope_parameters) whose integer values are lengths where a model
# can change behaviour: sliding windows of any name, chunks, the positions a RoPE scaling switches at
# (longrope's original_max_position_embeddings, dynamic NTK's max_position_embeddings), Llama-4's
# floor_scale, block sizes, context lengths. A false match only makes the probe longer.
LENGTH_FIELD = re.compile(r"window|chunk|position|ctx|context|seq|length|span|local|floor|block", re.IGNORECASE)


def _config(model: nn.Module):
    config = unwrap_model(model).config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _family(model: nn.Module) -> str:
    inner = unwrap_model(model)
    return f"{type(inner).__name__} ({getattr(_config(inner), 'model_type', None)!r})"


def layer_masks(config) -> dict[str | None, tuple[int | None, int | None]]:
    """``{layer type: (sliding window, chunk)}`` of the masks a config's attention layers need.

    One entry per type in ``config.layer_types`` (``full_attention``: ``(None, None)``;
    ``sliding_attention``: ``(config.sliding_window, None)``; ``chunked_attention``:
    ``(None, config.attention_chunk_size)``); a config without ``layer_types`` has one
    layer type ``None`` with ``config.sliding_window`` and ``config.attention_chunk_size``
    when set. ``ValueError`` for a layer type this module does not know.
    """
    types = getattr(config, "layer_types", None)
    if not types:
        return {None: (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))}
    out = {}
    for t in sorted(set(types)):
        if t not in LAYER_TYPES:
            raise ValueError(f"layer type {t!r} is not one the prefix-shared mask encodes ({', '.join(LAYER_TYPES)})")
        field = LAYER_TYPES[t]
        value = None if field is None else getattr(config, field, None)
        if field is not None and value is None:
            raise ValueError(f"layer type {t!r} but config.{field} is None")
        out[t] = (value, None) if field == "sliding_window" else (None, value)
    return out


def prefix_shared_support(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the prefix-shared layout, or None when nothing rules it out before the probe.

    Refused by name: encoder-decoders; multimodal wrappers (a config with a separate text
    config: load the language model alone); ALiBi (Bloom, MPT, Falcon with ``alibi``: the bias
    follows the distance in the packed sequence); a forward without ``position_ids`` (learned or
    rotary positions would count from the start of the packed sequence); layer types whose state
    runs along the sequence (``linear_attention``, ``conv``, mamba) or that :func:`layer_masks`
    does not know; an attention implementation outside ``MASKED_ATTENTION``
    (``flash_attention_2`` ignores a custom mask; RCPOTrainer switches it,
    :func:`mask_attention_implementation`). A family that passes runs the first-seen probe of
    :func:`prefix_shared_problem`.
    """
    inner = unwrap_model(model)
    outer, config = inner.config, _config(inner)
    family = _family(inner)
    if getattr(outer, "is_encoder_decoder", False):
        return f"{family} is an encoder-decoder: its decoder attends to the encoder, not to a packed prompt"
    if config is not outer:
        return (
            f"{family} is a multimodal wrapper (its text model has its own config): its forward builds masks "
            "for image tokens the packed layout does not know; load the language model alone"
        )
    alibi = getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False)
    if alibi or getattr(config, "model_type", None) == "bloom":
        return f"{family} uses ALiBi: its attention bias follows the distance in the packed sequence, not the positions"
    # the class's forward: accelerate replaces the instance's with an autocast wrapper (*args, **kwargs); a
    # PEFT wrapper takes them in **kwargs and hands them to its base model
    base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner
    if "position_ids" not in inspect.signature(type(base).forward).parameters:
        return (
            f"{family}'s forward takes no position_ids: its positions would count from the start of the packed "
            "sequence instead of restarting at each completion"
        )
    types = set(getattr(config, "layer_types", None) or [])
    recurrent = sorted(types & set(RECURRENT_LAYER_TYPES))
    if recurrent:
        return f"{family} has layer types {recurrent} whose state runs along the sequence, across completions"
    try:
        layer_masks(config)
    except ValueError as e:
        return f"{family}: {e}"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return (
            f"{family} with attention implementation {impl!r} takes no custom attention mask "
            f"(supported: {', '.join(MASKED_ATTENTION)})"
        )
    return None


def mask_attention_implementation(model: nn.Module) -> str | None:
    """The implementation to run ``model``'s prefix-shared steps with, or None when its own takes the mask.

    ``flex_attention`` on CUDA (its ``BlockMask`` skips the masked blocks), ``sdpa`` elsewhere,
    ``eager`` for a model that supports neither.
    """
    inner = unwrap_model(model)
    if _config(inner)._attn_implementation in MASKED_ATTENTION:
        return None
    cuda = next(inner.parameters()).is_cuda
    if cuda and getattr(inner, "_supports_flex_attn", False):
        return "flex_attention"
    return "sdpa" if getattr(inner, "_supports_sdpa", False) else "eager"


@contextlib.contextmanager
def attention_implementation(model: nn.Module, implementation: str | None):
    """Run ``model`` with ``implementation`` (``set_attn_implementation``) inside the block, then restore its own.

    The restore writes back each config's implementation as it was (no new availability check:
    a ``flash_attention_2`` the user loaded stays as it was). ``None``: no change.
    """
    inner = unwrap_model(model)
    if implementation is None or inner.config._attn_implementation == implementation:
        yield
        return
    configs = {
        id(m.config): m.config
        for m in inner.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation_internal")
    }
    for config in list(configs.values()):
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if hasattr(sub, "_attn_implementation_internal"):
                configs[id(sub)] = sub
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    inner.set_attn_implementation(implementation)
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


def length_thresholds(config) -> dict[str, int]:
    """``{field: length}``: the integer config fields, at any depth, whose names say they are lengths.

    A name matching ``LENGTH_FIELD`` (window, chunk, position, ctx, context, seq, length, span,
    local, floor, block), in the config, its sub-configs and its dicts (``rope_parameters``,
    ``rope_scaling``) and lists, with a positive integer value (not a bool). These are where a
    model may change behaviour with the length of its input: a sliding window of any name
    (GPT-Neo's ``window_size``), a chunk, the length a RoPE scaling switches at, Llama-4's
    ``floor_scale``. The probe of :func:`prefix_shared_problem` reaches each one a batch reaches.
    """
    out: dict[str, int] = {}

    def walk(value, path: str, named: bool, depth: int) -> None:
        if depth > 4:
            return
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            if named and value > 0:
                out[path] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k!r}]", named or bool(LENGTH_FIELD.search(str(k))), depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", named, depth + 1)
        elif hasattr(value, "to_dict") and hasattr(value, "__dict__"):  # a sub-config
            for k, v in vars(value).items():
                if not k.startswith("_"):
                    walk(v, f"{path}.{k}", named or bool(LENGTH_FIELD.search(k)), depth + 1)

    walk(config, "config", False, 0)
    return out


def check_prefix_shared(model: nn.Module, batch=None, *, verify: bool | None = None) -> None:
    r"""Raise ``ValueError`` naming the family when ``model`` cannot take the prefix-shared layout exactly.

    The reason is :func:`prefix_shared_problem`'s: a refusal of :func:`prefix_shared_support`,
    or the probe's difference (for ``batch``'s lengths when given).
    """
    reason = prefix_shared_problem(model, batch, verify=verify)
    if reason is not None:
        raise ValueError(f"model: {reason}; collate with layout='padded' instead")


@torch.compiler.disable  # inside a compiled step the probe runs eagerly, with the same verdict
def prefix_shared_problem(model: nn.Module, batch=None, *, verify: bool | None = None) -> str | None:
    r"""Why ``model`` does not give the padded layout's statistics in the prefix-shared one, or None.

    First the refusals of :func:`prefix_shared_support`; then the probe, the first time a model
    instance meets the layout with a (config, attention implementation, parameter dtypes, device
    type) and again whenever ``batch`` reaches a length the earlier probes did not: one small
    ranked batch (two prompts, completions of 1 token up to one longer than every sliding window
    and chunk the config names, rows of different ``S``) runs through the model in both layouts
    in eval mode under ``no_grad``, and the final hidden states of the rows that predict
    completion tokens must agree: :math:`\max |h_{packed} - h_{padded}| \le \epsilon \max |h_{padded}|`,
    ``eps = 1e-6`` in fp64, ``2e-3`` in fp32, ``4e-2`` for bf16/fp16 or when the forward runs
    under autocast (seen inside the forward): :func:`~rcpo_losses.tokens.lm_head.check_tolerance`, that of
    :func:`~rcpo_losses.tokens.lm_head.check_lm_head_spec`. The padded side runs each sequence
    alone, and, if that differs beyond the tolerance, as one right-padded batch (a RoPE whose
    scaling follows the batch's longest sequence: dynamic NTK, longrope). A family whose attention depends on
    anything but the mask and the position ids (a bias over sequence indices, positions from
    ``arange``, a mask it builds itself) differs there.

    The segment attention (:func:`segment_attention_possible`) is probed first; a family it
    cannot serve (a forward that keeps its keyword arguments from the attention, or builds its
    own mask) runs with the dense mask instead when that agrees.

    Lengths: every threshold of :func:`length_thresholds` a batch reaches (``t <=`` its packed
    length ``P``, or its longest sequence ``L``) must have been reached by a probe: the probe's
    packed length is at least ``min(P, t + 1)`` for each such ``t`` and its longest sequence
    ``min(L, t + 1)`` (``L`` read from ``position_ids`` only when ``P`` does not settle it). So a
    batch of 432 tokens on GPT-Neo (``window_size`` 256) gets a probe of 257-token sequences,
    which GPT-Neo's own window fails. The probe then runs inside that step; on a sharded model
    (FSDP, DeepSpeed ZeRO-3) under ``torch.distributed`` the ranks first agree on the largest
    lengths (one small all-reduce per call), so that all run the same probe or none. Cost: one
    forward of each layout on about ``max(w + 30, t)`` tokens (``w`` the longest window or
    chunk), once per key and threshold reached (the padded batch, ``6 x`` the longest
    sequence, only where the sequences alone differ). ``verify=False`` (or
    ``rcpo_losses.training.model_stats.VERIFY = False``) skips the probe.
    """
    reason = prefix_shared_support(model)
    if reason is not None or not (VERIFY if verify is None else verify):
        return reason
    inner = unwrap_model(model)
    key = _fingerprint(inner)
    verdict = _VERIFIED.get(inner, {}).get(key)
    tokens, length, longest = (0, 0, 0) if batch is None else _needed_reach(inner, batch, verdict)
    if _sharded(model):  # its forward gathers parameters across ranks: every rank runs the same probe, or none
        tokens, length, longest = _largest_across_ranks(tokens, length, longest)
    if verdict is not None and tokens <= verdict.tokens and length <= verdict.length:
        return None
    if verdict is not None:
        tokens, length = max(tokens, verdict.tokens), max(length, verdict.length)
    rows = _probe_rows(_config(inner), inner.get_input_embeddings().weight.shape[0], tokens, length, longest)
    reason = None
    for use_segments in (True, False) if segment_attention_possible(inner) else (False,):
        try:
            err, scale, eps = _probe(inner, use_segments, rows=rows)
        except Exception as e:  # noqa: BLE001 (a forward that cannot take the masks at all)
            # the dense mask's reason is the one reported (the segments' comes first and gives way)
            reason = f"{_family(inner)} cannot take the prefix-shared attention mask ({type(e).__name__}: {e})"
            continue
        if err <= eps * scale:
            _VERIFIED.setdefault(inner, {})[key] = _Verdict(use_segments, *_rows_reach(*rows))
            return None
        reason = (
            f"{_family(inner)} with attention implementation {_config(inner)._attn_implementation!r} gives other "
            f"hidden states in the prefix-shared layout than in the padded one: max |difference| {err:.3g} against "
            f"max |hidden| {scale:.3g} (tolerance {eps:g} relative) on a probe batch"
            f"{_reach_note(inner, *_rows_reach(*rows))}. Its attention depends on more than the mask and the "
            "position ids (a bias over sequence indices, positions counted from the sequence start, a mask it "
            "builds itself, a window or chunk the mask does not encode)"
        )
    _VERIFIED.get(inner, {}).pop(key, None)
    return reason


def _fingerprint(inner: nn.Module) -> tuple:
    """The key of a verdict on one model instance (see ``_VERIFIED``)."""
    dtypes = tuple(sorted({str(p.dtype) for p in inner.parameters()}))
    device = next(inner.parameters()).device.type
    return config_key(inner.config, attention=True), dtypes, device, segment_attention_possible(inner)


_THRESHOLDS: dict[str, tuple[int, ...]] = {}  # config_key -> the sorted values of length_thresholds


def _thresholds(inner: nn.Module) -> tuple[int, ...]:
    config = _config(inner)
    key = config_key(config)
    if key not in _THRESHOLDS:
        _THRESHOLDS[key] = tuple(sorted(set(length_thresholds(config).values())))
    return _THRESHOLDS[key]


def _need(thresholds: tuple[int, ...], m: int) -> int:
    """The length a probe needs to reach every threshold that a length ``m`` reaches (``t <= m``): ``min(m, t + 1)``."""
    reached = [t for t in thresholds if t <= m]
    return min(m, reached[-1] + 1) if reached else 0


def _needed_reach(inner: nn.Module, batch, verdict: _Verdict | None) -> tuple[int, int, int]:
    """``(packed length, longest sequence)`` a probe needs for ``batch``, and ``batch``'s longest sequence (0: unread).

    ``position_ids`` (a device sync) is read only when the packed length alone does not settle it.
    """
    thresholds = _thresholds(inner)
    tokens = _need(thresholds, batch["input_ids"].shape[-1])
    if verdict is not None and tokens <= min(verdict.tokens, verdict.length):
        return tokens, tokens, 0  # no sequence is longer than the packed batch: nothing new
    longest = int(batch["position_ids"].max()) + 1
    return tokens, _need(thresholds, longest), longest


def _reach_note(inner: nn.Module, tokens: int, length: int) -> str:
    fields = length_thresholds(_config(inner))
    hit = [f"{k.removeprefix('config.')} = {v}" for k, v in fields.items() if v < max(tokens, length)]
    return f" of {tokens} packed tokens, sequences up to {length} (past {', '.join(hit)})" if hit else ""


def _sharded(model: nn.Module) -> bool:
    """Whether ``model``'s forward gathers parameters across ranks (FSDP, DeepSpeed ZeRO-3, DTensor parameters)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    names = {"FullyShardedDataParallel", "FSDPModule"}
    if any(names & {c.__name__ for c in type(m).__mro__} for m in model.modules()):
        return True
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in model.parameters())


def _largest_across_ranks(*values: int) -> tuple[int, ...]:
    """The largest of each value over the ranks (one small all-reduce; every rank checks every batch)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = torch.tensor(values, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return tuple(out.tolist())


def _probe_rows(config, vocab: int, tokens: int = 0, length: int = 0, filler: int = 0) -> tuple[list, list]:
    """Two prompts and their completions: one longer than every window and chunk, one of a single token.

    ``length``: the longest sequence at least this long; ``tokens``: more completions of the second
    prompt until the packed length is at least this, their sequences no longer than the longest or
    than ``filler`` (the batch's longest sequence: a length the model runs).
    """
    limits = [x for pair in layer_masks(config).values() for x in pair if x]
    longest = max(limits, default=4) + 3
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:  # a window as long as the positions never cuts anything
        longest = max(2, min(longest, max_positions - 5))
    longest = max(longest, length - 5)  # after a prompt of 5
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(min(3, vocab - 1), vocab, (n,), generator=g).tolist()

    prompts = [ids(5), ids(3)]
    completions = [[ids(6), ids(longest), ids(1), ids(4)], [ids(7), ids(2)]]
    packed = sum(map(len, prompts)) + sum(len(c) for cs in completions for c in cs)
    while packed < tokens:  # after the long sequence: packed indices far from their positions
        n = min(max(longest + 2, filler - 3), tokens - packed)
        completions[1].append(ids(n))
        packed += n
    return prompts, completions


def _rows_reach(prompts: list, completions: list) -> tuple[int, int]:
    """``(packed length, longest sequence)`` of probe rows (:func:`pack_prefix_shared` feeds whole completions)."""
    tokens = sum(map(len, prompts)) + sum(len(c) for cs in completions for c in cs)
    return tokens, max(len(p) + len(c) for p, cs in zip(prompts, completions, strict=True) for c in cs)


def _probe(inner: nn.Module, segments: bool | None = None, *, rows=None) -> tuple[float, float, float]:
    """``(max |difference|, max |hidden|, tolerance)`` of the probe's target rows: packed against padded.

    ``segments``: the segment attention (default: where :func:`segment_attention_possible`) or the dense mask.
    The padded side: each sequence alone, and where that differs beyond the tolerance, the sequences as one
    right-padded batch (as :func:`response_stats` runs the padded layout).
    """
    config = _config(inner)
    embeddings = inner.get_input_embeddings()
    device = embeddings.weight.device
    prompts, completions = rows or _probe_rows(config, embeddings.weight.shape[0])
    S = max(map(len, completions))
    packed = {k: v.to(device) for k, v in pack_prefix_shared(prompts, completions, S).items()}
    use_segments = segment_attention_possible(inner) if segments is None else segments
    sequences = [(len(p), [*p, *c]) for p, cs in zip(prompts, completions, strict=True) for c in cs]
    seen = []
    hook = embeddings.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled(device.type)))
    try:
        with torch.no_grad(), eval_mode(inner):
            got = final_hidden_states(inner, packed["input_ids"], **_packed_inputs(inner, packed, use_segments))
            got = got[0, packed["target_index"]]
            want = _padded_hidden(inner, sequences, device, padded=False)
            # Largest max|h_packed - h_alone| / max|h_alone| accepted: the tolerance of lm_head's first-seen check.
            eps = check_tolerance({want.dtype, embeddings.weight.dtype}, any(seen))
            got, want = got.double(), want.double()
            err, scale = _difference(got, want), float(want.abs().max())
            if err > eps * scale:  # a length-dependent RoPE sees the batch's longest sequence: the padded batch
                padded = _padded_hidden(inner, sequences, device, padded=True).double()
                if _difference(got, padded) < err:
                    err, scale = _difference(got, padded), float(padded.abs().max())
    finally:
        hook.remove()
    return err, scale, eps


def _difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def _padded_hidden(inner: nn.Module, sequences: list, device, padded: bool) -> Tensor:
    """The final hidden states that predict the completion tokens of ``(prompt length, ids)``, padded or each alone."""
    if not padded:
        out = []
        for n, seq in sequences:
            ids = torch.tensor([seq], device=device)
            out.append(final_hidden_states(inner, ids, torch.ones_like(ids))[0, n - 1 : len(seq) - 1])
        return torch.cat(out)
    T = max(len(seq) for _, seq in sequences)
    ids = torch.zeros(len(sequences), T, dtype=torch.int64, device=device)
    mask = torch.zeros_like(ids)
    for i, (_, seq) in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, device=device)
        mask[i, : len(seq)] = 1
    hidden = final_hidden_states(inner, ids, mask)  # as response_stats runs the padded layout
    return torch.cat([hidden[i, n - 1 : len(seq) - 1] for i, (n, seq) in enumerate(sequences)])


def prefix_shared_attention_mask(model: nn.Module, batch) -> Tensor | dict:
    """What ``model`` receives as ``attention_mask`` for a packed batch on the dense-mask path (after the check).

    ``sdpa``: a bool ``(1, 1, P, P)`` mask; ``eager``: the additive one in the model's dtype;
    ``flex_attention``: a ``BlockMask``. One mask per layer type of :func:`layer_masks` (its
    sliding window or chunk in it), as a dict ``{layer type: mask}`` when the types differ
    (Hugging Face's shared masking code hands each layer its type's mask and returns a 4D
    mask as-is), else the one mask. (Where the segment attention runs, :func:`response_stats`
    passes segments and an empty mask instead: :func:`packed_forward_inputs`.)
    """
    check_prefix_shared(model, batch)
    return _attention_mask(model, batch)


def segment_attention_possible(model: nn.Module) -> bool:
    """Whether ``model``'s prefix-shared forward may run the segment attention instead of the dense mask.

    The segment attention (:mod:`rcpo_losses.training.segment_attention`: each prompt, the completions
    against their prompt, each completion against itself; cost and memory with the attended pairs,
    not ``P^2``) serves an ``sdpa`` model where :func:`rcpo_losses.ops.backend.segment_attention`
    chooses it (the CPU) and no config field of ``DENSE_ONLY`` is set. The probe of
    :func:`prefix_shared_problem` then decides between it and the dense mask.
    """
    config, inner = _config(model), unwrap_model(model)
    if config._attn_implementation != "sdpa" or any(getattr(config, f, None) is not None for f in DENSE_ONLY):
        return False
    return segment_attention(next(inner.parameters()))


def packed_forward_inputs(model: nn.Module, batch) -> dict:
    """The keyword arguments of ``model``'s forward on a packed batch: ``position_ids`` and the attention's.

    The segment attention (:func:`segment_attention_possible`, unless the probe found it wrong for
    this model and kept the dense mask) gets the segments as the keyword argument ``rcpo_segments``
    and an empty ``attention_mask``; otherwise :func:`prefix_shared_attention_mask`'s mask (not checked here).
    """
    inner = unwrap_model(model)
    use_segments = segment_attention_possible(inner)
    if use_segments:
        verdict = _VERIFIED.get(inner, {}).get(_fingerprint(inner))
        use_segments = verdict is None or verdict.segments
    return _packed_inputs(model, batch, use_segments)


def _packed_inputs(model: nn.Module, batch, use_segments: bool) -> dict:
    inputs = {"position_ids": batch["position_ids"]}
    if not use_segments:
        return {**inputs, "attention_mask": _attention_mask(model, batch)}
    register_segment_attention()
    layout = segments(batch, layer_masks(_config(model)))
    return {**inputs, "attention_mask": empty_mask(batch["input_ids"].device), KWARG: layout}


def _attention_mask(model: nn.Module, batch) -> Tensor | dict:
    config = _config(model)
    impl = config._attn_implementation
    dtype = getattr(unwrap_model(model), "dtype", torch.float32)
    limits = layer_masks(config)
    built: dict[tuple, object] = {}
    for window, chunk in set(limits.values()):
        if impl == "flex_attention":
            built[window, chunk] = flex_block_mask(batch, sliding_window=window, chunk_size=chunk)
        else:
            built[window, chunk] = dense_attention_mask(
                batch, sliding_window=window, chunk_size=chunk, dtype=None if impl == "sdpa" else dtype
            )
    if len(built) == 1:
        return next(iter(built.values()))
    return {t: built[limit] for t, limit in limits.items()}


def _padded_inputs(batch) -> tuple[Tensor, dict, Tensor, Tensor, Tensor]:
    """``[B, S, L]``: the model inputs of the non-padding slots and their targets (flat hidden row, id, response)."""
    B, S, L = batch["input_ids"].shape
    keep = (batch["ranks"] != IGNORE).reshape(-1).nonzero()[:, 0]
    attention = batch["attention_mask"].reshape(B * S, L)[keep]
    T = int(attention.bool().any(0).nonzero().max()) + 1  # drop the padding columns no kept sequence uses
    ids = batch["input_ids"].reshape(B * S, L)[keep, :T]
    mask = batch["completion_mask"].reshape(B * S, L)[keep, :T].bool()
    r, t = mask[:, 1:].nonzero(as_tuple=True)  # position t predicts token t + 1
    return ids, {"attention_mask": attention[:, :T]}, r * T + t, ids[r, t + 1], keep[r]


def response_stats(
    model: nn.Module,
    batch,
    *,
    fused_linear: bool = True,
    entropy: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> ResponseTokenStats:
    r"""Summed completion log-probs, entropy sums and lengths ``[B, S]`` of every response of a ranked batch.

    .. math::
        \log \pi(y_{bj} \mid x_b) = \sum_t \log p(y_{bj,t} \mid x_b, y_{bj,<t}), \qquad
        \textstyle\sum_t H_{bj,t}, \qquad |y_{bj}|

    the ``policy_logps`` / ``ref_logps`` of eq. 2, and the entropy sums and lengths of
    :func:`rcpo_losses.entropy_dispersion` (appendix D). The model runs through its own
    forward (DDP / FSDP hooks run); the LM head then runs on the ``N`` hidden rows that
    predict a completion token only. Padding slots (``ranks == IGNORE``, missing
    completions) get ``logps = entropy_sums = 0`` and ``lengths = 0``.

    Args:
        model: a Hugging Face causal LM, or a DDP / FSDP / ``torch.compile`` wrapper of one.
        batch: from :class:`~rcpo_losses.training.data.RankedPreferenceCollator`, either layout
            (``"prefix_shared"`` when it has ``target_index``). Prefix-shared needs a family
            and attention implementation of :func:`prefix_shared_support`, else ``ValueError``.
        fused_linear: ``True``: :func:`~rcpo_losses.final_hidden_states`, then
            :func:`~rcpo_losses.fused_linear_token_stats` with the model's logit transform
            (:func:`~rcpo_losses.lm_head_spec`): no ``[N, V]`` logits are held. ``False``: the
            model's own logits (its head and soft-cap), prefix-shared only at the ``N`` rows
            (``logits_to_keep``), padded at every position, then
            :func:`~rcpo_losses.token_logps_and_entropy`.
        entropy: ``False`` returns zero entropy sums (the policy needs none; the fused path
            then skips the entropy work).
        chunk_size, backend: as in :func:`~rcpo_losses.fused_linear_token_stats`.

    Shape:
        - batch: ``ranks (B, S)``; outputs ``(B, S)``: ``logps`` and ``entropy_sums`` fp32
          (fp64 for an fp64 model), ``lengths`` int64.

    Example::

        batch = RankedPreferenceCollator(tokenizer, layout="prefix_shared")(rows)
        policy = response_stats(model, batch, entropy=False)
        with torch.no_grad():
            ref = response_stats(ref_model, batch)
    """
    ranks = batch["ranks"]
    B, S = ranks.shape
    if is_prefix_shared(batch):
        ids = batch["input_ids"]
        check_prefix_shared(model, batch)
        inputs = packed_forward_inputs(model, batch)
        index, targets, response = batch["target_index"], batch["target_ids"], batch["target_response"]
        if not torch.compiler.is_compiling():  # a compiled model: one graph for every packed length
            for x in (ids, inputs["position_ids"], index):
                torch._dynamo.maybe_mark_dynamic(x, x.dim() - 1)
    else:
        ids, inputs, index, targets, response = _padded_inputs(batch)
    if fused_linear:
        hidden = final_hidden_states(model, ids, **inputs)
        spec = lm_head_spec(model)  # after the forward: FSDP2 has unsharded the head
        logp, ent = fused_linear_token_stats(
            hidden.reshape(-1, hidden.shape[-1])[index],
            spec.weight,
            targets,
            spec.bias,
            chunk_size=chunk_size,
            entropy=entropy,
            backend=backend,
            softcap=spec.softcap,
            logit_scale=spec.logit_scale,
        )
    else:
        if is_prefix_shared(batch):
            logits = model(ids, use_cache=False, logits_to_keep=index, **inputs).logits[0]
        else:
            logits = model(ids, use_cache=False, **inputs).logits
            logits = logits.reshape(-1, logits.shape[-1])[index]
        logp, ent = token_logps_and_entropy(logits, targets, chunk_size=chunk_size, backend=backend)
        if not entropy:
            ent = torch.zeros_like(ent)
    sums = torch.zeros(2, B * S, dtype=logp.dtype, device=logp.device)
    sums = sums.index_add(1, response, torch.stack([logp, ent]))
    lengths = torch.bincount(response, minlength=B * S)
    # A completion whose slot the caller set to IGNORE gets 0 (and no gradient), masked here rather than
    # dropped from the targets above, which would need a device-to-host sync every step.
    kept = ranks.reshape(-1) != IGNORE
    sums, lengths = torch.where(kept, sums, 0.0), torch.where(kept, lengths, 0)
    return ResponseTokenStats(sums[0].reshape(B, S), sums[1].reshape(B, S), lengths.reshape(B, S))
