"""benchmarks/gpu_check.sh and its helpers, on a machine without a GPU (issue 26).

The script must run on an air-gapped GPU node under a time budget, keep every row it
measured when a time limit stops it, and say once which optional package is missing.
Nothing here installs anything: the script runs with ``RCPO_NO_INSTALL=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "RCPO_NO_INSTALL": "1", **(env or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_quick_plan_fits_the_time_budget(tmp_path):
    """--quick states each step's cost and limit up front, and the whole run stops within 8 minutes."""
    proc = _script("--quick", "--plan", "--wheels", str(tmp_path), str(tmp_path / "out"), env={"RCPO_NO_INSTALL": "0"})
    assert proc.returncode == 0, proc.stderr
    steps = re.findall(r"^gpu_check:\s+(\w+)\s+expected\s+(\d+) s, limit\s+(\d+) s", proc.stdout, re.M)
    names = [name for name, _, _ in steps]
    assert names[:5] == ["env", "install", "peers", "deps", "cuda"]
    assert {"tests", "bench_choice", "bench_tokens", "bench_fused_linear", "bench_ranked_step"} <= set(names)
    total = int(re.search(r"total limit (\d+) s", proc.stdout).group(1))
    expected = int(re.search(r"expected in all: (\d+) s", proc.stdout).group(1))
    assert expected == sum(int(e) for _, e, _ in steps) < total <= 8 * 60
    assert all(0 < int(e) <= int(limit) for _, e, limit in steps)
    assert (tmp_path / "out" / "gpu_check.log").read_text() == proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the path of a machine without CUDA")
def test_without_cuda_it_stops_at_the_cuda_check(tmp_path):
    out = tmp_path / "out"
    proc = _script("--quick", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = (out / "gpu_check.log").read_text()
    for step in ("env", "deps", "cuda"):
        assert f"gpu_check: {step}: start" in log
    assert "install: start" not in log  # RCPO_NO_INSTALL=1
    assert log.rstrip().endswith("no CUDA device visible to torch: stopping before the GPU steps")
    assert "tests: start" not in log
    assert torch.__version__ in (out / "env.txt").read_text()


def test_deps_names_each_missing_package_once():
    deps = _load("gpu_deps")
    missing = deps.missing(["json", "rcpo_losses_no_such_module", "rcpo_losses_no_such_module.sub"])
    assert set(missing) == {"rcpo_losses_no_such_module", "rcpo_losses_no_such_module.sub"}
    assert all("ModuleNotFoundError" in why for why in missing.values())


def test_benchmark_rows_are_selected_and_written_as_measured(tmp_path):
    """RCPO_BENCH_ROWS picks rows by id in the one pytest process; each row lands in RCPO_BENCH_JSONL."""
    pytest.importorskip("pytest_benchmark")
    jsonl = tmp_path / "bench.jsonl"
    env = {**os.environ, "RCPO_BENCH_ROWS": r"copy_baseline", "RCPO_BENCH_JSONL": str(jsonl)}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_choice.py", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"1 passed, \d+ deselected", proc.stdout), proc.stdout[-1000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["file"], r["name"]) for r in rows] == [("bench_choice", "test_copy_baseline")]
    assert rows[0]["stats"]["median"] > 0 and rows[0]["extra_info"]["gbps"] > 0

    report = _load("report")
    second = {**rows[0], "file": "bench_tokens", "group": "token stats", "name": "test_token_stats[x]"}
    jsonl.write_text("\n".join(json.dumps(r) for r in (rows[0], second)) + "\n")
    (title_a, data_a), (title_b, data_b) = report.load(jsonl)
    assert (title_a, title_b) == ("bench_choice", "bench_tokens")
    assert [b["name"] for b in data_a["benchmarks"] + data_b["benchmarks"]] == [
        "test_copy_baseline",
        "test_token_stats[x]",
    ]
    text = report.section(title_a, data_a)
    assert "## bench_choice" in text and "| test_copy_baseline |" in text


def test_interleaved_peer_run_from_the_bench_file():
    """``bench_tokens.py --interleaved`` (was benchmarks/peers_interleaved.py): a row per impl, its peak measured."""
    cmd = [sys.executable, "benchmarks/bench_tokens.py", "--interleaved", "1", "--n", "16", "--v", "64"]
    cmd += ["--dtypes", "fp32", "--impls", "chunked,naive"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| fp32 \| (\w+) \| \d+ ms \| \d+ ms \| (\d*) \|", proc.stdout, re.M)
    assert [impl for impl, _ in rows] == ["chunked", "naive"], proc.stdout
    if sys.platform.startswith("linux"):  # the peak of one call, in a fresh subprocess
        assert all(peak for _, peak in rows), proc.stdout
