"""PyTorch twin of the Triton kernel ``rcpo_losses.kernels.token_stats``: per-token log-prob and entropy.

The specification of the token statistics, and the CPU path:

- :func:`token_stats_reference`: the plain formulas (``log_softmax``, ``gather``,
  ``softmax * log_softmax``) on the whole ``[N, V]`` tensor, what every fast path is tested against;
- :class:`TokenStats`: the same in one chunked pass, ``chunk`` rows at a time through
  :func:`chunk_stats` and :func:`chunk_logits_grad`, so that no full fp32 copy of the logits is
  made. The fused LM-head path (:mod:`rcpo_losses.ops.fused_linear`) runs the same chunk math;
- :class:`LogitTransform`: the model's output transform ``softcap * tanh(logit_scale * z / softcap) / temperature``
  that the kernel applies inside its pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import first_order_only

# Elements per chunk buffer of the PyTorch path (fp32: 4 MiB each; a pass holds three).
CHUNK_ELEMENTS = 1 << 20
# Below this shifted log-prob, exp() is exactly 0 even in fp64 (exp(-745) underflows): clamping
# log p there keeps p * log p (and p * (log p + H) * g) at 0 instead of 0 * inf = NaN.
LOG_P_FLOOR = -1e4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(chunk_size: int | None, V: int) -> int:
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

    def derivative(self, zt: Tensor) -> Tensor | float:
        """:meth:`derivative_` out of place."""
        a, c, T = self.logit_scale, self.softcap, self.temperature
        return a / T if c is None else (a / T) * (1.0 - (zt * (T / c)).square())

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


class Workspace:
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
        :func:`chunk_logits_grad` may overwrite.
        """
        n = b - a
        z = logits[a:b] if self.z is None else self.z[:n].copy_(logits[a:b])
        if self.transform is not None:
            self.transform.apply_(z)
        return z, self.a[:n], self.b[:n]


def chunk_stats(
    z: Tensor, log_p: Tensor, p: Tensor, targets: Tensor, ignore_index: int, entropy: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[n]`` of one chunk of logits ``z`` ``[n, V]`` (compute dtype, never written).

    ``log_p`` and ``p`` are ``[n, V]`` scratch buffers of the compute dtype (overwritten). Rows
    whose target is ``ignore_index`` get ``logp = entropy = 0``; their ``lse`` is whatever
    their logits give (NaN included) and must not be used. ``entropy=False`` skips the
    softmax and returns zeros for the entropy. Shared by :class:`TokenStats` and the fused
    linear path (:mod:`rcpo_losses.ops.fused_linear`).
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
        ent = torch.where(valid, -p.mul_(log_p.clamp_(min=LOG_P_FLOOR)).sum(-1), zero)
    else:
        ent = torch.zeros_like(lse)
    return torch.where(valid, logp, zero), ent, lse


def chunk_logits_grad(
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
    0 even if their logits hold NaN. Shared by :class:`TokenStats` and the fused linear path.
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
        g = log_p.clamp_(min=LOG_P_FLOOR).add_(ent[:, None]).mul_(g_ent[:, None]).add_(gp).mul_(p).neg_()
    g.scatter_add_(1, safe[:, None], gl)  # + g_logp * onehot(t)
    if transform is not None:
        g.mul_(transform.derivative_(z))  # chain rule through z' = transform(z)
    g.masked_fill_(~valid[:, None], 0)  # ignored rows: 0 even if their logits hold NaN
    return g


def tile_local_targets(targets: Tensor, col: int, valid: Tensor) -> Tensor:
    """The targets' columns in the tile that starts at vocabulary column ``col``; ``-1`` for ignored rows.

    A target in another tile is out of ``[0, w)`` too, so the tile functions need no column offset
    or ``ignore_index`` (which, as Python ints, a compiled function would be specialized on).
    """
    return torch.where(valid, targets - col, -1)


def tile_stats(z: Tensor, local: Tensor, transform: LogitTransform | None) -> Tensor:
    r"""Partial statistics ``[4, n]`` of one tile of vocabulary columns: ``(m, s, t, z_t)``.

    For each row of the tile's logits ``z`` ``[n, w]`` (any float dtype; transformed here, out of place):

        m = max_v z_v,   s = \sum_v e^{z_v - m},   t = \sum_v e^{z_v - m} (z_v - m),

    and ``z_t`` the target's logit where the target lies in the tile, ``local`` (from
    :func:`tile_local_targets`) in ``[0, w)``; ``-inf`` elsewhere. A row
    whose tile is all ``-inf`` has no mass: ``s = t = 0``. :func:`combine_tiles` merges the tiles of
    a row. Pure (no argument is written), so that it runs as it is or compiled
    (:func:`rcpo_losses.ops.backend.cpu_tile_step`).
    """
    zf = z.to(compute_dtype(z.dtype))
    if transform is not None:
        zf = transform.reference(zf)
    w = zf.shape[1]
    m = zf.amax(dim=1)
    d = zf - torch.where(m == -torch.inf, 0.0, m)[:, None]
    e = torch.exp(d)
    s = e.sum(dim=1)
    t = (e * d.clamp(min=LOG_P_FLOOR)).sum(dim=1)  # 0 * (-inf) would be NaN where e underflows
    hit = (local >= 0) & (local < w)
    z_t = zf.gather(1, local.clamp(0, max(w - 1, 0))[:, None]).squeeze(1)
    return torch.stack([m, s, t, torch.where(hit, z_t, -torch.inf)])


def combine_tiles(stats: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(logp, entropy, lse)`` ``[n]`` from the :func:`tile_stats` of every tile of a row, ``stats`` ``[4, K, n]``.

    The online-softmax merge, with ``M = max_k m_k``, ``\delta_k = m_k - M`` and ``S = \sum_k e^{\delta_k} s_k``:

        lse = M + \log S,   \log p_t = (z_t - M) - \log S,
        H = \log S - \sum_k e^{\delta_k} (t_k + \delta_k s_k) / S.

    The shift is the largest logit itself, not a tile's ``lse`` (as :mod:`rcpo_losses.tokens.vocab_parallel`
    merges ranks): ``z_t - M`` is exact where both are large (logits of 1e4 in fp32), and every term
    of ``H`` is ``>= 0``, so nothing cancels. Rows whose target is ignored get ``logp = H = 0``.
    """
    m, s, t, z_t = stats
    top = m.amax(dim=0)
    top = torch.where(top == -torch.inf, 0.0, top)  # a row with every logit -inf: NaN below, as log_softmax gives
    delta = (m - top).clamp(min=LOG_P_FLOOR)  # a tile with no mass: e^delta = 0, and delta * s = 0, not NaN
    scale = torch.exp(delta)
    total = (scale * s).sum(dim=0)
    log_s = torch.log(total)
    logp = (z_t.amax(dim=0) - top) - log_s
    ent = log_s - (scale * (t + delta * s)).sum(dim=0) / total
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero), top + log_s


def tile_logits_grad(
    z: Tensor,
    local: Tensor,
    valid: Tensor | None,
    lse: Tensor,
    ent: Tensor,
    g_logp: Tensor,
    g_ent: Tensor | None,
    transform: LogitTransform | None,
    g_lse: Tensor | None,
    out_dtype: torch.dtype,
    work: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`chunk_logits_grad` for a tile of ``w`` vocabulary columns of ``n`` rows: ``[n, w]``.

    The tile does not hold whole rows, so ``p = exp(z - lse)`` comes from the forward's ``lse``
    instead of a softmax. The one-hot term ``+ g_logp 1{v = t}`` is added to the target's entry
    in the compute dtype, before the one rounding to ``out_dtype``: the target column is
    formed on its own (``[n, 1]``) and written over the tile's. ``z``: the tile's logits, in any
    float dtype (a bf16 GEMM's output is read as it is; never written). ``local``: the targets'
    columns in the tile (:func:`tile_local_targets`). ``valid``: None when no target is ignored,
    else the rows to keep (the others are 0 even if their ``lse`` is NaN). Pure (no
    argument is written) when ``work`` is None, so that it compiles
    (:func:`rcpo_losses.ops.backend.cpu_tile_step`); eagerly, ``work`` holds two compute-dtype
    scratch tiles and a tile in ``out_dtype`` for the result, which may be ``z``'s own buffer.
    """
    w = z.shape[1]
    gp = g_logp if g_lse is None else g_logp - g_lse  # the weight of the -p term

    def grad(zc: Tensor, onehot: Tensor | None = None, work=None) -> Tensor:  # -p (g_logp + g_ent (log p + H)) + onehot
        # In place only on fresh tensors or on ``work`` (eager): compiled, the passes fuse into one loop.
        zt = zc if transform is None else transform.reference(zc.to(lse.dtype))
        log_p = torch.sub(zt, lse[:, None], out=None if work is None else work[0])  # bf16 - fp32: fp32, no copy
        log_p.clamp_(min=LOG_P_FLOOR)
        p = torch.exp(log_p, out=None if work is None else work[1])
        if g_ent is None:
            g = p.mul_(-gp[:, None])
        else:
            g = log_p.add_(ent[:, None]).mul_(g_ent[:, None]).add_(gp[:, None]).mul_(p).neg_()
        if onehot is not None:
            g.add_(onehot)
        return g if transform is None else g.mul_(transform.derivative(zt))  # chain rule through z' = transform(z)

    hit = (local >= 0) & (local < w)
    index = local.clamp(0, max(w - 1, 0))[:, None]
    target_col = grad(z.gather(1, index), torch.where(hit, g_logp, 0.0)[:, None])
    g = grad(z, None, None if work is None else [x[: z.shape[0], :w] for x in work])
    if valid is not None:
        invalid = ~valid[:, None]
        g.masked_fill_(invalid, 0.0)
        target_col.masked_fill_(invalid, 0.0)
    low = work is not None and g.dtype != out_dtype
    out = work[2][: z.shape[0], :w].copy_(g) if low else g.to(out_dtype)  # (the logits' buffer: read already)
    # index_put_, not scatter_: the CPU's bf16 scatter_ copied the whole tile (0.6 ms of 2048 x 1024)
    rows = torch.arange(out.shape[0], device=out.device)
    return out.index_put_((rows, index[:, 0]), target_col[:, 0].to(out_dtype))


class TokenStats(torch.autograd.Function):
    """Chunked PyTorch path: ``[N, V]`` logits, ``[N]`` targets -> ``[N]`` logp, entropy, lse (all differentiable).

    Forward and backward both walk ``chunk`` rows at a time in a :class:`Workspace` of
    three fp32 ``chunk x V`` buffers (two when the logits are fp32/fp64 already), through
    :func:`chunk_stats` and :func:`chunk_logits_grad`. Saved for the backward: the
    logits (no copy) and the per-row ``lse`` and entropy, ``O(N)``.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, ignore_index: int, chunk: int, transform: LogitTransform | None
    ) -> tuple[Tensor, Tensor]:
        N, V = logits.shape
        dtype = compute_dtype(logits.dtype)
        logp = torch.empty(N, dtype=dtype, device=logits.device)
        ent = torch.empty(N, dtype=dtype, device=logits.device)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        work = Workspace(logits, chunk, dtype, transform)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            z, log_p, p = work.rows(logits, a, b)
            logp[a:b], ent[a:b], lse[a:b] = chunk_stats(z, log_p, p, targets[a:b], ignore_index)
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
        work = Workspace(logits, ctx.chunk, dtype, ctx.transform)
        for a in range(0, N, ctx.chunk):
            b = min(a + ctx.chunk, N)
            z, log_p, p = work.rows(logits, a, b)
            grad[a:b] = chunk_logits_grad(
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


def token_stats_reference(
    logits: Tensor, targets: Tensor, ignore_index: int = -100, transform: LogitTransform | None = None
) -> tuple[Tensor, Tensor]:
    """The plain formulas, on the whole ``[..., V]`` tensor at once (the specification; memory-hungry)."""
    dtype = compute_dtype(logits.dtype)
    z = logits.to(dtype)
    log_p = torch.log_softmax(z if transform is None else transform.reference(z), dim=-1)
    valid = targets != ignore_index
    logp = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(log_p.exp() * log_p.clamp(min=LOG_P_FLOOR)).sum(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)
