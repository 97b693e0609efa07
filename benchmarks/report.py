"""Turn pytest-benchmark JSON files into one Markdown report.

    python benchmarks/report.py out/bench_*.json > report.md
    python benchmarks/report.py out/bench.jsonl > report.md    # rows as RCPO_BENCH_JSONL wrote them

One section per JSON file (machine, commit, then a table per benchmark group), or per
benchmark file of a JSON-lines file (``benchmarks/conftest.py``: one row a line, written as
each row is measured, so a run cut short still has a report; no machine or commit). Columns:
the test's parameters, median and interquartile range of the time per call, rounds,
and whatever the benchmark put in ``extra_info`` (for the choice losses: ``gbps``, the
achieved bandwidth for the bytes a fused implementation must move, and ``pct_of_copy``,
that relative to a device-to-device copy of the same run). Within a group, a
``speedup`` column compares each row with the group's ``torch`` row (``impl`` in
``extra_info`` or ``params``) when there is one. Where a group has rows of other libraries
(``peer`` in ``extra_info``: see ``benchmarks/peers.py``), two more columns compare each row
with the fastest of them: ``time / fastest peer`` (below 1: faster than every peer) and
``peak / its peak`` (each row's ``peak_mb`` over that peer's), and a line under the table
names the fastest peer and gives every peer's time and peak memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SKIP_EXTRA = {"bytes", "device", "impl", "peer"}


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params(bench: dict) -> str:
    params = bench.get("params") or {}
    return ", ".join(f"{k}={v}" for k, v in params.items()) or bench["name"]


def _impl(bench: dict) -> str | None:
    extra = bench.get("extra_info") or {}
    return extra.get("impl") or (bench.get("params") or {}).get("impl")


def load(path: Path) -> list[tuple[str, dict]]:
    """``[(title, data)]``: a ``--benchmark-json`` file as is, a JSON-lines file one ``data`` per benchmark file."""
    if path.suffix != ".jsonl":
        return [(path.stem, json.loads(path.read_text()))]
    files: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            files.setdefault(row.get("file", path.stem), []).append(row)
    return [(name, {"benchmarks": rows}) for name, rows in files.items()]


def section(title: str, data: dict) -> str:
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [f"## {title}", ""]
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    devices = ", ".join(sorted({b.get("extra_info", {}).get("device") for b in data["benchmarks"]} - {None})) or "?"
    if machine:
        lines.append(f"- machine: {machine.get('node', '?')}, CPU {cpu}, device(s): {devices}")
        lines.append(f"- python {machine.get('python_version', '?')}; commit {commit.get('id', '?')[:12]}")
        lines.append(f"- date: {data.get('datetime', '?')}")
    else:  # rows as measured (JSON lines): the machine is wherever they were written
        lines.append(f"- device(s): {devices}")
    lines.append("")

    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    for group, benches in groups.items():
        extras = sorted({k for b in benches for k in (b.get("extra_info") or {}) if k not in SKIP_EXTRA})
        base = next((b for b in benches if _impl(b) == "torch"), None)
        peers = [b for b in benches if (b.get("extra_info") or {}).get("peer")]
        fastest = min(peers, key=lambda b: b["stats"]["median"]) if peers else None
        header = ["benchmark", "median", "IQR", "rounds", *extras] + (["speedup vs torch"] if base else [])
        if fastest:
            header += [f"time / fastest peer ({fastest['extra_info']['peer']})", "peak / its peak"]
        lines += [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for b in benches:
            stats = b["stats"]
            extra = b.get("extra_info") or {}
            row = [_params(b), _time(stats["median"]), _time(stats["iqr"]), str(stats["rounds"])]
            row += [_value(extra.get(k, "")) for k in extras]
            if base:
                row.append(f"{base['stats']['median'] / stats['median']:.2f}x")
            if fastest:
                row.append(f"{stats['median'] / fastest['stats']['median']:.2f}")
                peak, peer_peak = extra.get("peak_mb"), fastest["extra_info"].get("peak_mb")
                row.append(f"{peak / peer_peak:.3g}" if peak is not None and peer_peak else "")
            lines.append("| " + " | ".join(row) + " |")
        if peers:
            each = ", ".join(
                f"{p['extra_info']['peer']} {_time(p['stats']['median'])}"
                + (f", peak {p['extra_info']['peak_mb']:.4g} MB" if "peak_mb" in p["extra_info"] else "")
                for p in peers
            )
            lines += ["", f"Peers: {each}; fastest: {fastest['extra_info']['peer']}."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv if Path(p).is_file()]
    if not paths:
        print("usage: python benchmarks/report.py BENCH.json|BENCH.jsonl [...]", file=sys.stderr)
        return 2
    print("# Benchmark report\n")
    for path in paths:
        for title, data in load(path):
            print(section(title, data))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
