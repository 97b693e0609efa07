"""From tokens to responses: per-token log-probs and entropies, and their per-response sums.

``token_logps_and_entropy`` is one streaming pass over the vocabulary: the Triton kernel
``rcpo_losses.kernels.token_stats`` on CUDA, and everywhere else ``_TokenStats``, a
PyTorch ``autograd.Function`` that walks the rows in chunks so that no full fp32 copy of
the ``[N, V]`` logits is ever made. ``_token_stats_reference`` is the plain formula
(``log_softmax``, ``gather``, ``softmax * log_softmax``) both are tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _backend
from ._checks import check_positive_int, check_rank_tensor, first_order_only, should_sync
from .dispersion import entropy_dispersion


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


# Elements per chunk buffer of the PyTorch path (fp32: 4 MiB each; a pass holds three).
CHUNK_ELEMENTS = 1 << 20
# Below this shifted log-prob, exp() is exactly 0 even in fp64 (exp(-745) underflows): clamping
# log p there keeps p * log p (and p * (log p + H) * g) at 0 instead of 0 * inf = NaN.
_LOG_P_FLOOR = -1e4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(chunk_size: int | None, V: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(V, 1))
    return chunk_size  # checked by token_logps_and_entropy


class LogitTransform(NamedTuple):
    r"""``z' = c \tanh(a z / c) / T`` (``c`` = ``softcap``), or ``z' = a z / T`` when ``softcap`` is None.

    ``a`` = ``logit_scale`` (``config.logit_scale``), ``c`` = ``softcap``
    (``config.final_logit_softcapping``, Gemma-2), ``T`` = ``temperature``. Applied to each
    chunk of logits in place; the capped logits are never kept for the backward, which
    recomputes them and applies ``dz'/dz = (a / T) (1 - \tanh^2(a z / c))``.
    """

    softcap: float | None
    logit_scale: float
    temperature: float

    @staticmethod
    def make(softcap: float | None, logit_scale: float, temperature: float) -> LogitTransform | None:
        """The checked transform, or None when it is the identity."""
        for name, x in (("softcap", softcap), ("logit_scale", logit_scale), ("temperature", temperature)):
            if x is None and name == "softcap":
                continue
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {x}")
        if softcap is None and logit_scale == 1 and temperature == 1:
            return None
        return LogitTransform(None if softcap is None else float(softcap), float(logit_scale), float(temperature))

    def apply_(self, z: Tensor) -> Tensor:
        """``z'`` in place of ``z``."""
        a, c, T = self.logit_scale, self.softcap, self.temperature
        if c is None:
            return z.mul_(a / T)
        return z.mul_(a / c).tanh_().mul_(c / T)

    def derivative_(self, zt: Tensor) -> Tensor | float:
        """``dz'/dz`` from the transformed ``z'`` (overwritten), or a float when it is a constant."""
        a, c, T = self.logit_scale, self.softcap, self.temperature
        if c is None:
            return a / T
        return zt.mul_(T / c).square_().neg_().add_(1.0).mul_(a / T)  # (a / T) (1 - tanh^2)

    def reference(self, z: Tensor) -> Tensor:
        """``z'`` out of place, with plain autograd ops (the specification)."""
        a, c, T = self.logit_scale, self.softcap, self.temperature
        return z * (a / T) if c is None else c * torch.tanh(z * (a / c)) / T

    def args(self) -> tuple[float, float, float]:
        """``(softcap, logit_scale, temperature)`` for a custom op, with ``softcap=0.0`` meaning none."""
        return (self.softcap or 0.0, self.logit_scale, self.temperature)


def transform_from_args(softcap: float, logit_scale: float, temperature: float) -> LogitTransform | None:
    """Inverse of :meth:`LogitTransform.args` (custom ops take no ``None`` floats)."""
    if softcap == 0 and logit_scale == 1 and temperature == 1:
        return None
    return LogitTransform(softcap or None, logit_scale, temperature)


def _safe_targets(targets: Tensor, valid: Tensor, V: int) -> Tensor:
    return torch.where(valid, targets, 0).clamp(0, max(V - 1, 0))


class _Workspace:
    """Chunk buffers allocated once per pass and reused for every chunk.

    Fresh ``chunk x V`` temporaries per chunk would each be a new heap or mmap block that
    the OS must fault in (and glibc may hand back between chunks); reusing three buffers
    keeps the pass at a fixed ``3 * chunk * V`` elements and avoids that churn.
    """

    def __init__(
        self,
        logits: Tensor,
        chunk: int,
        dtype: torch.dtype,
        transform: LogitTransform | None = None,
        writable: bool = False,
    ) -> None:
        shape = (min(chunk, logits.shape[0]), logits.shape[1])
        # fp32/fp64 logits are read in place; bf16/fp16 ones are converted into self.z, and so
        # are transformed ones unless the caller owns the logits (``writable``: transformed in place).
        copy = logits.dtype != dtype or (transform is not None and not writable)
        self.z = torch.empty(shape, dtype=dtype, device=logits.device) if copy else None
        self.a = torch.empty(shape, dtype=dtype, device=logits.device)
        self.b = torch.empty(shape, dtype=dtype, device=logits.device)
        self.transform = transform

    def rows(self, logits: Tensor, a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, buf_a, buf_b)`` for rows ``a:b``: the (transformed) logits in the compute dtype and two buffers.

        ``z`` is the caller's logits (never written) when there is neither a conversion nor a
        transform; otherwise a buffer (or, ``writable``, the logits transformed in place) that
        :func:`_chunk_logits_grad` may overwrite.
        """
        n = b - a
        z = logits[a:b] if self.z is None else self.z[:n].copy_(logits[a:b])
        if self.transform is not None:
            self.transform.apply_(z)
        return z, self.a[:n], self.b[:n]


def _chunk_stats(
    z: Tensor, log_p: Tensor, p: Tensor, targets: Tensor, ignore_index: int, entropy: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[n]`` of one chunk of logits ``z`` ``[n, V]`` (compute dtype, never written).

    ``log_p`` and ``p`` are ``[n, V]`` scratch buffers of the compute dtype (overwritten). Rows
    whose target is ``ignore_index`` get ``logp = entropy = 0``; their ``lse`` is whatever
    their logits give (NaN included) and must not be used. ``entropy=False`` skips the
    softmax and returns zeros for the entropy. Shared by :class:`_TokenStats` and the fused
    linear path (:mod:`rcpo_losses.fused_linear`).
    """
    V = z.shape[1]
    valid = targets != ignore_index
    in_range = valid & (targets >= 0) & (targets < V)
    safe = _safe_targets(targets, valid, V)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # torch's fused (log_)softmax kernels: about twice as fast on CPU as logsumexp + exp.
    torch.log_softmax(z, dim=-1, out=log_p)
    # lse = z_v - log p_v for every v; at the largest logit, log p_v = -log sum exp(z - max) is in
    # [-log V, 0], so max(z) - max(log p) has no cancellation (and amax is cheap, unlike argmax).
    lse = z.amax(dim=-1) - log_p.amax(dim=-1)
    logp = torch.where(in_range, log_p.gather(1, safe[:, None]).squeeze(1), torch.nan)
    if entropy:
        torch.exp(log_p, out=p)  # one pass, where softmax(z) would take three
        ent = torch.where(valid, -p.mul_(log_p.clamp_(min=_LOG_P_FLOOR)).sum(-1), zero)
    else:
        ent = torch.zeros_like(lse)
    return torch.where(valid, logp, zero), ent, lse


def _chunk_logits_grad(
    z: Tensor,
    log_p: Tensor,
    p: Tensor,
    targets: Tensor,
    ignore_index: int,
    lse: Tensor,
    ent: Tensor,
    g_logp: Tensor,
    g_ent: Tensor | None,
    transform: LogitTransform | None = None,
    g_lse: Tensor | None = None,
) -> Tensor:
    """Gradient ``[n, V]`` of ``sum(g_logp * logp + g_ent * entropy)`` w.r.t. one chunk of logits ``z``.

    With a ``transform``, ``z`` holds the transformed logits ``z'`` (a buffer, overwritten
    here with ``dz'/dz``) and the gradient is w.r.t. the logits before the transform.
    ``g_lse`` (``[n]``, optional): the gradient of the per-row ``lse`` too, ``+ g_lse p``.

    ``dL/dz_v = g_logp (1{v = t} - p_v) - g_ent p_v (log p_v + H)``, with ``log p = z - lse``
    from the forward's ``lse`` and ``H`` (``[n]``). Formed in place in ``log_p``'s buffer,
    which is returned; ``p`` is scratch. ``g_logp``, ``g_ent`` are ``[n]`` in the compute
    dtype; ``g_ent=None`` drops the entropy term (``ent`` is then not read). Ignored rows get
    0 even if their logits hold NaN. Shared by :class:`_TokenStats` and the fused linear path.
    """
    V = z.shape[1]
    valid = targets != ignore_index
    safe = _safe_targets(targets, valid, V)
    gl = g_logp[:, None]
    gp = gl if g_lse is None else (g_logp - g_lse)[:, None]  # the weight of the -p term
    torch.softmax(z, dim=-1, out=p)
    if g_ent is None:
        g = torch.mul(p, gp, out=log_p).neg_()  # -p * g_logp
    else:
        torch.sub(z, lse[:, None], out=log_p)
        # -p * (g_logp + g_ent * (log p + H)), in place in log_p's buffer
        g = log_p.clamp_(min=_LOG_P_FLOOR).add_(ent[:, None]).mul_(g_ent[:, None]).add_(gp).mul_(p).neg_()
    g.scatter_add_(1, safe[:, None], gl)  # + g_logp * onehot(t)
    if transform is not None:
        g.mul_(transform.derivative_(z))  # chain rule through z' = transform(z)
    g.masked_fill_(~valid[:, None], 0)  # ignored rows: 0 even if their logits hold NaN
    return g


def _tile_logits_grad(
    z: Tensor,
    log_p: Tensor,
    p: Tensor,
    col: int,
    targets: Tensor,
    ignore_index: int,
    lse: Tensor,
    ent: Tensor,
    g_logp: Tensor,
    g_ent: Tensor | None,
    transform: LogitTransform | None = None,
    g_lse: Tensor | None = None,
) -> Tensor:
    """:func:`_chunk_logits_grad` for a tile of vocabulary columns ``col:col + w`` of ``n`` rows: ``[n, w]``.

    The tile does not hold whole rows, so ``p = exp(z - lse)`` comes from the forward's
    ``lse`` instead of a softmax, and the one-hot term lands only in the rows whose target
    is in the tile. ``z``: the tile's logits, in any float dtype (a bf16 GEMM's output is
    read as it is); with a ``transform``, the transformed logits in the compute dtype, which
    are overwritten. ``log_p``, ``p``: compute-dtype scratch; the gradient is formed in
    ``log_p``'s buffer and returned.
    """
    w = z.shape[1]
    valid = targets != ignore_index
    gp = g_logp if g_lse is None else g_logp - g_lse  # the weight of the -p term
    torch.sub(z, lse[:, None], out=log_p).clamp_(min=_LOG_P_FLOOR)
    torch.exp(log_p, out=p)
    if g_ent is None:
        g = torch.mul(p, -gp[:, None], out=log_p)  # -p * g_logp
    else:
        # -p * (g_logp + g_ent * (log p + H)), in place in log_p's buffer
        g = log_p.add_(ent[:, None]).mul_(-g_ent[:, None]).sub_(gp[:, None]).mul_(p)
    local = targets - col
    hit = valid & (local >= 0) & (local < w)
    g.scatter_add_(1, local.clamp(0, max(w - 1, 0))[:, None], torch.where(hit, g_logp, 0.0)[:, None])
    if transform is not None:
        g.mul_(transform.derivative_(z))  # chain rule through z' = transform(z)
    if z.device.type != "cpu" or not bool(valid.all()):  # a free check on the CPU, where this runs
        g.masked_fill_(~valid[:, None], 0)  # ignored rows: 0 even if their lse is NaN
    return g


class _TokenStats(torch.autograd.Function):
    """Chunked PyTorch path: ``[N, V]`` logits, ``[N]`` targets -> ``[N]`` logp, entropy, lse (all differentiable).

    Forward and backward both walk ``chunk`` rows at a time in a :class:`_Workspace` of
    three fp32 ``chunk x V`` buffers (two when the logits are fp32/fp64 already), through
    :func:`_chunk_stats` and :func:`_chunk_logits_grad`. Saved for the backward: the
    logits (no copy) and the per-row ``lse`` and entropy, ``O(N)``.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, ignore_index: int, chunk: int, transform: LogitTransform | None
    ) -> tuple[Tensor, Tensor]:
        N, V = logits.shape
        dtype = _compute_dtype(logits.dtype)
        logp = torch.empty(N, dtype=dtype, device=logits.device)
        ent = torch.empty(N, dtype=dtype, device=logits.device)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        work = _Workspace(logits, chunk, dtype, transform)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            z, log_p, p = work.rows(logits, a, b)
            logp[a:b], ent[a:b], lse[a:b] = _chunk_stats(z, log_p, p, targets[a:b], ignore_index)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.ignore_index = ignore_index
        ctx.chunk = chunk
        ctx.transform = transform
        return logp, ent, lse

    @staticmethod
    @first_order_only("token_logps_and_entropy")
    def backward(ctx, g_logp: Tensor, g_ent: Tensor, g_lse: Tensor) -> tuple[Tensor, None, None, None, None]:
        logits, targets, lse, ent = ctx.saved_tensors
        N, V = logits.shape
        dtype = lse.dtype
        valid = targets != ctx.ignore_index
        zero = torch.zeros((), dtype=dtype, device=logits.device)
        g_logp = torch.where(valid, g_logp.to(dtype), zero)
        g_ent = torch.where(valid, g_ent.to(dtype), zero)
        g_lse = torch.where(valid, g_lse.to(dtype), zero)
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        work = _Workspace(logits, ctx.chunk, dtype, ctx.transform)
        for a in range(0, N, ctx.chunk):
            b = min(a + ctx.chunk, N)
            z, log_p, p = work.rows(logits, a, b)
            grad[a:b] = _chunk_logits_grad(
                z,
                log_p,
                p,
                targets[a:b],
                ctx.ignore_index,
                lse[a:b],
                ent[a:b],
                g_logp[a:b],
                g_ent[a:b],
                ctx.transform,
                g_lse[a:b],
            )
        return grad, None, None, None, None


def _token_stats_reference(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, transform: LogitTransform | None = None
) -> tuple[Tensor, Tensor]:
    """The plain formulas, on the whole ``[..., V]`` tensor at once (the specification; memory-hungry)."""
    dtype = _compute_dtype(logits.dtype)
    z = logits.to(dtype)
    log_p = torch.log_softmax(z if transform is None else transform.reference(z), dim=-1)
    valid = targets != ignore_index
    logp = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * log_p.clamp(min=_LOG_P_FLOOR)).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


def _check_token_inputs(logits: Tensor, targets: Tensor, ignore_index: int, validate: bool) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected (*, V) with V >= 1, got shape {tuple(logits.shape)}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} must be logits' shape without the vocabulary dim, "
            f"logits are {tuple(logits.shape)}"
        )
    if logits.device != targets.device:
        raise ValueError(f"targets: on {targets.device}, logits on {logits.device}")
    _check_target_ids(targets, logits.shape[-1], ignore_index, validate)


def _check_target_ids(targets: Tensor, V: int, ignore_index: int, validate: bool) -> None:
    """Every target is ``ignore_index`` or a token id in ``[0, V)`` (a device sync; skipped unvalidated)."""
    if not should_sync(validate) or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets{list(idx)}: token id {int(targets[idx])} is outside [0, {V}) and not ignore_index={ignore_index}"
        )


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
            :mod:`rcpo_losses.vocab_parallel`.

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
    if process_group is not None:
        from . import vocab_parallel as vp

        offset, total = vp.vocab_offset(V, process_group, z.device)
        _check_target_ids(t, total, ignore_index, validate)
        local, owned = vp.local_targets(t, offset, V, ignore_index)
        if _backend.use_triton(backend, logits):
            from .token_ops import token_stats

            args = () if transform is None else transform.args()
            stats = token_stats(z, local.contiguous(), ignore_index, 0, *args)
        else:
            stats = _TokenStats.apply(z, local, ignore_index, _chunk_rows(chunk_size, V), transform)
        logp, ent = vp.combine(*stats, owned, t != ignore_index, process_group)
        return logp.reshape(shape), ent.reshape(shape)
    if _backend.use_triton(backend, logits):
        from .token_ops import token_logps_and_entropy_triton

        logp, ent = token_logps_and_entropy_triton(z, t.contiguous(), ignore_index, transform=transform)
    else:
        logp, ent, _ = _TokenStats.apply(z, t, ignore_index, _chunk_rows(chunk_size, V), transform)
    return logp.reshape(shape), ent.reshape(shape)


class ResponseTokenStats(NamedTuple):
    """Per-response sums over completion tokens; see :func:`response_token_stats`."""

    logps: Tensor  # sum_t log p(y_t | x, y_<t): the sequence log-prob of eq. 2
    entropy_sums: Tensor  # sum_t H_t
    lengths: Tensor  # number of completion tokens (int64)


def _completion_targets(
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
    check_positive_int("num_responses", num_responses, "responses per prompt")
    targets, valid = _completion_targets(labels, mask, ignore_index, shift_labels)
    logp, ent = token_logps_and_entropy(
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
    return _response_sums(logp, ent, valid, num_responses, "logits", logits.shape)


def _response_sums(
    logp: Tensor, ent: Tensor, valid: Tensor, num_responses: int | None, name: str, shape: torch.Size
) -> ResponseTokenStats:
    """Per-response sums of per-token ``(*, T)`` log-probs and entropies, and the lengths.

    ``name`` and ``shape`` (the input the tokens came from) only word the error message.
    """
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
