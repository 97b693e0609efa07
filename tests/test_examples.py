"""The examples/ trainers run and learn on a tiny randomly initialised Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_trainer  # noqa: E402
import train_loop  # noqa: E402


def assert_learns(history: list[float]) -> None:
    assert all(v == v and abs(v) < float("inf") for v in history), history
    assert history[-1] < 0.7 * history[0], history


@pytest.mark.parametrize("loss", ["mallows", "mnl"])
def test_plain_loop_learns(loss):
    assert_learns(train_loop.train(steps=6, loss=loss))


@pytest.mark.parametrize("loss", ["mallows", "mnl"])
def test_hf_trainer_learns(loss):
    assert_learns(hf_trainer.train(steps=6, loss=loss))


# ------------------------------------------------------------------ --fused-linear


@pytest.mark.parametrize("loss", ["mallows", "mnl"])
def test_fused_linear_gives_the_same_loss_and_gradients(loss):
    import torch
    from ranked import frozen_copy, make_ranked_batch, rcpo_loss, tiny_llama

    policy = tiny_llama(seed=0)
    reference = frozen_copy(policy)
    batch = make_ranked_batch(seed=0)
    results = []
    for fused in (False, True):
        policy.zero_grad(set_to_none=True)
        value, metrics = rcpo_loss(policy, reference, batch, loss=loss, beta=0.5, fused_linear=fused)
        value.backward()
        results.append((value.detach(), metrics, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (v0, m0, g0), (v1, m1, g1) = results
    torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
    for key in m0:
        torch.testing.assert_close(m1[key], m0[key], atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_plain_loop_learns_fused_linear():
    assert_learns(train_loop.train(steps=6, loss="mallows", fused_linear=True))


def test_hf_trainer_learns_fused_linear():
    assert_learns(hf_trainer.train(steps=6, loss="mnl", fused_linear=True))


def test_fused_linear_flag_parses(capsys):
    train_loop.main(["--steps", "2", "--fused-linear"])
    assert capsys.readouterr().out.count("step") == 2
