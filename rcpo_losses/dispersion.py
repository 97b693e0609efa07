"""The Mallows dispersion weight ``-log phi(x)`` from token entropies (paper appendix D)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import should_sync
from .ranks import check_rank_tensor, in_assortment


def _check_arguments(entropy_sums, lengths, ranks, vocab_size, variant, scale, min_ratio, validate) -> None:
    check_rank_tensor(ranks)
    for name, x in (("entropy_sums", entropy_sums), ("lengths", lengths)):
        if not isinstance(x, Tensor) or x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"{name}: expected a real tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape != ranks.shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} does not match ranks {tuple(ranks.shape)}")
        if x.device != ranks.device:
            raise ValueError(f"{name}: on {x.device} but ranks is on {ranks.device}")
    if not entropy_sums.dtype.is_floating_point:
        raise TypeError(f"entropy_sums: expected a float tensor, got {entropy_sums.dtype}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size: must be an int >= 2 (log V is the normaliser), got {vocab_size!r}")
    if variant not in ("rcpo", "mallowspo"):
        raise ValueError(f"variant: expected 'rcpo' or 'mallowspo', got {variant!r}")
    for name, value, ok, rule in (
        ("scale", scale, lambda v: 0 <= v < math.inf, "finite and >= 0"),
        ("min_ratio", min_ratio, lambda v: 0 < v <= 1, "in (0, 1]"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
        if not ok(value):
            raise ValueError(f"{name}: must be {rule}, got {value}")
    if not should_sync(validate):
        return
    present = in_assortment(ranks)
    for name, x, rule in (
        ("entropy_sums", entropy_sums.detach(), "finite and >= 0 (sums of entropies)"),
        ("lengths", lengths, "finite and >= 0 (token counts)"),
    ):
        bad = present & ~(torch.isfinite(x) & (x >= 0))
        if bad.any():
            b, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{name}[{b}]: slot {j} is in the assortment but holds {x[b, j].item()}; must be {rule}")


def entropy_dispersion(
    entropy_sums: Tensor,
    lengths: Tensor,
    ranks: Tensor,
    vocab_size: int,
    *,
    variant: str = "rcpo",
    scale: float = 1.0,
    min_ratio: float = 1e-6,
    detach: bool = True,
    validate: bool = True,
) -> Tensor:
    r"""Entropy proxy of the Mallows dispersion weight ``-log phi(x)``, one per prompt.

    ``variant="rcpo"`` (appendix D, extended to ``|S|`` responses):

    .. math::
        w_b = -\log \frac{\sum_{i \in S_b} \sum_t H_{i,t}}{n_b\, N_b \log V},
        \qquad N_b = \max_{i \in S_b} |y_i|

    ``variant="mallowspo"`` (MallowsPO's code, eq. 15 with a scale ``c``):

    .. math::
        w_b = -c \log \Big(\frac{1}{n_b} \sum_{i \in S_b}
        \frac{\sum_t H_{i,t}}{|y_i| \log V}\Big)

    ``H_{i,t}`` is the entropy of the next-token distribution at completion token ``t``
    of response ``i`` (from :func:`token_logps_and_entropy`, usually under the reference
    model). The ratio lies in ``[0, 1]``; it is clamped to ``[min_ratio, 1]`` so that a
    prompt with zero entropy gets the finite weight ``-log(min_ratio)`` (times ``c``)
    rather than infinity, and rounding can never make the weight negative.

    Args:
        entropy_sums: per-response sums of token entropies over completion tokens.
        lengths: per-response number of completion tokens.
        ranks: the rank tensor; slots marked ``IGNORE`` are left out.
        vocab_size: ``V``.
        variant: ``"rcpo"`` or ``"mallowspo"``.
        scale: ``c`` (``"mallowspo"`` only; the ``"rcpo"`` weight has no scale).
        min_ratio: the clamp.
        detach: return a weight without gradient (the default: a weight, not a loss).
        validate: check that the entropy sums are finite and >= 0 and the lengths >= 0 on
            the assortment (one device sync; skipped under ``torch.compile``).

    Shape:
        - entropy_sums, lengths, ranks: ``(B, S)``; output: ``(B,)`` fp32 (fp64 for fp64).
    """
    _check_arguments(entropy_sums, lengths, ranks, vocab_size, variant, scale, min_ratio, validate)
    dtype = torch.float64 if entropy_sums.dtype == torch.float64 else torch.float32
    h = entropy_sums.detach() if detach else entropy_sums
    present = in_assortment(ranks)
    zero = torch.zeros((), dtype=dtype, device=h.device)
    h = torch.where(present, h.to(dtype), zero)
    length = torch.where(present, lengths.to(dtype), zero)
    n = present.sum(-1).clamp(min=1).to(dtype)
    log_v = math.log(vocab_size)
    if variant == "rcpo":
        longest = length.amax(-1).clamp(min=1)
        ratio = h.sum(-1) / (n * longest * log_v)
        scale = 1.0
    else:
        per_response = torch.where(present, h / length.clamp(min=1), zero) / log_v
        ratio = per_response.sum(-1) / n
    return -scale * torch.log(ratio.clamp(min_ratio, 1.0))
