"""RCPOTrainer itself on 2 gloo CPU processes equals 1 process on the same global batch.

The reference model is prepared by the trainer's accelerator (``prepare_reference_model``):
under DDP it is placed on the rank's device, unwrapped, once per rank; with precomputed
statistics there is none. At step 0 the policy equals the reference, so every reward is
exactly 0 and the loss its closed form. Under FSDP2 each rank holds its shard of the
reference (accelerate enables FSDP on accelerators only, so the accelerator's plugin is
applied directly here). One spawn runs every configuration, to pay the start-up once.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from .test_reference_model import LAYOUTS, check_step_zero  # noqa: E402

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
WORLD, STEPS, PER_RANK = 2, 3, 2
# 8 rows, 2 to 4 completions, top-2 lists: every step's global batch of 4 has the same rows on 1 or 2 processes.
TEXTS = ["apple apple .", "apple .", "river .", "stone stone .", "stone .", "cloud .", "green .", "cloud cloud ."]
ROWS = [
    {"prompt": f"repeat {w} times", "completions": TEXTS[i % 5 : i % 5 + 2 + i % 3], "ranking": [1, 0][: 1 + i % 2]}
    for i, w in enumerate(["apple", "stone", "cloud", "river", "green", "apple", "stone", "cloud"])
]

# An odd number of eval rows in batches of 2: on 2 processes the last batches repeat rows to even out the ranks.
EVAL_ROWS = ROWS[:5]

# (loss, fused_linear, precompute_ref)
CONFIGS = [("mallows_rmj_topk", False, False), ("mnl_topk", True, False), ("mallows_rmj_topk", True, True)]


def run(world: int, loss: str, fused: bool, precompute: bool, layout: str, out_dir: str):
    """``STEPS`` SGD steps of RCPOTrainer with a global batch of 4 rows; the trainer and its step-0 records."""
    sys.path.insert(0, EXAMPLES)
    from ranked import tiny_llama
    from train_rcpo import build_tokenizer
    from transformers import TrainingArguments

    from rcpo_losses import entropy_dispersion
    from rcpo_losses.training.trainer import RCPOTrainer

    class Recording(RCPOTrainer):
        records: list = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True)
            if not self.records:
                with torch.no_grad():
                    ref = self.reference_stats(model, inputs)
                phi = entropy_dispersion(ref.entropy_sums, ref.lengths, inputs["ranks"], self.vocab_size)
                self.records.append((type(model).__name__, loss.detach(), out["rewards"], inputs["ranks"], phi))
            return (loss, out) if return_outputs else loss

    tokenizer = build_tokenizer(ROWS)
    args = TrainingArguments(out_dir, max_steps=STEPS, per_device_train_batch_size=4 // world, learning_rate=0.05,
                             optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
                             dataloader_drop_last=True, per_device_eval_batch_size=2)  # fmt: skip
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    trainer = Recording(model, args=args, train_dataset=ROWS, eval_dataset=EVAL_ROWS, processing_class=tokenizer,
                        loss=loss, beta=0.5, k=2, fused_linear=fused, precompute_ref=precompute,
                        **LAYOUTS[layout])  # fmt: skip
    trainer.train()
    trainer.args.dataloader_drop_last = False  # (for the training batches) evaluate() sees all 5 rows
    trainer.eval_metrics = trainer.evaluate()
    return trainer


def check_fsdp2_shard(rank: int) -> None:
    """The FSDP2 reference: each rank holds half of it, and its statistics are the unsharded model's."""
    sys.path.insert(0, EXAMPLES)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from ranked import frozen_copy, make_ranked_batch, tiny_llama

    from rcpo_losses import response_stats
    from rcpo_losses.training.reference_model import prepare_reference_model, release_reference

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=None),
                                        device=torch.device("cpu"))  # fmt: skip
    plain = tiny_llama(seed=0).eval()
    total = sum(p.numel() for p in plain.parameters())
    ref = prepare_reference_model(frozen_copy(plain), accelerator)
    local = sum(p.to_local().numel() for p in ref.parameters())
    assert abs(local - total / WORLD) <= 0.02 * total, (local, total)  # its shard, not the whole model
    batch = {k: v.chunk(WORLD)[rank] for k, v in make_ranked_batch(num_prompts=4, seed=1).items()}
    with torch.no_grad():
        for fused in (False, True):
            got = response_stats(ref, batch, fused_linear=fused)
            release_reference(ref)
            for g, w in zip(got, response_stats(plain, batch, fused_linear=fused), strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def worker(rank: int, store: str, layout: str, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    # A file store, not TCP (see test_data_parallel.py); accelerate then uses this process group.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = []
        for loss, fused, precompute in CONFIGS:
            trainer = run(WORLD, loss, fused, precompute, layout, os.path.dirname(out))
            name, step0_loss, rewards, ranks, phi = trainer.records[0]
            check_step_zero(loss, step0_loss, rewards, ranks, phi, exact=not precompute)  # this rank's half
            ref = trainer.ref_model
            if precompute:
                assert ref is None
            else:  # unwrapped, eval, the whole model: held once per rank
                assert type(ref).__name__ == "LlamaForCausalLM" and not ref.training
                assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in trainer.model.parameters())
            logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            policy = trainer.accelerator.unwrap_model(trainer.model)
            results.append({"losses": logs, "wrapper": name, "eval": trainer.eval_metrics,
                            "state": {n: p.detach().clone() for n, p in policy.named_parameters()}})  # fmt: skip
        check_fsdp2_shard(rank)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_equal_one(layout, tmp_path):
    out = str(tmp_path / "out.pt")
    mp.spawn(worker, args=(str(tmp_path / "store"), layout, out), nprocs=WORLD, join=True)
    results = torch.load(out)
    assert len(results) == len(CONFIGS)
    for (loss, fused, precompute), result in zip(CONFIGS, results, strict=True):
        assert result["wrapper"] == "DistributedDataParallel"
        one = run(1, loss, fused, precompute, layout, str(tmp_path / "one"))
        check_step_zero(loss, *one.records[0][1:], exact=not precompute)
        losses = [h["loss"] for h in one.state.log_history if "loss" in h]
        assert len(losses) == STEPS and losses[-1] != losses[0]  # training moved
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for name, value in one.model.named_parameters():
            torch.testing.assert_close(result["state"][name], value.detach(), rtol=1e-4, atol=1e-6, msg=name)
        # evaluation counts each of the 5 rows once: the rows repeated to even out the ranks are dropped
        alone = one.eval_metrics
        assert set(result["eval"]) == set(alone)
        for key, value in alone.items():
            if not key.endswith(("_runtime", "_per_second")):
                assert result["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, result["eval"], alone)
