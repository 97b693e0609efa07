"""``torch.nn.Module`` faces of the six RCPO losses, like ``torch.nn.CrossEntropyLoss``.

Hyperparameters (``beta``, ``reduction``, ``backend``, ``validate``) go to the constructor,
tensors to ``forward``, which takes them exactly as the functional form does (including
``neg_log_phi`` for the Mallows losses) and returns the function's result bitwise::

    loss_fn = MallowsRMJTopKLoss(beta=0.01)
    loss = loss_fn(policy_logps, ref_logps, ranks, neg_log_phi=neg_log_phi)
"""

from __future__ import annotations

from torch import Tensor, nn

from . import checks
from .mallows import mallows_rmj_discrete, mallows_rmj_pairwise, mallows_rmj_topk
from .mnl import mnl_discrete, mnl_pairwise, mnl_topk

__all__ = [
    "MNLPairwiseLoss",
    "MNLDiscreteLoss",
    "MNLTopKLoss",
    "MallowsRMJPairwiseLoss",
    "MallowsRMJDiscreteLoss",
    "MallowsRMJTopKLoss",
]


class _RCPOLoss(nn.Module):
    """The settings every loss shares; ``forward`` calls the functional form with them."""

    def __init__(self, beta: float = 0.1, reduction: str = "mean", backend: str = "auto", validate: bool = True):
        super().__init__()
        checks.check_positive("beta", beta)
        checks.check_reduction(reduction)
        self.beta = beta
        self.reduction = reduction
        self.backend = backend
        self.validate = validate

    def _settings(self) -> dict:
        return {"beta": self.beta, "reduction": self.reduction, "backend": self.backend, "validate": self.validate}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self._settings().items())


class MNLTopKLoss(_RCPOLoss):
    """MNL-PO-Top-k (Theorem 2, eq. 8): :func:`rcpo_losses.mnl_topk` as a module.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(self, policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor) -> Tensor:
        return mnl_topk(policy_logps, ref_logps, ranks, **self._settings())


class MNLDiscreteLoss(_RCPOLoss):
    """MNL-PO-Discrete (Theorem 1, eq. 7): :func:`rcpo_losses.mnl_discrete` as a module.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(self, policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor) -> Tensor:
        return mnl_discrete(policy_logps, ref_logps, ranks, **self._settings())


class MNLPairwiseLoss(_RCPOLoss):
    """DPO (eq. 3): :func:`rcpo_losses.mnl_pairwise` as a module.

    Shape:
        - each input: ``(B,)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
    ) -> Tensor:
        return mnl_pairwise(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **self._settings()
        )


class MallowsRMJTopKLoss(_RCPOLoss):
    """Mallows-RMJ-PO-Top-k (Theorem 4, eq. 12): :func:`rcpo_losses.mallows_rmj_topk` as a module.

    ``neg_log_phi`` (a float or a ``(B,)`` tensor, usually :func:`rcpo_losses.entropy_dispersion`)
    is a per-batch input, so it goes to ``forward``.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(
        self, policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor, neg_log_phi: float | Tensor = 1.0
    ) -> Tensor:
        return mallows_rmj_topk(policy_logps, ref_logps, ranks, neg_log_phi=neg_log_phi, **self._settings())


class MallowsRMJDiscreteLoss(_RCPOLoss):
    """Mallows-RMJ-PO-Discrete (Theorem 3, eq. 10): :func:`rcpo_losses.mallows_rmj_discrete` as a module.

    Shape:
        - policy_logps, ref_logps, ranks: ``(B, S)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(
        self, policy_logps: Tensor, ref_logps: Tensor | None, ranks: Tensor, neg_log_phi: float | Tensor = 1.0
    ) -> Tensor:
        return mallows_rmj_discrete(policy_logps, ref_logps, ranks, neg_log_phi=neg_log_phi, **self._settings())


class MallowsRMJPairwiseLoss(_RCPOLoss):
    """Mallows-RMJ pairwise (Theorem 5, eq. 14): :func:`rcpo_losses.mallows_rmj_pairwise` as a module.

    Shape:
        - each input: ``(B,)``; neg_log_phi: float or ``(B,)``; output: scalar, or ``(B,)`` for ``"none"``.
    """

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        neg_log_phi: float | Tensor = 1.0,
    ) -> Tensor:
        return mallows_rmj_pairwise(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            neg_log_phi=neg_log_phi,
            **self._settings(),
        )
