"""Vocabulary-parallel statistics (``process_group=``) with 2 and 4 gloo processes on the CPU: each rank holds a
(possibly uneven) vocabulary slice of the logits or of the LM head; log-probs, entropies and every gradient equal
the unsharded computation."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcpo_losses import fused_linear_token_stats, token_logps_and_entropy
from rcpo_losses.ops.backend import triton_available

N, H, V = 13, 5, 37  # V = 37: uneven slices (19 + 18, or 10 + 9 + 9 + 9)
TRANSFORMS = ({}, {"softcap": 3.0, "logit_scale": 1.5, "temperature": 0.7})


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 4
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 2
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = -100
    t[5] = V - 1
    g_logp, g_ent = torch.randn(2, N, generator=g, dtype=torch.float64)
    return z, h, W, b, t, g_logp, g_ent


def _close(got, want, what):
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=what)


def _check_all(rank: int, world: int, backends: list[str]) -> None:
    group = dist.group.WORLD
    z, h, W, b, t, g_logp, g_ent = _inputs()
    part = lambda x: x.tensor_split(world, dim=0)[rank]  # noqa: E731
    for kw in TRANSFORMS:
        for backend in backends:
            full = z.clone().requires_grad_()
            want = token_logps_and_entropy(full, t, backend=backend, **kw)
            (want_grad,) = torch.autograd.grad(want, full, (g_logp, g_ent))
            mine = z.T.tensor_split(world, dim=0)[rank].T.clone().requires_grad_()  # [N, V_r]
            got = token_logps_and_entropy(mine, t, backend=backend, process_group=group, chunk_size=4, **kw)
            (grad,) = torch.autograd.grad(got, mine, (g_logp, g_ent))
            what = f"token {backend} {kw}"
            _close(got[0], want[0], f"{what} logp")
            _close(got[1], want[1], f"{what} entropy")
            _close(grad, want_grad.T.tensor_split(world, dim=0)[rank].T, f"{what} grad")

            leaves = [x.clone().requires_grad_() for x in (h, W, b)]
            want = fused_linear_token_stats(leaves[0], leaves[1], t, leaves[2], backend=backend, **kw)
            want_grads = torch.autograd.grad(want, leaves, (g_logp, g_ent))
            mine = [h.clone().requires_grad_(), part(W).clone().requires_grad_(), part(b).clone().requires_grad_()]
            got = fused_linear_token_stats(
                mine[0], mine[1], t, mine[2], backend=backend, process_group=group, chunk_size=4, **kw
            )
            grads = torch.autograd.grad(got, mine, (g_logp, g_ent))
            what = f"fused {backend} {kw}"
            _close(got[0], want[0], f"{what} logp")
            _close(got[1], want[1], f"{what} entropy")
            _close(grads[0], want_grads[0], f"{what} grad hidden")
            _close(grads[1], part(want_grads[1]), f"{what} grad weight")
            _close(grads[2], part(want_grads[2]), f"{what} grad bias")
    with pytest.raises(ValueError, match="targets"):  # ids are checked against the full vocabulary
        token_logps_and_entropy(z[:, :2], torch.full((N,), V * world), process_group=group)


def worker(rank: int, world: int, store: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        try:
            _check_all(rank, world, backends)
            result = "ok"
        except BaseException:  # reported by the parent, which asserts on the files
            result = traceback.format_exc()
        Path(out_dir, f"{rank}.txt").write_text(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_data_parallel.py: no gloo thread teardown races at exit


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_unsharded(world, tmp_path):
    # The Triton kernel (interpreter) in the 2-rank run only: it is slow to spawn and run.
    backends = ["torch", "triton"] if world == 2 and triton_available() else ["torch"]
    mp.spawn(worker, args=(world, str(tmp_path / "store"), str(tmp_path), backends), nprocs=world, join=True)
    for rank in range(world):
        assert (tmp_path / f"{rank}.txt").read_text() == "ok", (tmp_path / f"{rank}.txt").read_text()
