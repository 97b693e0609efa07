"""From a causal LM and a ranked batch to per-response statistics: ``response_stats(model, batch)``.

One call for a training loop of any framework: the model runs through its own forward (so
DDP's and FSDP's hooks run), and the LM head, fused or not, runs only on the hidden rows
that predict a completion token. The batch is either layout of
:class:`rcpo_losses.data.RankedPreferenceCollator`: ``"padded"`` (``[B, S, L]``) or
``"prefix_shared"`` (one packed sequence, :mod:`rcpo_losses.packing`).

The prefix-shared layout needs attention that takes a custom mask: the model gets a 4D
mask (``sdpa``: bool, ``eager``: additive) or a FlexAttention ``BlockMask``
(``flex_attention``), with each family's sliding windows encoded in it. Other attention
implementations (``flash_attention_2`` ignores custom masks) and untested families raise
(:func:`prefix_shared_support`). Duck-typed: nothing here imports ``transformers``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .fused_linear import fused_linear_token_stats
from .lm_head import final_hidden_states, lm_head_spec, unwrap_model
from .packing import dense_attention_mask, flex_block_mask, is_prefix_shared
from .ranks import IGNORE
from .tokens import ResponseTokenStats, token_logps_and_entropy

# How each tested family takes a custom mask: "one" 4D mask for every layer (its sliding window,
# if any, applies to all layers), or a dict {layer type: mask} (per-layer full / sliding attention).
# Hugging Face returns a 4D mask as-is, skipping the sliding window it would add, so the window
# must be in the mask: checked against the padded layout with sequences longer than the window.
PREFIX_SHARED_FAMILIES = {"llama": "one", "mistral": "one", "qwen2": "by_layer_type", "gemma2": "by_layer_type"}
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
LAYER_TYPES = ("full_attention", "sliding_attention")


def _config(model: nn.Module):
    config = unwrap_model(model).config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def prefix_shared_support(model: nn.Module) -> str | None:
    """Why ``model`` cannot run the prefix-shared layout exactly, or None when it can.

    Supported: the families of ``PREFIX_SHARED_FAMILIES`` (Llama, Mistral, Qwen2, Gemma-2;
    ``config.model_type``) with ``config._attn_implementation`` in ``MASKED_ATTENTION``
    (``sdpa``, ``eager``, ``flex_attention``). ``flash_attention_2`` and the other kernels
    take no custom mask (they would attend across completions); other families are untested.
    """
    config = _config(model)
    family = getattr(config, "model_type", None)
    supported = ", ".join(PREFIX_SHARED_FAMILIES)
    if family not in PREFIX_SHARED_FAMILIES:
        return f"model family {family!r} is not one the prefix-shared layout is tested on ({supported})"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return (
            f"{family} with attention implementation {impl!r} takes no custom attention mask "
            f"(supported: {', '.join(MASKED_ATTENTION)})"
        )
    layer_types = getattr(config, "layer_types", None) or []
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        return f"{family} has layer types {unknown} that the prefix-shared mask does not encode"
    if PREFIX_SHARED_FAMILIES[family] == "one" and len(set(layer_types)) > 1:
        return f"{family} has mixed layer types {sorted(set(layer_types))} but takes one mask for all layers"
    return None


def check_prefix_shared(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the family and the supported ones when ``model`` cannot take the layout."""
    reason = prefix_shared_support(model)
    if reason is not None:
        raise ValueError(f"model: {reason}; collate with layout='padded' instead")


def prefix_shared_attention_mask(model: nn.Module, batch) -> Tensor | dict:
    """What ``model`` receives as ``attention_mask`` for a packed batch.

    ``sdpa``: a bool ``(1, 1, P, P)`` mask; ``eager``: the additive one in the model's dtype;
    ``flex_attention``: a ``BlockMask``. Families with per-layer attention types (Qwen2,
    Gemma-2) get ``{layer type: mask}``, the sliding layers' mask with ``config.sliding_window``.
    """
    check_prefix_shared(model)
    config = _config(model)
    impl = config._attn_implementation
    dtype = getattr(unwrap_model(model), "dtype", torch.float32)
    window = getattr(config, "sliding_window", None)
    built: dict[int | None, object] = {}

    def build(w: int | None):
        if w not in built:
            if impl == "flex_attention":
                built[w] = flex_block_mask(batch, sliding_window=w)
            else:
                built[w] = dense_attention_mask(batch, sliding_window=w, dtype=None if impl == "sdpa" else dtype)
        return built[w]

    if PREFIX_SHARED_FAMILIES[config.model_type] == "one":
        return build(window)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return {t: build(window if t == "sliding_attention" else None) for t in sorted(types)}


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
        batch: from :class:`~rcpo_losses.data.RankedPreferenceCollator`, either layout
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
        inputs = {"position_ids": batch["position_ids"], "attention_mask": prefix_shared_attention_mask(model, batch)}
        index, targets, response = batch["target_index"], batch["target_ids"], batch["target_response"]
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
