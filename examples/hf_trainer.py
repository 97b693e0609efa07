"""RCPO inside a `transformers.Trainer`: override `compute_loss`, keep the rest.

python examples/hf_trainer.py --loss mnl --steps 20
python examples/hf_trainer.py --loss mnl --steps 20 --fused-linear   # no [B*S, L, V] logits
"""

from __future__ import annotations

import tempfile

import torch
from ranked import parse_example_args, policy_reference_batch, rcpo_loss
from transformers import Trainer, TrainingArguments


class RankedDataset(torch.utils.data.Dataset):
    """One item per prompt: its S responses ``[S, L]`` and ranks ``[S]``."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return self.batch["ranks"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.batch.items()}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class RankedTrainer(Trainer):
    """A Trainer whose loss is an RCPO objective on ranked responses."""

    def __init__(
        self,
        *args,
        reference_model,
        rcpo_loss_name: str = "mallows",
        beta: float = 0.1,
        fused_linear: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.reference_model = reference_model
        self.rcpo_loss_name = rcpo_loss_name
        self.beta = beta
        self.fused_linear = fused_linear
        self.loss_history: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = rcpo_loss(
            model,
            self.reference_model,
            inputs,
            loss=self.rcpo_loss_name,
            beta=self.beta,
            fused_linear=self.fused_linear,
        )
        self.loss_history.append(loss.item())
        return (loss, metrics) if return_outputs else loss


def train(
    steps: int = 20,
    loss: str = "mallows",
    beta: float = 0.5,
    lr: float = 3e-3,
    seed: int = 0,
    fused_linear: bool = False,
) -> list[float]:
    """Train on one fixed batch of 8 prompts; returns the loss at every step.

    ``fused_linear=True``: log-probs and entropies from the final hidden states and the LM
    head (`fused_linear_response_stats`), never forming the logits.
    """
    policy, reference, batch = policy_reference_batch(seed)
    data = RankedDataset(batch)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=len(data),
            learning_rate=lr,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            weight_decay=0.0,
            logging_steps=max(1, steps // 5),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=seed,
            remove_unused_columns=False,
            dataloader_drop_last=False,
        )
        trainer = RankedTrainer(
            model=policy,
            args=args,
            train_dataset=data,
            data_collator=collate,
            reference_model=reference,
            rcpo_loss_name=loss,
            beta=beta,
            fused_linear=fused_linear,
        )
        trainer.train()
    return trainer.loss_history


def main(argv: list[str] | None = None) -> None:
    history = train(**vars(parse_example_args(__doc__, argv)))
    print(f"loss {history[0]:.4f} -> {history[-1]:.4f}")


if __name__ == "__main__":
    main()
