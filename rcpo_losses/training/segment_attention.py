"""Prefix-shared attention over segments: each completion against its own prompt and itself, nothing else.

The dense mask of :func:`rcpo_losses.training.packing.dense_attention_mask` makes ``sdpa`` compute all
``P^2`` pairs of the packed sequence and throw most away. Here the packed sequence is cut into
its segments (each prompt, each completion) and ``sdpa`` runs once per segment: a prompt's
queries against the prompt, a completion's queries against ``[its prompt; itself]``. Each
segment's small mask is the rule of :func:`rcpo_losses.training.packing.prefix_shared_mask_mod`
evaluated on the segment's indices (so windows and chunks come from the one rule), and the
rule allows no pair outside the segments (another row, a sibling completion): the result is
the dense-mask attention's, at a cost and memory of ``sum_seg m (n + m)`` pairs instead of
``P^2``.

Transformers reaches it as the attention implementation :data:`NAME` (registered with its
``AttentionInterface`` by :func:`register`); the layout travels through the model's forward
as the keyword argument :data:`KWARG` (transformers hands ``**kwargs`` down to the attention
function), and the model gets ``attention_mask=None`` (an implementation transformers has no
mask function for builds no mask).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import versions
from .packing import prefix_shared_mask_mod

NAME = "rcpo_prefix_shared"  # the attention implementation
KWARG = "rcpo_segments"  # the forward keyword argument that carries the Segments


@dataclass(frozen=True, eq=False)
class Segments:
    """The segments of a packed batch and, per attention layer type, each segment's mask.

    ``bounds[i] = (q_start, q_end, prompt_start, prompt_end)``: segment ``i``'s queries are
    positions ``[q_start, q_end)``, its keys ``[prompt_start, prompt_end)`` (empty for a prompt)
    then ``[q_start, q_end)``. ``kv_index``: every segment's key positions, one after the other
    (one ``index_select`` gathers all keys, whose backward is one ``index_add``: slicing per
    segment would cost a full-size gradient per slice). ``masks[layer type][i]``: bool
    ``(q_end - q_start, keys)``, True: attend; None where it is plain causal (``sdpa``'s ``is_causal``).
    """

    bounds: tuple[tuple[int, int, int, int], ...]
    kv_index: Tensor
    masks: dict


def segment_bounds(batch) -> tuple[tuple[int, int, int, int], ...]:
    """``(q_start, q_end, prompt_start, prompt_end)`` of each run of positions with one row and completion.

    ``ValueError`` for a completion with no prompt of its row before it.
    """
    row = batch["row_index"].reshape(-1).tolist()
    resp = batch["response_index"].reshape(-1).tolist()
    bounds, prompts, start = [], {}, 0
    for i in range(1, len(row) + 1):
        if i < len(row) and (row[i], resp[i]) == (row[start], resp[start]):
            continue
        b, j = row[start], resp[start]
        if j < 0:
            prompts[b] = (start, i)
            bounds.append((start, i, start, start))
        elif b not in prompts:
            raise ValueError(f"batch: row {b}, completion {j} at position {start} has no prompt before it")
        else:
            bounds.append((start, i, *prompts[b]))
        start = i
    return tuple(bounds)


def segments(batch, limits: dict) -> Segments:
    """The :class:`Segments` of a packed batch for layer types ``{type: (sliding window, chunk)}``.

    ``limits`` as :func:`rcpo_losses.training.model_stats.layer_masks`. Memory: ``sum m (n + m)`` bools per
    distinct ``(window, chunk)``, ``m`` a segment's queries and ``n`` its prompt's length.
    """
    bounds = segment_bounds(batch)
    device = batch["input_ids"].device
    keys = [torch.cat([torch.arange(ps, pe), torch.arange(qs, qe)]) for qs, qe, ps, pe in bounds]
    built = {}
    for window, chunk in set(limits.values()):
        rule = prefix_shared_mask_mod(batch["row_index"], batch["response_index"], batch["position_ids"], window, chunk)
        masks = []
        for qs, qe, ps, pe in bounds:
            q = torch.arange(qs, qe, device=device)
            kv = torch.cat([torch.arange(ps, pe, device=device), q])
            mask = rule(0, 0, q[:, None], kv[None, :])
            causal = ps == pe and bool(mask.equal(torch.ones_like(mask).tril()))
            masks.append(None if causal else mask)
        built[window, chunk] = tuple(masks)
    return Segments(bounds, torch.cat(keys).to(device), {t: built[limit] for t, limit in limits.items()})


def _layer_type(module):
    types = getattr(module.config, "layer_types", None)
    return types[module.layer_idx] if types else None


def segment_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Transformers' attention-function signature: ``sdpa`` over the segments of ``kwargs[KWARG]``.

    Shape:
        - query: ``(1, H, P, D)``; key, value: ``(1, H_kv, P, D)`` with ``H`` a multiple of ``H_kv``.
        - output: ``(1, P, H, D)`` (and no attention weights).
    """
    layout = kwargs.get(KWARG)
    if not isinstance(layout, Segments):
        raise ValueError(
            f"attention implementation {NAME!r} needs the packed batch's segments as the keyword argument "
            f"{KWARG!r} of the forward (rcpo_losses.training.model_stats.response_stats passes it); "
            f"got {type(layout).__name__}"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attention implementation {NAME!r}: {name} is not supported (sdpa has none)")
    if attention_mask is not None:
        raise ValueError(f"attention implementation {NAME!r} takes no attention_mask (the segments are the mask)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    p = dropout if module.training else 0.0
    queries = query.split([qe - qs for qs, qe, _, _ in layout.bounds], 2)
    sizes = [qe - qs + pe - ps for qs, qe, ps, pe in layout.bounds]
    keys, values = (x.index_select(2, layout.kv_index).split(sizes, 2) for x in (key, value))
    masks = layout.masks[_layer_type(module)]
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=scaling
        )
        for q, k, v, mask in zip(queries, keys, values, masks, strict=True)
    ]
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Register :func:`segment_attention_forward` with transformers' ``AttentionInterface`` as :data:`NAME`."""
    versions.require("transformers")
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention_forward)
    return NAME
