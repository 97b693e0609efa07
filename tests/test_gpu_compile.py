"""Every kernel launch the launchers choose compiles for sm_80, sm_90, sm_100 and gfx942, without a GPU.

The interpreter tests (``TRITON_INTERPRET=1``) never meet the GPU compiler, which rejects
code the interpreter runs. ``benchmarks/compile_static.py`` runs the real launchers on
``device="meta"`` tensors with the launch intercepted, specializes each launch with
Triton's own binder and compiles it with ``triton.compile`` for each target. It runs in a
subprocess without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives
functions the compiler cannot take). Then, from what the compilers report:

- every launch compiles for every target whose toolchain this Triton ships;
- nothing spills (no STL/LDL on NVIDIA, no VGPR/SGPR spills on gfx942);
- the main loads and stores are 128-bit where the data allow it (rewards, ranks and the
  rewards gradient; logits and their gradient): the grid's tensors are contiguous with
  ``B`` a multiple of 16, so only a thread's share of the tile caps the width;
- fp32 choice kernels at ``S <= 16`` keep at least 16 warps resident per SM on sm_90.

By default a reduced grid (about a minute on 2 cores with a cold cache); the full grid of
the issue under ``RCPO_GPU_COMPILE_FULL=1``. Compiles are cached by Triton
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("RCPO_GPU_COMPILE_FULL") == "1"
CHOICE_KERNELS = {
    "mnl_topk_fwd_kernel",
    "mnl_topk_bwd_kernel",
    "mallows_rmj_topk_kernel",  # forward and backward, by its BACKWARD constexpr
}
TOKEN_KERNELS = {"_token_stats_fwd_kernel", "_token_stats_bwd_kernel"}
ITEMSIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_static.py"), "--json", str(out)]
    proc = subprocess.run(cmd + (["--full"] if FULL else []), env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 3:  # compile_static.UNSUPPORTED_TRITON: a Triton without the 3.8 binder API
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-5000:]
    data = json.loads(out.read_text())
    if not data["results"]:
        pytest.skip(f"no GPU compiler toolchain in this Triton (skipped: {data['skipped']})")
    return data


def _ok(report: dict) -> list[dict]:
    return [r for r in report["results"] if "error" not in r]


def _cuda(report: dict) -> list[dict]:
    return [r for r in _ok(report) if r["target"].startswith("sm_")]


def _label(r: dict) -> str:
    return f"{r['name']} {r['config']} on {r['target']}"


def test_every_launched_kernel_is_compiled_for_every_target(report):
    targets = {r["target"] for r in report["results"]}
    assert targets | set(report["skipped"]) == {"sm_80", "sm_90", "sm_100", "gfx942"}
    for target in targets:
        kernels = {r["kernel"] for r in report["results"] if r["target"] == target}
        assert kernels == CHOICE_KERNELS | TOKEN_KERNELS, target


def test_every_launch_compiles(report):
    failed = [f"{_label(r)}: {r['error']}" for r in report["results"] if "error" in r]
    assert not failed, "\n".join(failed)


def test_launches_are_specialized_like_a_real_launch(report):
    """Triton's binder: pointers and multiples of 16 get divisibility 16, unit strides become constexprs."""
    for r in _ok(report):
        if r["kernel"] in CHOICE_KERNELS:
            assert {"r_ptr", "ranks_ptr"} <= set(r["divisible_16"]), _label(r)
            assert r["constexprs"]["stride_rs"] == "1" and r["constexprs"]["stride_ks"] == "1", _label(r)
            # every S of the grid is a power of two and the tensors are contiguous: the fast path
            assert r["constexprs"]["CONTIG"] == "True", _label(r)
        else:
            assert "logits_ptr" in r["divisible_16"], _label(r)


def test_nothing_spills(report):
    spilled = [f"{_label(r)}: {r['spills']} spills, {r['regs']} registers" for r in _ok(report) if r["spills"]]
    assert not spilled, "\n".join(spilled)


def _widths(r: dict, name: str, kind: str) -> list[int]:
    return [w for key, acc in r["access"].items() if key == name for w in acc[kind]]


def test_main_loads_and_stores_are_128_bit_where_the_data_allow(report):
    bad = []
    for r in _cuda(report):
        if r["kernel"] in CHOICE_KERNELS:
            # The contiguous path loads each tile as one span (B = 4096 is a multiple of 16), so a
            # thread's elements are one aligned run: 128-bit unless the run is shorter
            # (fp64 rewards, 2 a thread, with int32 ranks: 64-bit ranks).
            per_thread = int(r["constexprs"]["ROWS"]) * int(r["constexprs"]["BLOCK_S"]) // (32 * r["num_warps"])
            bits = {name: min(128, per_thread * 8 * ITEMSIZE[r[key]]) for name, key in (("r", "dtype"), ("k", "ranks"))}
            want = {("r_ptr", "ld"): bits["r"], ("ranks_ptr", "ld"): bits["k"]}
            if "bwd" in r["name"]:
                want["grad_r_ptr", "st"] = bits["r"]
        else:
            want = {("logits_ptr", "ld"): 128}
            if "bwd" in r["name"]:
                want["grad_ptr", "st"] = 128
        for (name, kind), bits in want.items():
            got = _widths(r, name, kind)
            if not got or min(got) < bits:
                bad.append(f"{_label(r)}: {name} {kind} widths {sorted(set(got))}, want {bits}")
    assert not bad, "\n".join(bad)


def test_fp32_rewards_loads_at_least_64_bit_at_usual_sizes(report):
    """The issue's floor: fp32 rewards loads of at least 64 bits at S in {8, 16, 64} on sm_90."""
    rows = [r for r in _cuda(report) if r["kernel"] in CHOICE_KERNELS and r["dtype"] == "float32"]
    rows = [r for r in rows if r["target"] == "sm_90" and r["S"] in (8, 16, 64)]
    assert rows
    for r in rows:
        assert min(_widths(r, "r_ptr", "ld")) >= 64, _label(r)


def test_fp32_choice_kernels_keep_16_warps_per_sm_on_sm90(report):
    rows = [r for r in _cuda(report) if r["kernel"] in CHOICE_KERNELS and r["target"] == "sm_90"]
    rows = [r for r in rows if r["dtype"] == "float32" and r["S"] <= 16]
    assert rows
    low = [f"{_label(r)}: {r['warps_per_sm']} warps/SM ({r['limiter']}, {r['regs']} registers)" for r in rows]
    assert all(r["warps_per_sm"] >= 16 for r in rows), "\n".join(low)
