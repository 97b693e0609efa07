"""DDP and FSDP2 (gloo, 2 CPU processes) train exactly like one process on the full batch.

With the fused path, the LM head is reached through the model's own forward
(``final_hidden_states``, then ``lm_head_spec``): DDP's hooks run, and FSDP2 gathers the
root module's parameters (the LM head among them) for the forward and reduce-scatters their
gradients.
"""

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
WORLD = 2


def train(model, reference, batch, loss_name: str, fused: bool) -> torch.Tensor:
    """``STEPS`` SGD steps; the loss of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        value, _ = rcpo_loss(model, reference, batch, loss=loss_name, beta=0.5, fused_linear=fused)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        losses.append(value.detach())
    return torch.stack(losses)


def check_sharded_head_refused(policy) -> None:
    """Before a forward has gathered it, the FSDP2 LM head is a sharded DTensor: a clear error, not wrong numbers."""
    from rcpo_losses import fused_linear_token_stats, lm_head_spec

    assert type(policy.lm_head.weight).__name__ == "DTensor"
    with pytest.raises(TypeError, match="DTensor"):
        lm_head_spec(policy)
    with pytest.raises(TypeError, match="weight: a DTensor"):
        fused_linear_token_stats(torch.randn(2, 32), policy.lm_head.weight, torch.tensor([0, 1]))


def worker(rank: int, store: str, wrapper: str, loss_name: str, fused: bool, out: str) -> None:
    sys.path.insert(0, EXAMPLES)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    # A file store, not TCP: no server thread on rank 0 that the other rank may still be
    # talking to when rank 0 exits (that race aborted a worker now and then).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        policy = tiny_llama(seed=0)
        reference = frozen_copy(policy)
        batch = make_ranked_batch(num_prompts=8, seed=1)
        shard = {key: value.chunk(WORLD)[rank] for key, value in batch.items()}  # 4 prompts per rank
        if wrapper == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in policy.model.layers:
                fully_shard(layer)
            fully_shard(policy)  # the root (embeddings, final norm, LM head) stays unsharded after its forward
            check_sharded_head_refused(policy)
            model = policy
        else:
            model = torch.nn.parallel.DistributedDataParallel(policy)
        losses = train(model, reference, shard, loss_name, fused)
        dist.all_reduce(losses)
        state = {name: getattr(p, "full_tensor", p.detach)() for name, p in policy.named_parameters()}
        if rank == 0:
            torch.save({"losses": losses / WORLD, "state": state}, out)
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: now and then a gloo or c10d thread still joinable at exit made
    # a worker abort ("terminate called without an active exception") after its work was done.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.filterwarnings("ignore:.*returned a view tensor")
@pytest.mark.parametrize(
    "wrapper, loss_name, fused",
    [("ddp", "mnl", False), ("ddp", "mallows", False), ("ddp", "mallows", True), ("fsdp2", "mallows", True)],
)
def test_matches_single_process(wrapper, loss_name, fused, tmp_path):
    out = str(tmp_path / "out.pt")
    mp.spawn(worker, args=(str(tmp_path / "store"), wrapper, loss_name, fused, out), nprocs=WORLD, join=True)
    result = torch.load(out)

    policy = tiny_llama(seed=0)
    reference = frozen_copy(policy)
    start = {k: v.clone() for k, v in policy.named_parameters()}
    losses = train(policy, reference, make_ranked_batch(num_prompts=8, seed=1), loss_name, fused)
    # The per-rank losses average to the full-batch loss at the first step (same parameters).
    torch.testing.assert_close(result["losses"][0], losses[0], rtol=1e-5, atol=1e-6)
    moved = 0.0
    for name, value in policy.named_parameters():
        torch.testing.assert_close(result["state"][name], value.detach(), rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (value - start[name]).abs().max().item())
    assert moved > 1e-4  # training did change the parameters
