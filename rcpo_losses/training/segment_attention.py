"""Prefix-shared attention over segments: each completion against its own prompt and itself, nothing else.

The dense mask of :func:`rcpo_losses.training.packing.dense_attention_mask` makes ``sdpa`` compute all
``P^2`` pairs of the packed sequence and throw most away. Here each row of the packed sequence
(a prompt, then its completions) is cut into its prompt and its completions, and attention runs
on three kinds of blocks, each a view of the model's queries, keys and values (no copy):

- the prompt against itself (causal);
- all the row's completion queries together against the prompt's keys (one call);
- each completion against itself (causal).

A completion query's softmax runs over the union of its prompt keys and its own earlier keys:
the two partial attentions are merged by their log-sum-exp (the split-key form of
FlashAttention), and the backward runs the same two blocks with the merged output and
log-sum-exp (:class:`_CompletionAttention`). Each block's small mask is the rule of
:func:`rcpo_losses.training.packing.prefix_shared_mask_mod` evaluated on the block's indices
(so windows and chunks come from the one rule), and the rule allows no pair outside the blocks
(another row, a sibling completion): the result is the dense-mask attention's, at a cost of
``n^2 / 2 + M n + sum_j m_j^2 / 2`` pairs per row (prompt ``n``, completion inputs ``m_j``,
``M = sum_j m_j``) instead of ``P^2``, and key/value heads are never repeated for grouped queries.

Transformers reaches it through its ``sdpa`` entry: :func:`register` wraps the registered ``sdpa``
function so that a call whose keyword arguments carry :data:`KWARG` runs the segments, any other
call runs ``sdpa`` itself. The layout travels through the model's forward as that keyword argument
(transformers hands ``**kwargs`` down to the attention function) with ``attention_mask``
:func:`empty_mask` (a 4D mask transformers passes through as is, without building one). Nothing is
switched on the model, so a backward that recomputes the layers (any activation checkpointing)
recomputes the segments too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import versions
from .packing import prefix_shared_mask_mod

KWARG = "rcpo_segments"  # the forward keyword argument that carries the Segments


@dataclass(frozen=True, eq=False)
class Segments:
    """The blocks of a packed batch and, per attention layer type, each block's mask.

    ``sizes``: the packed positions cut into each row's prompt, then (when it has completion
    inputs) all its completions together. ``rows[r] = (n, (m_0, m_1, ...))``: row ``r``'s prompt
    length and the lengths of its completions' inputs. ``masks[layer type][r] = (prompt, cross,
    own)``: bool, True: attend; ``prompt`` ``(n, n)`` or None where plain causal, ``cross``
    ``(M, n)`` (the completions' queries against the prompt) or None where all pairs are
    attended, ``own`` one ``(m_j, m_j)`` or None (causal) per completion.
    """

    sizes: tuple[int, ...]
    rows: tuple[tuple[int, tuple[int, ...]], ...]
    masks: dict


def segment_bounds(batch) -> tuple[tuple[int, int, int, int], ...]:
    """``(q_start, q_end, prompt_start, prompt_end)`` of each run of positions with one row and completion.

    A prompt's run has an empty prompt range (``prompt_start == prompt_end == q_start``).
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

    ``limits`` as :func:`rcpo_losses.training.model_stats.layer_masks`. Each row's completions must
    follow its prompt (``ValueError`` otherwise), as :func:`~rcpo_losses.training.packing.pack_prefix_shared`
    packs them. Memory: ``n^2 + M n + sum_j m_j^2`` bools per row and distinct ``(window, chunk)``.
    """
    rows: list[tuple[int, int, list[int]]] = []  # (prompt start, prompt end, completion ends)
    for qs, qe, ps, pe in segment_bounds(batch):
        if ps == pe:
            rows.append((qs, qe, []))
        elif (ps, pe) != rows[-1][:2] or qs != (rows[-1][2] or [pe])[-1]:
            raise ValueError(f"batch: the completion at positions {qs}..{qe - 1} does not follow its prompt's row")
        else:
            rows[-1][2].append(qe)
    device = batch["input_ids"].device
    built = {}
    for window, chunk in set(limits.values()):
        rule = prefix_shared_mask_mod(batch["row_index"], batch["response_index"], batch["position_ids"], window, chunk)

        def block(q0: int, q1: int, k0: int, k1: int, causal: bool, rule=rule):
            q, kv = torch.arange(q0, q1, device=device), torch.arange(k0, k1, device=device)
            mask = rule(0, 0, q[:, None], kv[None, :])
            plain = torch.ones_like(mask).tril() if causal else torch.ones_like(mask)
            return None if mask.equal(plain) else mask

        masks = []
        for ps, pe, ends in rows:
            own = tuple(block(s, e, s, e, True) for s, e in zip([pe, *ends[:-1]], ends, strict=True))
            cross = block(pe, ends[-1], ps, pe, False) if ends else None
            masks.append((block(ps, pe, ps, pe, True), cross, own))
        built[window, chunk] = tuple(masks)
    sizes = tuple(x for ps, pe, ends in rows for x in (pe - ps, *([ends[-1] - pe] if ends else [])))
    shape = tuple((pe - ps, tuple(e - s for s, e in zip([pe, *ends[:-1]], ends, strict=True))) for ps, pe, ends in rows)
    return Segments(sizes, shape, {t: built[limit] for t, limit in limits.items()})


def empty_mask(device: torch.device | str | None = None) -> Tensor:
    """The ``attention_mask`` the model gets with the segments: a bool ``(1, 1, 0, 0)`` tensor.

    Transformers returns a 4D mask as it is, so no ``[P, P]`` mask is built; a family that would
    use it itself (add it to its scores, build its own from it) fails on its empty shape instead
    of attending across completions, and the first-seen probe then keeps it on the dense mask.
    """
    return torch.ones(1, 1, 0, 0, dtype=torch.bool, device=device)


def _layer_type(module):
    types = getattr(module.config, "layer_types", None)
    return types[module.layer_idx] if types else None


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as the additive one the CPU flash kernel takes (0 where attended, -inf elsewhere)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _flash_cpu(q, k, v, mask, scale, causal):
    """``(output, log-sum-exp)`` of the CPU flash kernel: ``softmax(scale q k^T + mask) v`` and its row log-sum-exp."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


class _CompletionAttention(torch.autograd.Function):
    """A row's completion queries against ``[prompt keys; their own completion's earlier keys]``, merged by LSE.

    Shape: ``q (1, H, M, D)``, ``k_p, v_p (1, H_kv, n, D)``, ``k_c, v_c (1, H_kv, M, D)``; ``cross`` the
    additive ``(M, n)`` mask or None, ``own`` one additive ``(m_j, m_j)`` mask or None (causal) per
    completion, ``sizes`` the ``m_j``, ``empty`` the bool ``(M,)`` rows of ``cross`` with no key or None.
    """

    @staticmethod
    def forward(ctx, q, k_p, v_p, k_c, v_c, cross, own, sizes, empty, scale):
        out_p, lse_p = _flash_cpu(q, k_p, v_p, cross, scale, causal=False)
        if empty is not None:  # the kernel reports log-sum-exp 0 for a row with no key: it has no weight
            lse_p = lse_p.masked_fill(empty, float("-inf"))
        parts = [
            _flash_cpu(qj, kj, vj, m, scale, causal=m is None)
            for qj, kj, vj, m in zip(q.split(sizes, 2), k_c.split(sizes, 2), v_c.split(sizes, 2), own, strict=True)
        ]
        out_c, lse_c = torch.cat([o for o, _ in parts], 2), torch.cat([s for _, s in parts], 2)
        lse = torch.logaddexp(lse_p, lse_c)  # every query attends to itself: finite
        w_p, w_c = (lse_p - lse).exp().unsqueeze(-1), (lse_c - lse).exp().unsqueeze(-1)
        out = (out_p.to(lse.dtype) * w_p + out_c.to(lse.dtype) * w_c).to(q.dtype)
        ctx.save_for_backward(q, k_p, v_p, k_c, v_c, out, lse)
        ctx.masks, ctx.sizes, ctx.scale = (cross, own), sizes, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k_p, v_p, k_c, v_c, out, lse = ctx.saved_tensors
        (cross, own), sizes, scale = ctx.masks, ctx.sizes, ctx.scale
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        # each block's gradient with the merged output and log-sum-exp is its share of the union's gradient
        dq, dk_p, dv_p = backward(grad, q, k_p, v_p, out, lse, 0.0, False, attn_mask=cross, scale=scale)
        pieces = zip(*(x.split(sizes, 2) for x in (grad, q, k_c, v_c, out, lse)), own, strict=True)
        parts = [
            backward(g, qj, kj, vj, o, s, 0.0, m is None, attn_mask=m, scale=scale) for g, qj, kj, vj, o, s, m in pieces
        ]
        dq = dq + torch.cat([p[0] for p in parts], 2)
        dk_c, dv_c = torch.cat([p[1] for p in parts], 2), torch.cat([p[2] for p in parts], 2)
        return dq, dk_p, dv_p, dk_c, dv_c, None, None, None, None, None


def _merged(q, k_p, v_p, k_c, v_c, masks, sizes, scale) -> Tensor:
    """:class:`_CompletionAttention` on a row's blocks, in the dtype ``sdpa`` would compute in, masks additive."""
    _, cross, own = masks
    # the dtype sdpa would compute in: autocast's (sdpa is on its lower-precision list), else the common one
    device = q.device.type
    dtype = (
        torch.get_autocast_dtype(device)
        if torch.is_autocast_enabled(device)
        else torch.promote_types(torch.promote_types(q.dtype, k_p.dtype), v_p.dtype)
    )
    q, k_p, v_p, k_c, v_c = (x.to(dtype) for x in (q, k_p, v_p, k_c, v_c))
    empty = None if cross is None else ~cross.any(-1)
    additive = [_additive(m, q.dtype) for m in (cross, *own)]
    return _CompletionAttention.apply(
        q, k_p, v_p, k_c, v_c, additive[0], tuple(additive[1:]), list(sizes), empty, scale
    )


def _row_mask(n: int, sizes: tuple[int, ...], masks, device) -> Tensor:
    """The ``(n + M, n + M)`` bool mask of a whole row from its blocks' masks (with dropout, or off the CPU)."""
    prompt_mask, cross, own = masks
    M = sum(sizes)
    out = torch.zeros(n + M, n + M, dtype=torch.bool, device=device)
    out[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril() if prompt_mask is None else prompt_mask
    out[n:, :n] = True if cross is None else cross
    start = n
    for m, mask in zip(sizes, own, strict=True):
        out[start : start + m, start : start + m] = (
            torch.ones(m, m, dtype=torch.bool, device=device).tril() if mask is None else mask
        )
        start += m
    return out


def _blocks(query: Tensor, dropout: float) -> bool:
    """Whether the completions run as merged blocks (the CPU flash kernel, no dropout), else one call per row."""
    return dropout == 0.0 and query.device.type == "cpu"


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
    """Transformers' attention-function signature: attention over the blocks of ``kwargs[KWARG]``.

    On the CPU without dropout, the blocks of the module docstring; with attention dropout, or
    off the CPU, one ``sdpa`` call per row with the row's ``(n + M)^2`` mask (still no pair of
    another row, no ``P^2``). ``attention_mask``: None or :func:`empty_mask` (the segments are the mask).

    Shape:
        - query: ``(1, H, P, D)``; key, value: ``(1, H_kv, P, D)`` with ``H`` a multiple of ``H_kv``.
        - output: ``(1, P, H, D)`` (and no attention weights).
    """
    layout = kwargs.get(KWARG)
    if not isinstance(layout, Segments):
        raise ValueError(
            f"the segment attention needs the packed batch's segments as the keyword argument {KWARG!r} of the "
            f"forward (rcpo_losses.training.model_stats.response_stats passes it); got {type(layout).__name__}"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"the segment attention: {name} is not supported (sdpa has none)")
    if attention_mask is not None and attention_mask.numel():
        raise ValueError(
            "the segment attention takes no attention_mask (the segments are the mask): the model changed the "
            f"empty mask it was given into one of shape {tuple(attention_mask.shape)}"
        )
    p = dropout if module.training else 0.0
    merge = _blocks(query, p)
    sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, scale=scaling, enable_gqa=True)
    queries, keys, values = (x.split(layout.sizes, 2) for x in (query, key, value))
    outs, i = [], 0
    for (n, sizes), masks in zip(layout.rows, layout.masks[_layer_type(module)], strict=True):
        q_p, k_p, v_p = queries[i], keys[i], values[i]
        if not sizes or merge:
            prompt_mask = masks[0]
            outs.append(sdpa(q_p, k_p, v_p, attn_mask=prompt_mask, is_causal=prompt_mask is None, dropout_p=p))
        if sizes and merge:
            q_c, k_c, v_c = queries[i + 1], keys[i + 1], values[i + 1]
            outs.append(_merged(q_c, k_p, v_p, k_c, v_c, masks, sizes, scaling))
        elif sizes:  # one call for the row, its keys gathered once
            q_r, k_r, v_r = (torch.cat([x[i], x[i + 1]], 2) for x in (queries, keys, values))
            outs.append(sdpa(q_r, k_r, v_r, attn_mask=_row_mask(n, sizes, masks, query.device), dropout_p=p))
        i += 2 if sizes else 1
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


# Eager: the blocks follow the batch's layout (Python ints), so compiled they would be one graph per layout.
_eager_segment_attention = torch.compiler.disable(segment_attention_forward)


@torch.compiler.disable  # once per process: nothing to trace
def register() -> None:
    """Wrap transformers' registered ``sdpa`` attention function: calls with :data:`KWARG` run the segments.

    Calls without it (every model outside the prefix-shared layout) run the wrapped function as before.
    Once: a second call finds the wrapper in place.
    """
    versions.require("transformers")
    from transformers import AttentionInterface

    sdpa = AttentionInterface._global_mapping["sdpa"]
    if getattr(sdpa, "rcpo_segments", False):
        return

    @functools.wraps(sdpa)
    def sdpa_or_segments(module, query, key, value, attention_mask, *args, **kwargs):
        if kwargs.get(KWARG) is None:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        if args:
            raise TypeError(f"the segment attention takes keyword arguments only after attention_mask, got {args}")
        return _eager_segment_attention(module, query, key, value, attention_mask, **kwargs)

    sdpa_or_segments.rcpo_segments = True
    AttentionInterface.register("sdpa", sdpa_or_segments)
