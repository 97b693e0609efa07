"""A plain PyTorch training loop with an RCPO loss on a tiny causal LM.

python examples/train_loop.py --loss mallows --steps 20
python examples/train_loop.py --loss mallows --steps 20 --fused-linear   # no [B*S, L, V] logits
"""

from __future__ import annotations

import torch
from ranked import parse_example_args, policy_reference_batch, rcpo_loss


def train(
    steps: int = 20,
    loss: str = "mallows",
    beta: float = 0.5,
    lr: float = 3e-3,
    seed: int = 0,
    fused_linear: bool = False,
) -> list[float]:
    """Train on one fixed batch; returns the loss at every step.

    ``fused_linear=True``: log-probs and entropies from the final hidden states and the LM
    head (`fused_linear_response_stats`), never forming the logits.
    """
    policy, reference, batch = policy_reference_batch(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    history = []
    for step in range(steps):
        value, metrics = rcpo_loss(policy, reference, batch, loss=loss, beta=beta, fused_linear=fused_linear)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        history.append(value.item())
        print(f"step {step:3d}  loss {value.item():.4f}  pairwise acc {metrics['pairwise_accuracy'].item():.2f}")
    return history


def main(argv: list[str] | None = None) -> None:
    train(**vars(parse_example_args(__doc__, argv)))


if __name__ == "__main__":
    main()
