"""FSDP2 (``fully_shard``) and DDP (gloo, 2 CPU processes) with the fused path: the LM head reached through the
model's own forward (``final_hidden_states``, then ``lm_head_spec``) trains exactly like one process on the full
batch."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
sys.path.insert(0, EXAMPLES)

from ranked import frozen_copy, make_ranked_batch, rcpo_loss, tiny_llama  # noqa: E402

STEPS = 2
LR = 1e-2


def train(model, reference, batch, loss_name):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        value, _ = rcpo_loss(model, reference, batch, loss=loss_name, beta=0.5, fused_linear=True)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.detach())
    return torch.stack(losses)


def worker(rank: int, world: int, store: str, wrapper: str, out: str) -> None:
    sys.path.insert(0, EXAMPLES)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        from rcpo_losses import fused_linear_token_stats, lm_head_spec

        policy = tiny_llama(seed=0)
        reference = frozen_copy(policy)
        batch = make_ranked_batch(num_prompts=8, seed=1)
        shard = {key: value.chunk(world)[rank] for key, value in batch.items()}  # 4 prompts per rank
        if wrapper == "fsdp2":
            for layer in policy.model.layers:
                fully_shard(layer)
            fully_shard(policy)  # the root (embeddings, final norm, LM head) stays unsharded after its forward
            assert type(policy.lm_head.weight).__name__ == "DTensor"
            with pytest.raises(TypeError, match="DTensor"):  # before a forward has gathered it
                lm_head_spec(policy)
            with pytest.raises(TypeError, match="weight: a DTensor"):
                fused_linear_token_stats(torch.randn(2, 32), policy.lm_head.weight, torch.tensor([0, 1]))
            model = policy
        else:
            model = torch.nn.parallel.DistributedDataParallel(policy)
        losses = train(model, reference, shard, "mallows")
        dist.all_reduce(losses)
        state = {name: getattr(p, "full_tensor", p.detach)() for name, p in policy.named_parameters()}
        if rank == 0:
            torch.save({"losses": losses / world, "state": state}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as in test_ddp.py


@pytest.mark.filterwarnings("ignore:.*returned a view tensor")
@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp"])
def test_fused_linear_matches_single_process(wrapper, tmp_path):
    out = str(tmp_path / "out.pt")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), wrapper, out), nprocs=2, join=True)
    result = torch.load(out)

    policy = tiny_llama(seed=0)
    reference = frozen_copy(policy)
    start = {k: v.clone() for k, v in policy.named_parameters()}
    full = make_ranked_batch(num_prompts=8, seed=1)
    # The per-rank losses average to the full-batch loss at the first step (same parameters).
    losses = train(policy, reference, full, "mallows")
    torch.testing.assert_close(result["losses"][0], losses[0], rtol=1e-5, atol=1e-6)
    moved = 0.0
    for name, value in policy.named_parameters():
        torch.testing.assert_close(result["state"][name], value.detach(), rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (value - start[name]).abs().max().item())
    assert moved > 1e-4  # training did change the parameters
