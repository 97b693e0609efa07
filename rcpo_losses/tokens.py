"""From tokens to responses: per-response log-probs out of per-token log-probs."""

from __future__ import annotations

import torch
from torch import Tensor


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
