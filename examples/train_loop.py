"""A plain PyTorch training loop with an RCPO loss on a tiny causal LM.

python examples/train_loop.py --loss mallows --steps 20
"""

from __future__ import annotations

import argparse

import torch
from ranked import frozen_copy, make_ranked_batch, rcpo_loss, tiny_llama


def train(steps: int = 20, loss: str = "mallows", beta: float = 0.5, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train on one fixed batch; returns the loss at every step."""
    policy = tiny_llama(seed=seed)
    reference = frozen_copy(policy)
    batch = make_ranked_batch(seed=seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    history = []
    for step in range(steps):
        value, metrics = rcpo_loss(policy, reference, batch, loss=loss, beta=beta)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        history.append(value.item())
        print(f"step {step:3d}  loss {value.item():.4f}  pairwise acc {metrics['pairwise_accuracy'].item():.2f}")
    return history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=["mallows", "mnl"], default="mallows")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(args.steps, args.loss, args.beta, args.lr, args.seed)


if __name__ == "__main__":
    main()
