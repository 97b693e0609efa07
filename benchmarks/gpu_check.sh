#!/usr/bin/env bash
# One command for a CUDA machine (no network needed): run the test suite on the GPU with
# compiled Triton kernels (TRITON_INTERPRET unset), then every benchmarks/bench_*.py, and
# write a Markdown report.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default ./gpu_report
#
# OUT_DIR gets: env.txt, tests.txt, bench_<name>.{txt,json} per benchmark file, report.md.
# Exit status: 0 when the tests and every benchmark file passed, 1 otherwise, 2 without CUDA.
set -uo pipefail

OUT="${1:-./gpu_report}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch" >&2
    exit 2
fi

{
    nvidia-smi || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

status=0
python -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

shopt -s nullglob
jsons=()
for bench in benchmarks/bench_*.py; do
    name="$(basename "$bench" .py)"
    python -m pytest "$bench" -q -p no:cacheprovider --benchmark-json="$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    [ -f "$OUT/$name.json" ] && jsons+=("$OUT/$name.json")
done

if [ "${#jsons[@]}" -gt 0 ]; then
    python benchmarks/report.py "${jsons[@]}" >"$OUT/report.md" || status=1
fi
echo "gpu_check: report in $OUT/report.md (status $status)"
exit "$status"
