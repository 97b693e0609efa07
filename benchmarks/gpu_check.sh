#!/usr/bin/env bash
# One command for a CUDA machine, an air-gapped one too (nothing is fetched, ever): install the project
# offline, run the tests on the GPU with compiled Triton kernels (TRITON_INTERPRET unset), then the
# benchmarks, and write a Markdown report.
#
#   bash benchmarks/gpu_check.sh [--quick] [--wheels DIR] [--steps LIST] [--plan] [OUT_DIR]   # ./gpu_report
#
# Install steps (pip with --no-index; PYTHON picks the interpreter, default python3):
#   - install: the project, `pip install --no-index --no-deps --no-build-isolation -e .` (with this Python's
#     own setuptools; `rcpo_losses.kernels` exists only once installed: it is mapped from kernels/rcpo_kernels/);
#   - peers, with --wheels DIR only: the `bench` extra (trl, liger-kernel, cut-cross-entropy: the peer rows,
#     benchmarks/peers.py) and what they need, from the wheels benchmarks/gpu_wheels.sh downloaded on a
#     connected machine: `pip install --no-index --find-links DIR -e ".[bench]"`; if pip cannot resolve that
#     against this Python's packages, the folder's wheels with --no-deps (said so);
#   - deps: benchmarks/gpu_deps.py says once which optional package is missing (a peer, transformers,
#     datasets...) and which tests and rows skip without it;
#   - cuda: without a CUDA device the script stops here: "no CUDA device", exit status 2.
# RCPO_NO_INSTALL=1 skips install and peers (the project must be installed already).
#
# Full mode: the whole test suite, then every benchmarks/bench_*.py at its full grid.
# --quick: the CUDA kernel tests (choice kernels, token stats, logit transforms, fused linear, prefix-shared
# attention) and the headline benchmark rows only:
#   - choice losses (MNL, Mallows-RMJ), torch and triton, fwd+bwd at B=4096 and B=262144, S=8;
#   - token stats, bf16 [16384, 128256], chunked, triton and TRL's selective_log_softmax_and_entropy, fwd and
#     fwd+bwd;
#   - fused linear, N=4096, H=4096, V=128256: unfused, fused, fused with entropy=False, TRL's
#     ChunkedLogProbFunction, cut-cross-entropy (impl="cce") and Liger's fused linear cross-entropy, fwd and
#     fwd+bwd;
#   - one RCPO training step (bench_ranked_step: tiny Llama, 16 prompts x 5 completions, bf16), padded (sdpa)
#     vs prefix-shared (flex_attention with a BlockMask), and the DPO pair step.
# --steps tests,bench_tokens: only these of the steps after the CUDA check (for a rerun).
# --plan: print the plan and the time budget, and exit.
#
# Time budget: the plan, printed before the first step, gives each step's expected cost and its time limit.
# Each step runs under its own limit (timeout -s INT: pytest stops, prints what it has, and the script goes
# on); each test and benchmark row under RCPO_ROW_LIMIT seconds (pytest-timeout, where installed: a compile
# or autotuning that hangs fails its row only); and the whole run under a total limit, 450 s with --quick,
# so that one rerun fits in 15 minutes of a GPU machine, its start included.
#
# OUT_DIR gets 7 files, each written as the run goes (a run cut short keeps what it measured):
# gpu_check.log (the plan, each step's time and status, what is missing), env.txt, install.txt, tests.txt,
# bench.txt (the benchmarks' pytest output), bench.jsonl (one line per measured row, benchmarks/conftest.py)
# and report.md (from bench.jsonl, rewritten after each benchmark file).
# Exit status: 0 when every step passed, 1 otherwise, 2 without CUDA.
set -uo pipefail

QUICK=0 PLAN=0 WHEELS="" ONLY="" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --plan) PLAN=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}" && shift ;;
    --steps) ONLY=",${2:?--steps needs a comma-separated list}," && shift ;;
    -*) echo "gpu_check: unknown option $1 (usage: the top of $0)" >&2 && exit 64 ;;
    *) OUT="$1" ;;
    esac
    shift
done
if [ -n "$WHEELS" ]; then
    WHEELS="$(cd "$WHEELS" && pwd)" || exit 64
fi
OUT="${OUT:-./gpu_report}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 64
cd "$(dirname "$0")/.." || exit 64
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# name, expected seconds, limit with --quick, limit in full mode, what it does.
# The expected costs are estimates for an H100/H200 node (16 cores), not yet measured there.
STEPS=(
    "env 5 30 30 versions, nvidia-smi, pip list"
    "install 10 60 60 the project, offline"
    "peers 15 60 60 the bench extra from --wheels DIR, offline"
    "deps 15 45 45 which optional packages are missing"
    "cuda 5 30 30 torch sees a CUDA device"
    "tests 120 180 3600 the kernel tests, compiled (full: the suite)"
    "bench_choice 30 60 1800 choice losses, torch and triton"
    "bench_tokens 40 90 1800 token stats at 16384 x 128256 bf16"
    "bench_fused_linear 80 150 1800 fused LM head at 4096 x 4096 x 128256"
    "bench_ranked_step 60 120 1800 one RCPO step, tiny Llama"
)
if [ "$QUICK" -eq 0 ]; then
    for bench in benchmarks/bench_*.py; do
        name="$(basename "$bench" .py)"
        [[ " ${STEPS[*]} " == *" $name "* ]] || STEPS+=("$name 60 60 1800 every row")
    done
fi
for name in ${ONLY//,/ }; do
    [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_check: --steps: no step $name" >&2 && exit 64; }
done
TOTAL=$([ "$QUICK" -eq 1 ] && echo 450 || echo 14400)
ROW_LIMIT="${RCPO_ROW_LIMIT:-$([ "$QUICK" -eq 1 ] && echo 60 || echo 1200)}"
declare -A QUICK_ROWS=(
    [bench_choice]='copy_baseline|\[[a-z_]+-(torch|triton)-(4096|262144)-8\]'
    [bench_tokens]='\[(fwd|fwd_bwd)-(chunked|triton|trl)-16384x128256-bf16\]'
    [bench_fused_linear]='\[(fwd|fwd_bwd)-(unfused|fused|fused\.noent|trl\.chunked|cce|liger)-4096x4096x128256-bfloat16\]'
    [bench_ranked_step]='test_ranked_step\[(ranked|dpo_pair)-(padded_all_rows|prefix_shared)\]'
    [bench_user_kernel]='test_user_kernel_step' # the step with flash_attention_2 padded vs switched to flex prefix-shared
)

START=$SECONDS
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

limit_of() {  # the time limit of step $1: its own, within what is left of the total
    local name exp quick full what left
    for spec in "${STEPS[@]}"; do
        read -r name exp quick full what <<<"$spec"
        [ "$name" = "$1" ] || continue
        left=$((TOTAL - (SECONDS - START)))
        local own=$([ "$QUICK" -eq 1 ] && echo "$quick" || echo "$full")
        echo $((own < left ? own : left))
        return
    done
}

plan() {
    local name exp quick full what sum_exp=0
    say "plan ($([ "$QUICK" -eq 1 ] && echo --quick || echo full), total limit ${TOTAL} s, each test or row ${ROW_LIMIT} s):"
    for spec in "${STEPS[@]}"; do
        read -r name exp quick full what <<<"$spec"
        wanted "$name" || continue
        [ "$QUICK" -eq 1 ] || exp="?" quick="$full"  # no estimates for the full grid
        say "$(printf '  %-18s expected %4s s, limit %4s s: %s' "$name" "$exp" "$quick" "$what")"
        [ "$exp" = "?" ] || sum_exp=$((sum_exp + exp))
    done
    say "  expected in all: $([ "$QUICK" -eq 1 ] && echo "${sum_exp} s" || echo "no estimate"); stops by ${TOTAL} s whatever happens"
}

wanted() {  # whether step $1 runs: the install steps and the CUDA check always (unless told), the rest as --steps says
    case "$1" in
    env | deps | cuda) return 0 ;;
    install) [ "${RCPO_NO_INSTALL:-0}" != 1 ] ;;
    peers) [ -n "$WHEELS" ] && [ "${RCPO_NO_INSTALL:-0}" != 1 ] ;;
    *) [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]] ;;
    esac
}

STEP_RC=0
step() {  # step NAME LOGFILE CMD...: run CMD under the step's limit, its output into LOGFILE (and stdout)
    local name="$1" log="$2" limit t0
    shift 2
    limit="$(limit_of "$name")"
    if [ "$limit" -le 0 ]; then
        say "$name: not run, the total limit of ${TOTAL} s is spent"
        STEP_RC=124
        return
    fi
    say "$name: start (limit ${limit} s, ${SECONDS} s since start)"
    t0=$SECONDS
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
    STEP_RC=${PIPESTATUS[0]}
    if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then
        say "$name: stopped at its time limit of ${limit} s (what it measured is kept)"
    fi
    say "$name: exit status $STEP_RC after $((SECONDS - t0)) s"
}

plan
[ "$PLAN" -eq 0 ] || exit 0
rm -f "$OUT"/{env.txt,install.txt,tests.txt,bench.txt,bench.jsonl,report.md}  # this run's results only
status=0

export PY WHEELS
step env "$OUT/env.txt" bash -c 'date -u; uname -a; nvidia-smi || true
    "$PY" -c "import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__)"
    "$PY" -m pip list'

if [ "${RCPO_NO_INSTALL:-0}" != 1 ]; then
    step install "$OUT/install.txt" "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
    if [ "$STEP_RC" -ne 0 ]; then
        say "the project did not install (see $OUT/install.txt): without it rcpo_losses.kernels does not exist"
        exit 1
    fi
    if wanted peers; then
        step peers "$OUT/install.txt" bash -c '
            "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e ".[bench]" && exit 0
            echo "gpu_check: pip could not resolve the bench extra here: the wheels of $WHEELS with --no-deps"
            "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl'
        [ "$STEP_RC" -eq 0 ] || status=1
        "$PY" -m pip check >>"$OUT/install.txt" 2>&1 || say "pip check reports conflicts (see $OUT/install.txt)"
    else
        say "no --wheels DIR: the peers are not installed (benchmarks/gpu_wheels.sh DIR, on a connected machine)"
    fi
fi

step deps "$LOG" "$PY" benchmarks/gpu_deps.py

step cuda "$LOG" "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
if [ "$STEP_RC" -ne 0 ]; then
    say "no CUDA device visible to torch: stopping before the GPU steps"
    exit 2
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST+=(--timeout="$ROW_LIMIT")
else
    say "pytest-timeout is not installed: no per-row time limit, the step limits only"
fi

if wanted tests; then
    if [ "$QUICK" -eq 1 ]; then
        tests=(tests/test_kernels_choice.py tests/test_tokens.py tests/test_logit_transform.py
            tests/test_fused_linear.py tests/test_prefix_shared.py)
    else
        tests=(tests)
    fi
    step tests "$OUT/tests.txt" "${PYTEST[@]}" "${tests[@]}"
    [ "$STEP_RC" -eq 0 ] || status=1
fi

export RCPO_BENCH_JSONL="$OUT/bench.jsonl"
for spec in "${STEPS[@]}"; do
    read -r name _ <<<"$spec"
    [[ "$name" == bench_* ]] && wanted "$name" || continue
    rows=""
    [ "$QUICK" -eq 0 ] || rows="${QUICK_ROWS[$name]:-}"
    export RCPO_BENCH_ROWS="$rows"
    step "$name" "$OUT/bench.txt" "${PYTEST[@]}" "benchmarks/$name.py"
    [ "$STEP_RC" -eq 0 ] || status=1
    if [ -s "$OUT/bench.jsonl" ]; then
        "$PY" benchmarks/report.py "$OUT/bench.jsonl" >"$OUT/report.md.part" && mv "$OUT/report.md.part" "$OUT/report.md"
    fi
done

say "done in $((SECONDS - START)) s: report in $OUT/report.md (status $status)"
exit "$status"
