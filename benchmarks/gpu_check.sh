#!/usr/bin/env bash
# One command for a CUDA machine (no network needed): run the tests on the GPU with
# compiled Triton kernels (TRITON_INTERPRET unset), then the benchmarks, and write a
# Markdown report.
#
#   bash benchmarks/gpu_check.sh [--quick] [OUT_DIR]      # default ./gpu_report
#
# Full mode: the whole test suite and every benchmarks/bench_*.py at its full grid.
# --quick (fits one 10-minute call on one H100, the peers included): the CUDA kernel tests (choice kernels,
# token stats, fused linear) and the headline benchmark rows only:
#   - choice losses (MNL, Mallows-RMJ), torch and triton, fwd+bwd at B=4096 and B=262144, S=8;
#   - token stats, bf16 [16384, 128256], chunked and triton, fwd and fwd+bwd;
#   - fused linear, N=4096, H=4096, V=128256, unfused and fused, fwd and fwd+bwd;
#   - one RCPO training step (bench_ranked_step: tiny Llama, 16 prompts x 5 completions, bf16),
#     padded (sdpa) vs prefix-shared (flex_attention with a BlockMask), and the DPO pair step.
#
# Both modes first install the `bench` extra (trl, liger-kernel, cut-cross-entropy: the peer rows, see
# benchmarks/peers.py) unless RCPO_NO_INSTALL=1; without a network the install fails, which is
# reported, and the peer rows are skipped. The quick rows include the peers at the same sizes:
#   - token stats: TRL's selective_log_softmax_and_entropy;
#   - fused linear: fused with entropy=False, TRL's ChunkedLogProbFunction, cut-cross-entropy (impl="cce")
#     and Liger's fused linear cross-entropy.
#
# OUT_DIR gets: env.txt, install.txt, tests.txt, bench_<name>.{txt,json} per benchmark file, report.md.
# Exit status: 0 when the tests and every benchmark file passed, 1 otherwise, 2 without CUDA.
set -uo pipefail

QUICK=0
if [ "${1:-}" = "--quick" ]; then
    QUICK=1
    shift
fi
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

if [ "${RCPO_NO_INSTALL:-0}" != 1 ]; then
    python -m pip install -e ".[bench]" >"$OUT/install.txt" 2>&1 \
        || echo "gpu_check: could not install the bench extra (see $OUT/install.txt): the peer rows are skipped" >&2
fi
python -c "import trl, cut_cross_entropy, liger_kernel; print('trl', trl.__version__)" >>"$OUT/env.txt" 2>&1

# --quick: the benchmark rows to run, as a pattern on the pytest ids of each file.
declare -A QUICK_ROWS=(
    [bench_choice]='copy_baseline|\[[a-z_]+-(torch|triton)-(4096|262144)-8\]'
    [bench_tokens]='\[(fwd|fwd_bwd)-(chunked|triton|trl)-16384x128256-bf16\]'
    [bench_fused_linear]='\[(fwd|fwd_bwd)-(unfused|fused|fused\.noent|trl\.chunked|cce|liger)-4096x4096x128256-bfloat16\]'
    [bench_ranked_step]='test_ranked_step\[(ranked|dpo_pair)-(padded_all_rows|prefix_shared)\]'
    [bench_user_kernel]='test_user_kernel_step' # the step with flash_attention_2 padded vs switched to flex prefix-shared
)

status=0
if [ "$QUICK" -eq 1 ]; then
    tests=(tests/test_kernels_choice.py tests/test_tokens.py tests/test_logit_transform.py tests/test_fused_linear.py
        tests/test_prefix_shared.py)
else
    tests=(tests)
fi
HYPOTHESIS_PROFILE=ci python -m pytest "${tests[@]}" -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

shopt -s nullglob
jsons=()
for bench in benchmarks/bench_*.py; do
    name="$(basename "$bench" .py)"
    select=("$bench")
    if [ "$QUICK" -eq 1 ]; then
        [ -n "${QUICK_ROWS[$name]:-}" ] || continue
        mapfile -t select < <(python -m pytest "$bench" --collect-only -q -p no:cacheprovider | grep -E "${QUICK_ROWS[$name]}")
        [ "${#select[@]}" -gt 0 ] || { echo "gpu_check: no quick rows in $bench" >&2; status=1; continue; }
    fi
    python -m pytest "${select[@]}" -q -p no:cacheprovider --benchmark-json="$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    [ -f "$OUT/$name.json" ] && jsons+=("$OUT/$name.json")
done

if [ "${#jsons[@]}" -gt 0 ]; then
    python benchmarks/report.py "${jsons[@]}" >"$OUT/report.md" || status=1
fi
echo "gpu_check: report in $OUT/report.md (status $status)"
exit "$status"
