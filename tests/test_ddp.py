"""DistributedDataParallel (gloo, 2 CPU processes) trains exactly like one process on the full batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
sys.path.insert(0, EXAMPLES)

from ranked import frozen_copy, make_ranked_batch, rcpo_loss, tiny_llama  # noqa: E402

STEPS = 3
LR = 1e-2


def train(model, reference, batch, loss_name):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        value, _ = rcpo_loss(model, reference, batch, loss=loss_name, beta=0.5)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()


def worker(rank: int, world: int, store: str, loss_name: str, out: str) -> None:
    sys.path.insert(0, EXAMPLES)
    torch.set_num_threads(1)
    # A file store, not TCP: no server thread on rank 0 that the other rank may still be
    # talking to when rank 0 exits (that race aborted a worker now and then).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        policy = tiny_llama(seed=0)
        reference = frozen_copy(policy)
        batch = make_ranked_batch(num_prompts=8, seed=1)
        shard = {key: value.chunk(world)[rank] for key, value in batch.items()}  # 4 prompts per rank
        model = torch.nn.parallel.DistributedDataParallel(policy)
        train(model, reference, shard, loss_name)
        if rank == 0:
            torch.save(policy.state_dict(), out)
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: now and then a gloo or c10d thread still joinable at exit made
    # a worker abort ("terminate called without an active exception") after its work was done.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("loss_name", ["mallows", "mnl"])
def test_ddp_matches_single_process(loss_name, tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), loss_name, out), nprocs=2, join=True)
    ddp_state = torch.load(out)

    policy = tiny_llama(seed=0)
    reference = frozen_copy(policy)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    train(policy, reference, make_ranked_batch(num_prompts=8, seed=1), loss_name)
    moved = 0.0
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved = max(moved, (value - start[name]).abs().max().item())
    assert moved > 1e-4  # training did change the parameters
