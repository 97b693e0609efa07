"""Two switches for the benchmark files, by environment variable (``benchmarks/gpu_check.sh`` sets both).

pytest loads it for every ``python -m pytest benchmarks/bench_*.py``; nothing runs it on its own.

- ``RCPO_BENCH_ROWS=regex``: run only the rows whose pytest id (``benchmarks/bench_x.py::test[...]``)
  matches, the rest deselected (no second pytest process to collect them first).
- ``RCPO_BENCH_JSONL=path``: append each benchmark row to ``path`` as one JSON line as soon as it is
  measured. pytest-benchmark writes ``--benchmark-json`` only when the session ends, so a run
  stopped by a time limit would return nothing. A line is ``{"file": <benchmark file stem>, **row}``,
  ``row`` as one entry of ``--benchmark-json``'s ``benchmarks`` list (no raw timings);
  ``benchmarks/report.py`` reads such files.
"""

from __future__ import annotations

import json
import os
import re


def pytest_collection_modifyitems(config, items):
    pattern = os.environ.get("RCPO_BENCH_ROWS")
    if not pattern:
        return
    keep, drop = [], []
    for item in items:
        (keep if re.search(pattern, item.nodeid) else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_makereport(item, call):
    path = os.environ.get("RCPO_BENCH_JSONL")
    if not path or call.when != "call":
        return
    stats = getattr(getattr(item, "funcargs", {}).get("benchmark"), "stats", None)
    if stats is None:  # skipped, failed before measuring, or not a benchmark
        return
    row = {"file": item.path.stem, **stats.as_dict(include_data=False)}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
