"""From tokens to responses: per-token log-probs and entropies, and their per-response sums.

``token_logps_and_entropy`` is one streaming pass over the vocabulary, run by the op
:func:`rcpo_losses.ops.token_stats.token_stats_any`: the Triton kernel
``rcpo_losses.kernels.token_stats`` on CUDA, and everywhere else its PyTorch twin
:class:`rcpo_losses.reference.token_stats.TokenStats`, which walks the rows in chunks so that
no full fp32 copy of the ``[N, V]`` logits is ever made. This module holds the public
functions: their checks, the label shifting and the per-response sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import check_positive_int, check_target_ids
from ..dispersion import entropy_dispersion
from ..ops.token_stats import token_stats_any
from ..ranks import check_rank_tensor
from ..reference.token_stats import LogitTransform, chunk_rows


def sequence_logps(token_logps: Tensor, mask: Tensor, *, normalize: bool = False) -> Tensor:
    r"""Log-prob of each response: the sum of its completion tokens' log-probs.

    .. math:: \log \pi(y \mid x) = \sum_t m_t \log \pi(y_t \mid x, y_{<t})

    ``normalize=True`` divides by the number of completion tokens (SimPO's average
    log-prob). Masked positions are never read, so they may hold anything (NaN included).

    Shape:
        - token_logps: ``(*, T)`` float; mask: ``(*, T)`` bool (True for completion tokens).
        - output: ``(*)`` fp32 (fp64 for fp64), e.g. ``(B, S)`` from ``(B, S, T)``.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match token_logps {tuple(token_logps.shape)}")
    dtype = torch.float64 if token_logps.dtype == torch.float64 else torch.float32
    mask = mask.bool()
    total = torch.where(mask, token_logps.to(dtype), torch.zeros((), dtype=dtype, device=mask.device)).sum(-1)
    if normalize:
        total = total / mask.sum(-1).clamp(min=1).to(dtype)
    return total


def check_targets(targets: Tensor, x: Tensor, name: str, vocab: int, ignore_index: int, validate: bool) -> None:
    """``targets``: integer ids of ``x``'s shape less its last dim, on its device; with ``validate``, in ``[0, vocab)``.

    ``x`` is the input the targets go with, ``name`` its argument's name (for the messages).
    """
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if tuple(x.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} must be the shape of {name} {tuple(x.shape)} without its last dim"
        )
    if targets.device != x.device:
        raise ValueError(f"targets: on {targets.device}, {name} on {x.device}")
    check_target_ids(targets, vocab, ignore_index, validate)


def _check_token_inputs(logits: Tensor, targets: Tensor, ignore_index: int, validate: bool) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected (*, V) with V >= 1, got shape {tuple(logits.shape)}")
    check_targets(targets, logits, "logits", logits.shape[-1], ignore_index, validate)


def token_logps_and_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-token target log-prob and next-token entropy, in one pass over the vocabulary.

    .. math::
        \log p_t = z_t - \log \sum_v e^{z_v}, \qquad
        H = -\sum_v p_v \log p_v, \quad p = \operatorname{softmax}(z)

    of the logits after the model's output transform,
    :math:`z = c \tanh(a\,\ell / c) / T` (``c`` = ``softcap``, ``a`` = ``logit_scale``,
    ``T`` = ``temperature``; :math:`z = a\,\ell / T` when ``softcap`` is None), applied
    inside the same pass: the transformed logits are never stored, and the gradient to the
    raw logits ``\ell`` includes :math:`dz/d\ell`.

    with gradients :math:`\partial \log p_t / \partial z = \mathrm{onehot}_t - p` and
    :math:`\partial H / \partial z = -p\,(\log p + H)`, both in one backward pass. ``H``
    is the entropy that the Mallows dispersion proxy sums (paper appendix D, eq. 15-16).

    Neither pass materializes the ``[N, V]`` softmax: on CUDA (``backend="auto"`` or
    ``"triton"``) a Triton kernel streams each row once with an online softmax; otherwise
    the rows are processed ``chunk_size`` at a time, so extra memory is three fp32
    ``chunk_size x V`` buffers (default: about :math:`2^{20}` elements each, 12 MiB in all).

    Positions whose target is ``ignore_index`` get 0 for both outputs and a 0 gradient;
    their logits may hold anything. With ``validate=True`` (eager only) a target outside
    ``[0, V)`` that is not ``ignore_index`` raises; unvalidated, it yields a NaN log-prob.

    Args:
        logits: ``(*, V)`` fp32, bf16, fp16 or fp64; the math runs in fp32 (fp64 for fp64).
        targets: ``(*)`` integer token ids aligned with ``logits`` (shift them yourself:
            ``logits[..., t, :]`` predicts ``targets[..., t]``).
        ignore_index: target value of positions to skip.
        chunk_size: rows per chunk of the PyTorch path (ignored by the Triton kernel).
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        validate: check the target ids (a device-to-host sync; skipped under ``torch.compile``).
        softcap: ``c`` of Gemma-2's final logit soft-capping (``config.final_logit_softcapping``),
            or None for none.
        logit_scale: ``a``, a multiplier of the raw logits (``config.logit_scale``).
        temperature: ``T``, the sampling temperature the log-probs are taken at.
        process_group: vocabulary parallelism. Each rank of the group passes its contiguous
            slice ``(*, V_r)`` of the logits (slices in rank order) and the same global
            ``targets``; every rank gets the full-vocabulary ``(logp, entropy)``, exact, from
            two all-reduces of ``[N]``-sized vectors (no gather of the logits). Every rank must
            back-propagate the same loss; each gets its slice's gradient. See
            :mod:`rcpo_losses.tokens.vocab_parallel`.

    Returns:
        ``(logp, entropy)``, each ``(*)`` fp32 (fp64 for fp64 logits). The logits gradient
        comes back in the logits' dtype.

    Shape:
        - logits: ``(*, V)``; targets: ``(*)``; outputs: ``(*)``, e.g. ``(B, T)`` from ``(B, T, V)``.
    """
    _check_token_inputs(logits, targets, ignore_index, validate and process_group is None)
    check_positive_int("chunk_size", chunk_size, "rows")
    transform = LogitTransform.make(softcap, logit_scale, temperature)
    shape = targets.shape
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    if V > 1 and z.stride(-1) != 1:
        z = z.contiguous()
    t = targets.reshape(-1).long()

    def stats(targets: Tensor, ignore: int) -> tuple[Tensor, Tensor, Tensor]:
        return token_stats_any(z, targets, ignore, chunk_rows(chunk_size, V), transform, backend)

    if process_group is None:
        logp, ent, _ = stats(t, ignore_index)
    else:
        from . import vocab_parallel as vp

        dead = z.detach().amax(-1) == -torch.inf  # a masked slice: no mass (its own softmax is NaN)
        logp, ent = vp.full_vocab_stats(stats, t, V, ignore_index, validate, dead, process_group)
    return logp.reshape(shape), ent.reshape(shape)


class ResponseTokenStats(NamedTuple):
    """Per-response sums over completion tokens; see :func:`response_token_stats`."""

    logps: Tensor  # sum_t log p(y_t | x, y_<t): the sequence log-prob of eq. 2
    entropy_sums: Tensor  # sum_t H_t
    lengths: Tensor  # number of completion tokens (int64)


def completion_targets(
    labels: Tensor, mask: Tensor | None, ignore_index: int, shift_labels: bool
) -> tuple[Tensor, Tensor]:
    """Targets aligned with the logits, and the completion mask (``targets != ignore_index``)."""
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not match labels {tuple(labels.shape)}")
        labels = torch.where(mask.bool(), labels, ignore_index)
    if shift_labels:
        # Shift the (small) labels, not the logits: slicing logits[..., :-1, :] would force a copy.
        pad = torch.full_like(labels[..., :1], ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    return labels, labels != ignore_index


def response_token_stats(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    shift_labels: bool = False,
    num_responses: int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    process_group: object | None = None,
) -> ResponseTokenStats:
    r"""Sequence log-probs, entropy sums and lengths of responses, from their logits.

    .. math::
        \log \pi(y_i \mid x) = \sum_t m_{i,t} \log p_{i,t}(y_{i,t}), \qquad
        \textstyle\sum_t H_{i,t} = \sum_t m_{i,t} H(p_{i,t}), \qquad
        |y_i| = \sum_t m_{i,t}

    where ``p_{i,t}`` is the next-token distribution at completion token ``t`` of
    response ``i`` and ``m`` the completion mask. The log-probs are the ``policy_logps`` /
    ``ref_logps`` of eq. 2; the entropy sums and lengths feed :func:`entropy_dispersion`
    (appendix D), as does :func:`entropy_dispersion_from_logits` in one call. One pass of
    :func:`token_logps_and_entropy` over the vocabulary; gradients flow to the logits
    through ``logps`` and ``entropy_sums`` (wrap the reference model's call in
    ``torch.no_grad()``).

    Args:
        logits: ``(*, T, V)``: e.g. ``(B, S, T, V)``, or ``(B * S, T, V)`` with ``num_responses=S``.
        labels: ``(*, T)`` token ids. Positions equal to ``ignore_index`` (prompt, padding)
            are left out.
        mask: optional ``(*, T)`` bool completion mask, applied on top of ``ignore_index``.
        shift_labels: ``labels`` (and ``mask``) are aligned with the model's input ids, as
            in Hugging Face models: ``logits[..., t, :]`` predicts ``labels[..., t + 1]``.
            The labels are shifted, never the logits (no copy of the logits).
        num_responses: reshape the flat leading dim ``B * S`` of the outputs to ``(B, S)``.
        ignore_index, chunk_size, backend, validate: as in :func:`token_logps_and_entropy`.
        softcap, logit_scale, temperature: the logit transform, as in :func:`token_logps_and_entropy`.
        process_group: vocabulary parallelism (``logits`` is this rank's ``(*, T, V_r)`` slice),
            as in :func:`token_logps_and_entropy`.

    Shape:
        - logits: ``(*, T, V)``; labels, mask: ``(*, T)``.
        - outputs: ``(*)``, or ``(B, S)`` with ``num_responses=S``; ``logps`` and
          ``entropy_sums`` fp32 (fp64 for fp64 logits), ``lengths`` int64.

    Example::

        with torch.no_grad():
            ref = response_token_stats(ref_model(ids).logits, ids, completion_mask, shift_labels=True, num_responses=S)
        neg_log_phi = entropy_dispersion(ref.entropy_sums, ref.lengths, ranks, vocab_size)
    """
    if logits.dim() < 2:
        raise ValueError(f"logits: expected (*, T, V), got shape {tuple(logits.shape)}")

    def token_stats(targets: Tensor) -> tuple[Tensor, Tensor]:
        return token_logps_and_entropy(
            logits,
            targets,
            ignore_index,
            chunk_size=chunk_size,
            backend=backend,
            validate=validate,
            softcap=softcap,
            logit_scale=logit_scale,
            temperature=temperature,
            process_group=process_group,
        )

    return per_response(token_stats, labels, mask, ignore_index, shift_labels, num_responses, "logits", logits.shape)


def per_response(
    token_stats: Callable[[Tensor], tuple[Tensor, Tensor]],
    labels: Tensor,
    mask: Tensor | None,
    ignore_index: int,
    shift_labels: bool,
    num_responses: int | None,
    name: str,
    shape: torch.Size,
) -> ResponseTokenStats:
    """Per-response sums of the per-token ``(logp, entropy)`` that ``token_stats(targets)`` gives, and the lengths.

    The targets are the completion tokens of ``labels`` (``mask``, ``shift_labels``,
    ``num_responses``: as in :func:`response_token_stats`). ``name`` and ``shape`` (the input the
    tokens come from) only word the error message.
    """
    check_positive_int("num_responses", num_responses, "responses per prompt")
    targets, valid = completion_targets(labels, mask, ignore_index, shift_labels)
    logp, ent = token_stats(targets)
    # Ignored positions hold exactly 0 (with 0 gradient), so plain sums are the masked sums.
    out = ResponseTokenStats(logp.sum(-1), ent.sum(-1), valid.sum(-1))
    if num_responses is not None:
        if out.lengths.dim() != 1 or out.lengths.shape[0] % num_responses:
            raise ValueError(
                f"num_responses: {num_responses} does not divide the flat leading dim of {name} "
                f"{tuple(shape)} into (B, S)"
            )
        out = ResponseTokenStats(*(x.reshape(-1, num_responses) for x in out))
    return out


def entropy_dispersion_from_logits(
    logits: Tensor,
    labels: Tensor,
    ranks: Tensor,
    mask: Tensor | None = None,
    *,
    shift_labels: bool = False,
    ignore_index: int = -100,
    variant: str = "rcpo",
    scale: float = 1.0,
    min_ratio: float = 1e-6,
    detach: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    r"""Mallows dispersion weight ``-log phi(x)`` of each prompt, from the responses' logits.

    .. math::
        w_b = -\log \frac{\sum_{i \in S_b} \sum_t H_{i,t}}{n_b\, N_b \log V},
        \qquad N_b = \max_{i \in S_b} |y_i|

    (appendix D, extended to ``|S|`` responses; ``variant="mallowspo"`` as in
    :func:`entropy_dispersion`). :func:`response_token_stats` followed by
    :func:`entropy_dispersion`; use those two directly to get the reference log-probs from
    the same pass. With ``detach=True`` (default) it runs under ``torch.no_grad()``: the
    weight carries no gradient and no autograd state is kept. ``softcap``, ``logit_scale``
    and ``temperature`` transform the logits first, as in :func:`token_logps_and_entropy`.

    Shape:
        - logits: ``(B, S, T, V)`` or ``(B * S, T, V)`` (usually the reference model's);
          labels, mask: the same without ``V``; ranks: ``(B, S)``.
        - output: ``(B,)`` fp32 (fp64 for fp64 logits).
    """
    check_rank_tensor(ranks)
    lead = tuple(logits.shape[:-2])  # (B, S) or (B * S,)
    if lead != tuple(ranks.shape) and (len(lead) != 1 or lead[0] != ranks.numel()):
        raise ValueError(
            f"ranks: shape {tuple(ranks.shape)} does not match the responses of logits {tuple(logits.shape)}: "
            "expected (B, S) for (B, S, T, V) logits, or (B, S) with B * S = N for (N, T, V) logits"
        )
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        stats = response_token_stats(
            logits,
            labels,
            mask,
            shift_labels=shift_labels,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            backend=backend,
            validate=validate,
            softcap=softcap,
            logit_scale=logit_scale,
            temperature=temperature,
        )
    return entropy_dispersion(
        stats.entropy_sums.reshape(ranks.shape),
        stats.lengths.reshape(ranks.shape),
        ranks,
        logits.shape[-1],
        variant=variant,
        scale=scale,
        min_ratio=min_ratio,
        detach=detach,
        validate=validate,
    )
