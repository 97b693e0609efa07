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

import torch
from torch import Tensor, nn

from ..ops.backend import segment_attention
from ..ranks import IGNORE
from ..tokens.fused_linear import fused_linear_token_stats
from ..tokens.lm_head import check_tolerance, config_key, eval_mode, final_hidden_states, lm_head_spec, unwrap_model
from ..tokens.stats import ResponseTokenStats, token_logps_and_entropy
from .packing import dense_attention_mask, flex_block_mask, is_prefix_shared, pack_prefix_shared
from .segment_attention import KWARG, segments
from .segment_attention import register as segment_attention_name

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
_VERIFIED: set[tuple] = set()  # (model class, config fields with the attention implementation) that agreed


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
    # the class's forward: accelerate replaces the instance's with an autocast wrapper (*args, **kwargs)
    if "position_ids" not in inspect.signature(type(inner).forward).parameters:
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


def check_prefix_shared(model: nn.Module, *, verify: bool | None = None) -> None:
    r"""Raise ``ValueError`` naming the family when ``model`` cannot take the prefix-shared layout exactly.

    The reason is :func:`prefix_shared_problem`'s: a refusal of :func:`prefix_shared_support`,
    or the first-seen probe's difference.
    """
    reason = prefix_shared_problem(model, verify=verify)
    if reason is not None:
        raise ValueError(f"model: {reason}; collate with layout='padded' instead")


def prefix_shared_problem(model: nn.Module, *, verify: bool | None = None) -> str | None:
    r"""Why ``model`` does not give the padded layout's statistics in the prefix-shared one, or None.

    First the refusals of :func:`prefix_shared_support`; then, the first time a (model class,
    config, attention implementation) is seen in the process, the probe: one small ranked batch
    (two prompts, completions of 1 token up to one longer than every sliding window and chunk
    the config names, rows of different ``S``) runs through the model in both layouts in eval
    mode under ``no_grad``, and the final hidden states of the rows that predict completion
    tokens must agree: :math:`\max |h_{packed} - h_{padded}| \le \epsilon \max |h_{padded}|`,
    ``eps = 1e-6`` in fp64, ``2e-3`` in fp32, ``4e-2`` for bf16/fp16 or when the forward runs
    under autocast (seen inside the forward): :func:`~rcpo_losses.tokens.lm_head.check_tolerance`, that of
    :func:`~rcpo_losses.tokens.lm_head.check_lm_head_spec`. A family whose attention depends on
    anything but the mask and the position ids (a bias over sequence indices, positions from
    ``arange``, a mask it builds itself) differs there. Its cost: one forward of each layout on
    about ``w + 30`` tokens each (``w`` the longest window or chunk; the
    padded one as its 6 sequences alone, no padding), once per key.
    ``verify=False`` (or ``rcpo_losses.training.model_stats.VERIFY = False``) skips the probe; so does a
    ``torch.compile`` trace.
    """
    reason = prefix_shared_support(model)
    if reason is not None or not (VERIFY if verify is None else verify) or torch.compiler.is_compiling():
        return reason
    inner = unwrap_model(model)
    impl = _config(inner)._attn_implementation
    key = (*_fingerprint(inner), segment_attention_implementation(inner))  # and the segment attention
    if key in _VERIFIED:
        return None
    try:
        err, scale, eps = _probe(inner)
    except Exception as e:  # noqa: BLE001 (a forward that cannot take the masks at all)
        return f"{_family(inner)} cannot take the prefix-shared attention mask ({type(e).__name__}: {e})"
    if not err <= eps * scale:
        return (
            f"{_family(inner)} with attention implementation {impl!r} gives other hidden states in the "
            f"prefix-shared layout than in the padded one: max |difference| {err:.3g} against max |hidden| "
            f"{scale:.3g} (tolerance {eps:g} relative) on a probe batch. Its attention depends on more than the "
            "mask and the position ids (a bias over sequence indices, positions counted from the sequence start, "
            "a mask it builds itself)"
        )
    _VERIFIED.add(key)
    return None


def _fingerprint(inner: nn.Module) -> tuple:
    """``(model class, config fields)``, the attention implementation among them: the key of a model checked."""
    return type(inner), config_key(inner.config, attention=True)


def _probe_rows(config, vocab: int) -> tuple[list, list]:
    """Two prompts and their completions: one longer than every window and chunk, one of a single token."""
    limits = [x for pair in layer_masks(config).values() for x in pair if x]
    longest = max(limits, default=4) + 3
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:  # a window as long as the positions never cuts anything
        longest = max(2, min(longest, max_positions - 5))
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(min(3, vocab - 1), vocab, (n,), generator=g).tolist()

    prompts = [ids(5), ids(3)]
    completions = [[ids(6), ids(longest), ids(1), ids(4)], [ids(7), ids(2)]]
    return prompts, completions


def _probe(inner: nn.Module) -> tuple[float, float, float]:
    """``(max |difference|, max |hidden|, tolerance)`` of the probe's target rows: packed, and each sequence alone."""
    config = _config(inner)
    embeddings = inner.get_input_embeddings()
    device = embeddings.weight.device
    prompts, completions = _probe_rows(config, embeddings.weight.shape[0])
    packed = {k: v.to(device) for k, v in pack_prefix_shared(prompts, completions, 4).items()}
    seen = []
    hook = embeddings.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled(device.type)))
    try:
        with torch.no_grad(), eval_mode(inner):
            want = []
            for prompt, outs in zip(prompts, completions, strict=True):
                for c in outs:  # the padded layout without its padding: each completion alone after its prompt
                    ids = torch.tensor([[*prompt, *c[:-1]]], device=device)
                    want.append(final_hidden_states(inner, ids, torch.ones_like(ids))[0, len(prompt) - 1 :])
            want = torch.cat(want)
            impl, inputs = packed_forward_inputs(inner, packed)
            with attention_implementation(inner, impl):
                got = final_hidden_states(inner, packed["input_ids"], **inputs)[0, packed["target_index"]]
    finally:
        hook.remove()
    # Largest max|h_packed - h_alone| / max|h_alone| accepted: the tolerance of lm_head's first-seen check.
    eps = check_tolerance({want.dtype, embeddings.weight.dtype}, any(seen))
    want, got = want.double(), got.double()
    return float((got - want).abs().max()), float(want.abs().max()), eps


def prefix_shared_attention_mask(model: nn.Module, batch) -> Tensor | dict:
    """What ``model`` receives as ``attention_mask`` for a packed batch (after :func:`check_prefix_shared`).

    ``sdpa``: a bool ``(1, 1, P, P)`` mask; ``eager``: the additive one in the model's dtype;
    ``flex_attention``: a ``BlockMask``. One mask per layer type of :func:`layer_masks` (its
    sliding window or chunk in it), as a dict ``{layer type: mask}`` when the types differ
    (Hugging Face's shared masking code hands each layer its type's mask and returns a 4D
    mask as-is), else the one mask. (Where :func:`segment_attention_implementation` applies,
    :func:`response_stats` passes segments instead: :func:`packed_forward_inputs`.)
    """
    check_prefix_shared(model)
    return _attention_mask(model, batch)


def segment_attention_implementation(model: nn.Module) -> str | None:
    """The implementation ``model``'s prefix-shared forward runs with instead of its own, or None.

    The segment attention (:mod:`rcpo_losses.training.segment_attention`: ``sdpa`` over each prompt and
    each completion with its prompt, cost and memory with the mask's nonzeros, not ``P^2``)
    for an ``sdpa`` model where :func:`rcpo_losses.ops.backend.segment_attention` chooses it
    (the CPU), no config field of ``DENSE_ONLY`` is set and no gradient checkpointing (its
    backward recomputes the layers after the forward, outside the switch); None otherwise (the
    model's own implementation with :func:`prefix_shared_attention_mask`'s mask).
    """
    config, inner = _config(model), unwrap_model(model)
    if config._attn_implementation != "sdpa" or any(getattr(config, f, None) is not None for f in DENSE_ONLY):
        return None
    if getattr(inner, "is_gradient_checkpointing", False):  # the backward's recompute runs after the switch back
        return None
    return segment_attention_name() if segment_attention(next(inner.parameters())) else None


def packed_forward_inputs(model: nn.Module, batch) -> tuple[str | None, dict]:
    """``(attention implementation or None, forward keyword arguments)`` of ``model``'s forward on a packed batch.

    The segment attention (:func:`segment_attention_implementation`) gets the segments as the
    keyword argument ``rcpo_segments`` and ``attention_mask=None``; the model's own
    implementation gets :func:`prefix_shared_attention_mask`'s mask (not checked here).
    """
    impl = segment_attention_implementation(model)
    inputs = {"position_ids": batch["position_ids"]}
    if impl is None:
        return None, {**inputs, "attention_mask": _attention_mask(model, batch)}
    return impl, {**inputs, "attention_mask": None, KWARG: segments(batch, layer_masks(_config(model)))}


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
        check_prefix_shared(model)
        impl, inputs = packed_forward_inputs(model, batch)
        index, targets, response = batch["target_index"], batch["target_ids"], batch["target_response"]
    else:
        impl, (ids, inputs, index, targets, response) = None, _padded_inputs(batch)
    if fused_linear:
        with attention_implementation(model, impl):
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
            with attention_implementation(model, impl):
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
