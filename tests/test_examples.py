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
