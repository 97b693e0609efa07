"""Per-token log-probs and entropies straight from hidden states and the LM head, never holding the logits.

With ranked feedback every prompt brings ``|S|`` responses, so the LM head's output is the
largest tensor of a training step: 8 prompts x 5 responses x 2048 tokens at
``V = 128256`` is 21 GB of bf16 logits, and its gradient as much again.
:func:`fused_linear_token_stats` computes what the losses need from the logits (the
target log-prob and the entropy of every position) chunk by chunk over the tokens:

- forward, per chunk of ``c`` rows: ``z = h @ W.T + b`` (one ``[c, V]`` buffer, reused),
  then the one-pass log-prob/entropy statistics of the chunk (the Triton ``token_stats``
  op on CUDA, the chunked PyTorch path's :func:`rcpo_losses.reference.token_stats.chunk_stats`
  elsewhere). Only ``lse`` and the entropy per row, ``O(N)``, are kept;
- backward, per chunk: recompute ``z``, turn it into the logits gradient ``g`` (the
  ``token_stats_backward`` op, or :func:`rcpo_losses.reference.token_stats.chunk_logits_grad` in place),
  then ``grad_h[chunk] = g @ W``, ``grad_W += g.T @ h``, ``grad_b += g.sum(0)``, the last
  two accumulated in fp32 (fp64 for fp64) and cast to the parameters' dtype at the end.

The model's logit transform (``softcap``, ``logit_scale``, ``temperature``) is applied to
each chunk in place, and its derivative in the backward. On a CPU whose bf16/fp16 GEMM is a
slow fallback (probed once, see ``rcpo_losses.ops.backend.CPU_FP32_MATMUL``) the chunk matmuls run on fp32 operands.
With ``process_group`` each rank holds a vocabulary slice of the head
(:mod:`rcpo_losses.tokens.vocab_parallel`).

So at most one chunk of logits (and, on CUDA, its gradient) is alive at a time. The
price is one extra matmul: the forward logits are recomputed in the backward (4 matmuls
of ``N H V`` instead of 3). Both passes are one ``torch.library.custom_op`` each
(``rcpo_losses::fused_linear_token_stats`` and ``..._backward``), with fake tensors and
an autograd formula, so ``torch.compile(fullgraph=True)`` keeps them as single opaque
nodes. They live in :mod:`rcpo_losses.ops.fused_linear`; this module holds the public
functions and their checks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_positive_int
from ..ops.fused_linear import fused_linear_stats_any
from ..reference.token_stats import LogitTransform
from .stats import ResponseTokenStats, check_targets, per_response


def _check_fused_inputs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, validate: bool
) -> None:
    """Shapes, dtypes and devices; with ``validate``, the target ids against ``weight``'s vocabulary."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if hasattr(weight, "full_tensor"):
        raise TypeError(
            "weight: a DTensor (FSDP2 between forwards, or a tensor-parallel layout). Under FSDP2 take it with "
            "lm_head_spec(model) after final_hidden_states(model, ...); for a vocabulary-parallel head pass this "
            "rank's local slice (weight.to_local()) with process_group="
        )
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected (*, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight: expected the LM head's (V, H) with V >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} is not (V, H) for hidden states of size H = {hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one to the other")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias: {bias.dtype} on {bias.device}, weight {weight.dtype} on {weight.device}")
    check_targets(targets, hidden, "hidden", weight.shape[0], ignore_index, validate)


def fused_linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    entropy: bool = True,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-token target log-prob and entropy of ``hidden @ weight.T + bias``, without holding the logits.

    .. math::
        z = h W^\top + b, \qquad \log p_t = z'_t - \log \sum_v e^{z'_v}, \qquad
        H = -\sum_v p_v \log p_v, \quad p = \operatorname{softmax}(z')

    where :math:`z' = c \tanh(a z / c) / T` is the model's output transform (``softcap``
    ``c``, ``logit_scale`` ``a``, ``temperature`` ``T``; :math:`z' = a z / T` without a
    cap), applied to each chunk of logits inside the pass; :func:`rcpo_losses.lm_head_spec`
    reads ``weight``, ``bias``, ``softcap`` and ``logit_scale`` from a Hugging Face model.

    Equal to ``token_logps_and_entropy(hidden @ weight.T + bias, targets)``, with gradients
    to ``hidden``, ``weight`` and ``bias`` through both outputs, but the ``[N, V]`` logits
    are never materialized: the tokens are processed ``chunk_size`` rows at a time, forward
    and backward (the backward recomputes each chunk's logits: 4 matmuls of ``N H V``
    instead of 3). Extra memory is one chunk of logits plus the chunk math's buffers
    (PyTorch path: two or three fp32 ``chunk x V`` buffers; CUDA: the chunk's logits
    gradient) and, for a bf16/fp16 ``weight``, its fp32 gradient accumulator ``[V, H]``.
    Under ``torch.no_grad()`` (or when nothing requires grad) nothing is saved for a
    backward: use it for the reference model too.

    Per chunk, on CUDA (``backend="auto"`` or ``"triton"``) the logits go through the
    Triton ``rcpo_losses::token_stats`` ops; otherwise through the chunked PyTorch path of
    :func:`token_logps_and_entropy`. ``grad_weight`` and ``grad_bias`` are summed over the
    chunks in fp32 (fp64 for fp64) and cast to the parameters' dtype at the end.

    Args:
        hidden: ``(*, H)`` final hidden states (after the last norm), fp32, bf16, fp16 or fp64.
        weight: ``(V, H)`` the LM head's weight (``model.lm_head.weight``), same dtype and device.
        targets: ``(*)`` integer token ids aligned with ``hidden`` (``hidden[..., t, :]``
            predicts ``targets[..., t]``); ``ignore_index`` positions get 0 outputs and gradient.
        bias: optional ``(V,)`` LM head bias.
        chunk_size: tokens per chunk. Default: ``next_pow2(ceil(N / ceil(V / H)))`` (a chunk
            of logits about the size of ``hidden``), at most ``2^27 / V`` rows. Larger chunks
            make bigger matmuls and fewer passes over the ``[V, H]`` accumulator; smaller
            ones use less memory.
        entropy: ``False`` returns zeros for the entropy (and ignores its gradient); the
            PyTorch path then skips the entropy work (a softmax product per chunk in the
            forward, the ``log p + H`` term in the backward). The Triton kernel computes it
            in the same pass anyway.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        validate: check the target ids (a device-to-host sync; skipped under ``torch.compile``).
        softcap, logit_scale, temperature: the logit transform, as in
            :func:`rcpo_losses.token_logps_and_entropy` (Gemma-2: ``softcap=30``).
        process_group: vocabulary-parallel LM head: each rank passes its contiguous slice
            ``(V_r, H)`` of ``weight`` (and ``(V_r,)`` of ``bias``), in rank order, the same
            ``hidden`` and the same global ``targets``; every rank gets the exact
            full-vocabulary outputs, from all-reduces of ``[N]``-sized vectors, and in the
            backward its slice's weight gradient and the full ``hidden`` gradient (one
            all-reduce of ``[N, H]``). Every rank must back-propagate the same loss. See
            :mod:`rcpo_losses.tokens.vocab_parallel`.

    Returns:
        ``(logp, entropy)``, each ``(*)`` fp32 (fp64 for fp64 inputs).

    Shape:
        - hidden: ``(*, H)``; weight: ``(V, H)``; bias: ``(V,)``; targets and outputs: ``(*)``.

    Example::

        h = model.model(input_ids).last_hidden_state  # (B, T, H), no logits
        logp, ent = fused_linear_token_stats(h[:, :-1], model.lm_head.weight, input_ids[:, 1:])
    """
    _check_fused_inputs(hidden, weight, bias, targets, ignore_index, validate and process_group is None)
    check_positive_int("chunk_size", chunk_size, "rows")
    transform = LogitTransform.make(softcap, logit_scale, temperature)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long().contiguous()

    def stats(targets: Tensor, ignore: int) -> tuple[Tensor, Tensor, Tensor]:
        return fused_linear_stats_any(h, weight, bias, targets, ignore, chunk_size or 0, entropy, transform, backend)

    if process_group is None:
        logp, ent, _ = stats(t, ignore_index)
    else:
        from . import vocab_parallel as vp

        # A slice masked by its bias (-inf everywhere) has no mass on any row (for finite h and W).
        masked = bias is not None and bool((bias.detach() == -torch.inf).all())
        dead = torch.full_like(t, masked, dtype=torch.bool)
        h = vp.copy_to_ranks(h, process_group)  # what stats reads: its gradient is summed over the ranks
        logp, ent = vp.full_vocab_stats(stats, t, weight.shape[0], ignore_index, validate, dead, process_group)
        if not entropy:
            ent = torch.zeros_like(ent)
    return logp.reshape(shape), ent.reshape(shape)


def fused_linear_response_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    shift_labels: bool = False,
    num_responses: int | None = None,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    entropy: bool = True,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> ResponseTokenStats:
    r"""Sequence log-probs, entropy sums and lengths of responses, from final hidden states and the LM head.

    :func:`response_token_stats` on the logits ``hidden @ weight.T + bias``, computed with
    :func:`fused_linear_token_stats`, so the ``[*, T, V]`` logits are never held. Same
    label shifting and masking, same outputs: ``logps`` (the ``policy_logps`` /
    ``ref_logps`` of eq. 2), ``entropy_sums`` and ``lengths`` (for
    :func:`entropy_dispersion`, appendix D). Gradients flow to ``hidden``, ``weight`` and
    ``bias`` through ``logps`` and ``entropy_sums``; for the reference model call it under
    ``torch.no_grad()``, which keeps nothing for a backward.

    Args:
        hidden: ``(*, T, H)``, e.g. ``(B * S, T, H)`` from ``model.model(ids).last_hidden_state``.
        weight: ``(V, H)`` (``model.lm_head.weight``); bias: optional ``(V,)``.
        labels, mask, shift_labels, num_responses, ignore_index: as in :func:`response_token_stats`.
        chunk_size, entropy, backend, validate: as in :func:`fused_linear_token_stats`.
        softcap, logit_scale, temperature, process_group: as in :func:`fused_linear_token_stats`.

    Shape:
        - hidden: ``(*, T, H)``; labels, mask: ``(*, T)``.
        - outputs: ``(*)``, or ``(B, S)`` with ``num_responses=S``.

    Example::

        with torch.no_grad():
            h = ref_model.model(ids).last_hidden_state
            ref = fused_linear_response_stats(h, ref_model.lm_head.weight, ids, completion_mask,
                                              shift_labels=True, num_responses=S)
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected (*, T, H), got shape {tuple(hidden.shape)}")

    def token_stats(targets: Tensor) -> tuple[Tensor, Tensor]:
        return fused_linear_token_stats(
            hidden,
            weight,
            targets,
            bias,
            ignore_index,
            chunk_size=chunk_size,
            entropy=entropy,
            backend=backend,
            validate=validate,
            softcap=softcap,
            logit_scale=logit_scale,
            temperature=temperature,
            process_group=process_group,
        )

    return per_response(token_stats, labels, mask, ignore_index, shift_labels, num_responses, "hidden", hidden.shape)
