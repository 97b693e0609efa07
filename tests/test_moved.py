"""The old dotted paths users call keep working for one release, with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOVED = {
    "rcpo_losses.generate": ("rcpo_losses.training.generate", "rank_completions"),
    "rcpo_losses.data": ("rcpo_losses.training.data", "RankedPreferenceCollator"),
    "rcpo_losses.precompute": ("rcpo_losses.training.precompute", "precompute_reference_stats"),
    "rcpo_losses.integrations.transformers": ("rcpo_losses.training.trainer", "RCPOTrainer"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_old_path_warns_and_is_the_new_module(old, monkeypatch):
    new, name = MOVED[old]
    if new == "rcpo_losses.training.trainer":
        pytest.importorskip("transformers")
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_old_cli_path_runs_and_warns():
    out = subprocess.run(
        [sys.executable, "-m", "rcpo_losses.generate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--num-samples" in out.stdout
    assert "DeprecationWarning" in out.stderr and "rcpo_losses.training.generate" in out.stderr
