"""Say once which optional package this Python lacks, and which tests and benchmark rows skip without it.

    python benchmarks/gpu_deps.py

``benchmarks/gpu_check.sh`` runs it after its installs. One line per missing package
(``gpu_check: missing trl (ModuleNotFoundError: No module named 'trl'): skipped: ...``), or one
line saying that none is; the tests and rows
themselves skip on their own (``pytest.importorskip``, ``benchmarks/peers.py``). A package
that is installed but fails to import counts as missing, with its error. Exit status 0.
"""

from __future__ import annotations

import importlib
import sys

#: import name -> what skips without it. The peers are the ``bench`` extra (benchmarks/peers.py);
#: ``benchmarks/gpu_wheels.sh`` downloads them with what they need that a GPU image lacks.
OPTIONAL = {
    "trl": "bench_tokens row trl, bench_fused_linear row trl.chunked",
    "cut_cross_entropy": "bench_fused_linear row cce",
    "liger_kernel.transformers.functional": "bench_fused_linear row liger (CUDA only)",
    "transformers": "bench_ranked_step; tests that build a model (test_prefix_shared, test_lm_head, ...)",
    "accelerate": "tests test_examples, test_reference_prepare",
    "datasets": "trl; tests test_reference_model, test_trainer, test_trainer_data_parallel",
    "peft": "test_reference_model's adapter test",
}


def missing(names=OPTIONAL) -> dict[str, str]:
    """``{name: why}`` for each of ``names`` that does not import."""
    out = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # an installed package that fails to import is as good as missing
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return out


def main() -> int:
    absent = missing()
    for name, why in absent.items():
        print(f"gpu_check: missing {name.split('.')[0]} ({why}): skipped: {OPTIONAL[name]}")
    if not absent:
        print(f"gpu_check: every optional package imports ({', '.join(n.split('.')[0] for n in OPTIONAL)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
