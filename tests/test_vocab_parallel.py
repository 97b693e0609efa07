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


def _check_corner_cases(rank: int, world: int, backends: list[str]) -> None:
    """A non-negative ignore_index, vocabulary slices that are all -inf, different token counts on the ranks."""
    group = dist.group.WORLD
    z, h, W, b, t, g_logp, g_ent = _inputs()
    bounds = [0, *torch.tensor([x.shape[0] for x in torch.arange(V).tensor_split(world)]).cumsum(0).tolist()]
    part = lambda x: x.tensor_split(world, dim=0)[rank]  # noqa: E731
    # ignore_index=0: targets at every slice's first id (offset + 0) and at 0 itself are kept or ignored as unsharded
    t0 = t.clone()
    t0[7 : 7 + world] = torch.tensor(bounds[:world])
    t0[3] = 0
    t0[1] = 1
    # rows 1 and 6: one rank's whole slice -inf (row 6: the target is on another rank); the row keeps a finite lse
    zm = z.clone()
    zm[1, bounds[-2] :] = -float("inf")
    zm[6, : bounds[1]] = -float("inf")
    t0[6] = bounds[1]
    bm = b.clone()
    bm[bounds[-2] :] = -float("inf")  # the fused head: the last rank's slice masked by its bias, on every row
    tf = torch.where(t0 >= bounds[-2], 1, t0)  # a target in the masked slice would have log-prob -inf
    for backend in backends:
        for ignore_index, logits in ((0, z), (5, z), (-100, zm), (0, zm)):
            full = logits.clone().requires_grad_()
            want = token_logps_and_entropy(full, t0, ignore_index, backend=backend)
            (want_grad,) = torch.autograd.grad(want, full, (g_logp, g_ent))
            assert torch.isfinite(want[0]).all() and torch.isfinite(want_grad).all()
            mine = logits.T.tensor_split(world, dim=0)[rank].T.clone().requires_grad_()
            got = token_logps_and_entropy(mine, t0, ignore_index, backend=backend, process_group=group, chunk_size=4)
            (grad,) = torch.autograd.grad(got, mine, (g_logp, g_ent))
            what = f"token {backend} ignore_index={ignore_index} masked={logits is zm}"
            _close(got[0], want[0], f"{what} logp")
            _close(got[1], want[1], f"{what} entropy")
            _close(grad, want_grad.T.tensor_split(world, dim=0)[rank].T, f"{what} grad")
        for ignore_index, bias in ((0, b), (-100, bm)):
            targets = t0 if bias is b else tf
            leaves = [x.clone().requires_grad_() for x in (h, W, bias)]
            want = fused_linear_token_stats(leaves[0], leaves[1], targets, leaves[2], ignore_index, backend=backend)
            want_grads = torch.autograd.grad(want, leaves, (g_logp, g_ent))
            mine = [h.clone().requires_grad_(), part(W).clone().requires_grad_(), part(bias).clone().requires_grad_()]
            got = fused_linear_token_stats(
                mine[0], mine[1], targets, mine[2], ignore_index, backend=backend, process_group=group, chunk_size=4
            )
            grads = torch.autograd.grad(got, mine, (g_logp, g_ent))
            what = f"fused {backend} ignore_index={ignore_index} masked={bias is bm}"
            _close(got[0], want[0], f"{what} logp")
            _close(got[1], want[1], f"{what} entropy")
            for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
                _close(g, w if name == "hidden" else part(w), f"{what} grad {name}")
    # different token counts on the ranks: a ValueError on every rank, not an abort or a hang
    n = N - 1 if rank == world - 1 else N
    with pytest.raises(ValueError, match=r"targets: the ranks of process_group hold .* rows"):
        token_logps_and_entropy(z[:n, :2], t[:n], process_group=group)
    with pytest.raises(ValueError, match=r"targets: the ranks of process_group hold .* rows"):
        fused_linear_token_stats(h[:n], part(W), t[:n], process_group=group)


def worker(rank: int, world: int, store: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        try:
            _check_all(rank, world, backends)
            _check_corner_cases(rank, world, backends)
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
