"""The Mallows dispersion weight ``-log phi(x)`` from token entropies (paper appendix D)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ranks import in_assortment


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

    Shape:
        - entropy_sums, lengths, ranks: ``(B, S)``; output: ``(B,)`` fp32 (fp64 for fp64).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size: must be >= 2 (log V is the normaliser), got {vocab_size}")
    if variant not in ("rcpo", "mallowspo"):
        raise ValueError(f"variant: expected 'rcpo' or 'mallowspo', got {variant!r}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio: must be in (0, 1], got {min_ratio}")
    if entropy_sums.shape != ranks.shape or lengths.shape != ranks.shape:
        raise ValueError(
            f"entropy_sums, lengths: shapes {tuple(entropy_sums.shape)}, {tuple(lengths.shape)} "
            f"must match ranks {tuple(ranks.shape)}"
        )
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
