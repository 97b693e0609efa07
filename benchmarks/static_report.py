"""The kernels' static report (registers, spills, occupancy, load widths per GPU target), into docs/kernels.md.

For every kernel launch the launchers choose over the grid of ``compile_static.py``
(int64 ranks, the dtype PyTorch gives), compiled for sm_80, sm_90, sm_100 and gfx942:
registers, spills, shared memory, theoretical occupancy in warps per SM and what limits
it, and the width of the main loads and stores. No GPU needed; a GPU measures the rest
(``benchmarks/gpu_check.sh``).

    python benchmarks/static_report.py [--json report.json] [--doc docs/kernels.md]

Without ``--json`` it compiles the full grid first (Triton caches the compiles).
The table replaces what lies between the ``static-report`` markers of the doc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

START, END = "<!-- static-report:start -->", "<!-- static-report:end -->"
NVIDIA = ("sm_80", "sm_90", "sm_100")
# The loads and stores that carry the data, per kernel family.
MAIN = {
    "choice": {"ld": ("r_ptr", "ranks_ptr"), "st": ("grad_r_ptr",)},
    "token": {"ld": ("logits_ptr",), "st": ("grad_ptr",)},
}
SHORT = {"r_ptr": "r", "ranks_ptr": "ranks", "grad_r_ptr": "grad", "logits_ptr": "logits", "grad_ptr": "grad"}


def _family(kernel: str) -> str:
    return "token" if "token" in kernel else "choice"


def _widths(r: dict, kind: str) -> str:
    parts = []
    for name in MAIN[_family(r["kernel"])][kind]:
        bits = r["access"].get(name, {}).get(kind, [])
        if bits:
            parts.append(f"{SHORT[name]} {min(bits)}" + (f"-{max(bits)}" if max(bits) != min(bits) else ""))
    return ", ".join(parts) or "-"


def _nvidia_cell(r: dict | None) -> str:
    if r is None:
        return "skipped"
    if "error" in r:
        return "**fails**"
    spill = f", **{r['spills']} spills**" if r["spills"] else ""
    return f"{r['regs']} / {r['warps_per_sm']} ({r['limiter']}){spill}"


def _amd_cell(r: dict | None) -> str:
    if r is None:
        return "skipped"
    if "error" in r:
        return "**fails**"
    return f"{r['regs']}" + (f", **{r['spills']} spills**" if r["spills"] else "")


def table(report: dict) -> str:
    """The Markdown table: one line per kernel and config, one column per target."""
    by_key: dict = {}
    for r in report["results"]:
        if r.get("ranks", "int64") != "int64":
            continue
        by_key.setdefault((r["name"], r["config"]), {})[r["target"]] = r
    lines = [
        "| kernel | config | warps | sm_80 | sm_90 | sm_100 | gfx942 VGPRs | smem (sm_90) "
        "| loads (sm_90, bits) | stores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, config), rows in by_key.items():
        ref = rows.get("sm_90") or next(iter(rows.values()))
        ok = "error" not in ref
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    config.replace(" int64", ""),
                    str(ref.get("num_warps", "?")),
                    *(_nvidia_cell(rows.get(t)) for t in NVIDIA),
                    _amd_cell(rows.get("gfx942")),
                    str(ref.get("shared", "-")) if ok else "-",
                    _widths(ref, "ld") if ok else "-",
                    _widths(ref, "st") if ok else "-",
                ]
            )
            + " |"
        )
    results = [r for r in report["results"] if "error" not in r]
    spilled = sum(1 for r in results if r["spills"])
    summary = (
        f"Triton {report['triton']}: {len(report['results'])} launch configurations compiled "
        f"({len(report['results']) - len(results)} failed, {spilled} spill; skipped targets: "
        f"{', '.join(report['skipped']) or 'none'}). NVIDIA cells: registers per thread / resident "
        "warps per SM (what limits them). The table shows int64 ranks; int32 ranks are within a few "
        "registers of it (the full data: compile_static.py --full --json)."
    )
    return f"{summary}\n\n" + "\n".join(lines)


def write(doc: Path, text: str) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc}: no {START} ... {END} markers")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", body, flags=re.S)
    doc.write_text(new)


def main(argv=None) -> None:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="a report written by compile_static.py --full (else compile now)")
    p.add_argument("--doc", default=str(root / "docs" / "kernels.md"))
    a = p.parse_args(argv)
    if a.json:
        report = json.loads(Path(a.json).read_text())
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path.insert(0, str(Path(__file__).parent))
        import compile_static

        report = compile_static.run(full=True, jobs=min(4, os.cpu_count() or 1))
    write(Path(a.doc), table(report))


if __name__ == "__main__":
    main()
