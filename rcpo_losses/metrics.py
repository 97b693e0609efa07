"""What a trainer logs: how well the implicit rewards agree with the observed rankings."""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import checked_rewards, clean_rewards
from .ranks import UNRANKED, in_assortment, valid_rows


@torch.no_grad()
def ranking_metrics(
    rewards: Tensor, ranks: Tensor, *, validate: bool = True, reduction: str = "mean"
) -> dict[str, Tensor]:
    """Accuracies and margins of rewards against top-k feedback, averaged over valid rows.

    - ``top1_accuracy``: the pick ``y_1`` has the strictly highest reward of its row.
    - ``pairwise_accuracy``: share of the pairs implied by the list (``y_i > y_j`` for
      ``i < j``, ``y_i > u`` for unranked ``u``) whose rewards are strictly in order.
    - ``top_reward``, ``other_reward``: mean reward of ``y_1`` and of the other responses.
    - ``margin``: ``top_reward - other_reward``, per row then averaged.

    ``ranks`` and ``rewards`` are checked as by the losses (``validate=True``: one device
    sync per check); unvalidated, rows that are not valid top-k lists are left out.

    ``reduction="none"`` gives each row's value instead of the mean (0 in the rows left out:
    ``rcpo_losses.ranks.valid_rows`` says which count), so that means over several batches can
    weight every row alike (a mean of batch means does not, unless the batches are equal).

    Shape:
        - rewards, ranks: ``(B, S)``; each output is a detached fp32 (fp64) tensor, 0-dim, or
          ``(B,)`` with ``reduction="none"``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")
    r, ranks = checked_rewards(rewards, ranks, "none", validate)
    r = clean_rewards(r, ranks)
    present = in_assortment(ranks)
    valid = valid_rows(ranks)
    top = ranks == 0
    others = present & ~top
    r_top = torch.where(top, r, 0.0).sum(-1)
    best_other = torch.where(others, r, -torch.inf).amax(-1)
    n_other = others.sum(-1).clamp(min=1)
    # means as sums of x / n: a sum of large finite rewards must not overflow before the division
    mean_other = torch.where(others, r / n_other[:, None], 0.0).sum(-1)
    ranked = ranks >= 0
    implied = (
        ranked[:, :, None]
        & present[:, None, :]
        & ((ranks[:, None, :] == UNRANKED) | (ranks[:, :, None] < ranks[:, None, :]))
    )
    correct = implied & (r[:, :, None] > r[:, None, :])
    pair_acc = correct.sum((-1, -2)).to(r.dtype) / implied.sum((-1, -2)).clamp(min=1)  # fp64 stays fp64

    def mean(x: Tensor) -> Tensor:
        if reduction == "none":
            return torch.where(valid, x.to(r.dtype), 0.0)
        return torch.where(valid, x.to(r.dtype) / valid.sum().clamp(min=1), 0.0).sum()

    return {
        "top1_accuracy": mean(r_top > best_other),
        "pairwise_accuracy": mean(pair_acc),
        "top_reward": mean(r_top),
        "other_reward": mean(mean_other),
        "margin": mean(r_top - mean_other),
    }
