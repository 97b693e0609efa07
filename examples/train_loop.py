"""A plain PyTorch training loop with an RCPO loss on a tiny causal LM.

python examples/train_loop.py --loss mallows --steps 20
python examples/train_loop.py --loss mallows --steps 20 --fused-linear   # no [B*S, L, V] logits
"""

from __future__ import annotations

import argparse

import torch
from ranked import frozen_copy, make_ranked_batch, rcpo_loss, tiny_llama


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
    policy = tiny_llama(seed=seed)
    reference = frozen_copy(policy)
    batch = make_ranked_batch(seed=seed)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=["mallows", "mnl"], default="mallows")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fused-linear",
        action="store_true",
        help="log-probs and entropies from the final hidden states and the LM head, without the logits",
    )
    args = parser.parse_args(argv)
    train(args.steps, args.loss, args.beta, args.lr, args.seed, fused_linear=args.fused_linear)


if __name__ == "__main__":
    main()
