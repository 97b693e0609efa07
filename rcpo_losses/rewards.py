"""Implicit rewards: the utilities that the choice models rank (paper eq. 2 and variants)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: losses never do arithmetic in half precision."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def implicit_rewards(
    policy_logps: Tensor,
    ref_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    lengths: Tensor | None = None,
    length_normalize: bool = False,
    length_penalty: float = 0.0,
) -> Tensor:
    r"""Implicit reward of each response under the policy.

    .. math::
        r = \beta \log \frac{\pi_\theta(y|x)}{\pi_\text{ref}(y|x)}
            \quad\text{(eq. 2)},\qquad
        r = \frac{\beta}{|y|} \log \frac{\pi_\theta(y|x)}{\pi_\text{ref}(y|x)}
            \quad\text{(length_normalize, SimPO)},\qquad
        r = \beta \log \frac{\pi_\theta}{\pi_\text{ref}} - \alpha |y|
            \quad\text{(length_penalty} = \alpha\text{, R-DPO)}.

    ``ref_logps=None`` drops the reference (SimPO is ``ref_logps=None,
    length_normalize=True``). The constant ``beta log Z(x)`` of eq. 2 is shared by the
    responses of a prompt and cancels in every choice model, so it is left out.

    Args:
        policy_logps: summed log-probs of each response under the policy.
        ref_logps: the same under the reference model, or ``None``.
        beta: the KL strength, > 0.
        lengths: response lengths in tokens, needed by ``length_normalize`` and
            ``length_penalty``.

    Shape:
        - policy_logps, ref_logps, lengths: ``(*)``, usually ``(B, S)``.
        - output: ``(*)`` in fp32 (fp64 for fp64 inputs).
    """
    dtype = compute_dtype(policy_logps, ref_logps)
    logratio = policy_logps.to(dtype)
    if ref_logps is not None:
        logratio = logratio - ref_logps.to(dtype)
    if (length_normalize or length_penalty) and lengths is None:
        raise ValueError("lengths: required by length_normalize and length_penalty")
    if length_normalize:
        logratio = logratio / lengths.to(dtype)
    rewards = beta * logratio
    if length_penalty:
        rewards = rewards - length_penalty * lengths.to(dtype)
    return rewards
