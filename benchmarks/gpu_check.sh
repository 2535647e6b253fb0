#!/usr/bin/env bash
# The GPU verification of this repository in one borrowed GPU call (<= 8 minutes on one
# H100/H200 with 16 CPU cores): build the extension for the present GPU only, run the
# GPU tests of every backend, compute-sanitizer over one small case per kernel family,
# and the headline benchmarks with every contender, report and chart.
#
#   bash benchmarks/gpu_check.sh [--plan] [--help] [STAGE...]
#
# Stages (default: build test sanitize bench): build, test, test-full (every test file that
# runs kernels on the GPU, long), sanitize, bench (writes the report too), report (re-render
# the report from $OUT/results.json). --plan prints the stages with their estimated times.
#
# Output, all in $OUT (default benchmarks/results/<date>_<gpu>/), flat, at most 5 files:
#   gpu-check.log  every stage's output in turn (the screen shows each stage's tail)
#   verdict.txt    one line per stage: ok / FAILED (exit N) / not supported here / timed out
#   results.json, summary.md, chart.png   the benchmarks (benchmarks/run.py)
#
# Environment: PYTHON (python3), OUT, BENCH_MATRIX (headline | full), BENCH_FILTER (a pytest
# -k expression for the benchmarks), TORCH_CUDA_ARCH_LIST (default: the present GPU's),
# MAX_JOBS (default: every core), GPU_CHECK_BUDGET_S (480: a stage that would end past it is
# interrupted, so the run returns its files in time).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ALL_STAGES=(build test test-full sanitize bench report)
DEFAULT_STAGES=(build test sanitize bench)
declare -A ESTIMATE=(  # seconds on one H100/H200 with 16 cores: design estimates until measured
    [build]=180 [test]=60 [test-full]=600 [sanitize]=60 [bench]=180 [report]=15)
declare -A WHAT=(
    [build]="pip install --no-build-isolation --no-deps -e . for the present GPU's arch only, MAX_JOBS=nproc (skipped when the build stamp matches)"
    [test]="pytest -m gpu tests/: op, dual op and KL of every backend, module, generator step under CUDA AMP, torch.compile (inductor)"
    [test-full]="pytest on every file that runs kernels on the GPU (the whole CUDA and Triton suites)"
    [sanitize]="compute-sanitizer memcheck + racecheck on one small case per kernel family (tests/sanitize_families.py)"
    [bench]="python -m benchmarks.run --matrix=\${BENCH_MATRIX:-headline}: paper layers, every contender; JSON, summary, chart"
    [report]="python -m benchmarks.report on \$OUT/results.json: summary.md and chart.png again")

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--plan] [--help] [STAGE...]"
    echo "stages: ${ALL_STAGES[*]} (default: ${DEFAULT_STAGES[*]})"
}

plan() {  # plan STAGE...: the stages, what they do and their estimated times
    local total=0 stage
    echo "gpu-check plan (estimated seconds on one H100/H200 with 16 CPU cores):"
    for stage in "$@"; do
        printf '  %-9s ~%4ss  %s\n' "$stage" "${ESTIMATE[$stage]}" "${WHAT[$stage]}"
        total=$((total + ESTIMATE[$stage]))
    done
    printf '  %-9s ~%4ss  (budget GPU_CHECK_BUDGET_S=%s)\n' total "$total" "${GPU_CHECK_BUDGET_S:-480}"
}

show_plan=0
stages=()
for arg in "$@"; do
    case $arg in
        --plan) show_plan=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
        *) if [[ -z ${ESTIMATE[$arg]+set} ]]; then
               echo "gpu_check.sh: unknown stage '$arg' (stages: ${ALL_STAGES[*]})" >&2; exit 2
           fi
           stages+=("$arg") ;;
    esac
done
[ ${#stages[@]} -eq 0 ] && stages=("${DEFAULT_STAGES[@]}")
if [ $show_plan -eq 1 ]; then plan "${stages[@]}"; exit 0; fi
budget=${GPU_CHECK_BUDGET_S:-480}
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: GPU_CHECK_BUDGET_S must be a whole number of seconds; got '$budget'" >&2; exit 2
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
capability=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
OUT=${OUT:-benchmarks/results/$(date +%F)_$(echo "${gpu:-no-gpu}" | tr 'A-Z ' 'a-z-')}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
VERDICT=$OUT/verdict.txt
: > "$LOG"
: > "$VERDICT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DSA_OPS_EXPECT_EXTENSION=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ -n "$capability" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$capability}
started=$SECONDS
status=0

verdict() {  # verdict STAGE TEXT SECONDS
    printf '%-9s %s (%ss)\n' "$1" "$2" "$3" | tee -a "$VERDICT" >> "$LOG"
}

run_stage() {  # run_stage NAME COMMAND...: log, show the tail, record the verdict
    local stage=$1 begin=$SECONDS left code; shift
    left=$((budget - (SECONDS - started)))
    if [ $left -le 0 ]; then verdict "$stage" "not run: budget of ${budget}s spent" 0; status=1; return; fi
    echo "=== $stage ($(date +%T), ${left}s of the budget left): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=20 "$left" "$@" 2>&1 | tee -a "$LOG" | tail -n 25
    code=${PIPESTATUS[0]}
    case $code in
        0) verdict "$stage" ok $((SECONDS - begin)) ;;
        124|137) verdict "$stage" "timed out (budget ${budget}s)" $((SECONDS - begin)); status=1 ;;
        *) verdict "$stage" "FAILED (exit $code)" $((SECONDS - begin)); status=1 ;;
    esac
}

sanitize() {  # compute-sanitizer where this machine supports it; "not supported here" otherwise
    local begin=$SECONDS probe tool
    if ! command -v compute-sanitizer > /dev/null; then
        verdict sanitize "not supported here: compute-sanitizer not found" 0; return
    fi
    # Some container runtimes block the debugger interface the sanitizer needs: a trivial
    # CUDA program tells that apart from a finding in our kernels.
    probe=$(compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -c \
            "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()" 2>&1)
    if [ $? -ne 0 ]; then
        { echo "=== sanitize probe (a trivial CUDA program) failed:"; echo "$probe"; } >> "$LOG"
        verdict sanitize "not supported here: $(echo "$probe" | grep -m1 -i 'error' || echo "$probe" | tail -n 1)" \
            $((SECONDS - begin))
        return
    fi
    for tool in memcheck racecheck; do
        run_stage "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "$PYTHON" tests/sanitize_families.py
    done
}

for stage in "${stages[@]}"; do
    case $stage in
        build)
            if [ -z "$gpu" ]; then verdict build "FAILED: no GPU visible (nvidia-smi)" 0; status=1; continue; fi
            run_stage build bash -c "echo GPU: $gpu, sm_$capability, TORCH_CUDA_ARCH_LIST=\$TORCH_CUDA_ARCH_LIST, MAX_JOBS=\$MAX_JOBS \
                && $PYTHON -m pip install --no-build-isolation --no-deps -e . \
                && $PYTHON -m dsa_ops && nvidia-smi && (nvcc --version || true) \
                && $PYTHON -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)' \
                && (git rev-parse HEAD || true)" ;;
        test)
            run_stage test "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m gpu tests/ ;;
        test-full)
            run_stage test-full "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py \
                tests/test_attention_kl_cuda.py tests/test_backends.py tests/test_triton.py tests/test_ops.py \
                tests/test_modules.py tests/test_generator.py tests/test_attention_kl.py ;;
        sanitize) sanitize ;;
        bench)
            run_stage bench env BENCH_OUT="$OUT" "$PYTHON" -m benchmarks.run -p no:cacheprovider \
                --matrix="${BENCH_MATRIX:-headline}" ${BENCH_FILTER:+-k "$BENCH_FILTER"} ;;
        report)
            run_stage report "$PYTHON" -m benchmarks.report "$OUT/results.json" \
                --markdown "$OUT/summary.md" --png "$OUT/chart.png" ;;
    esac
done

echo "=== verdict ($OUT, $((SECONDS - started))s)"
cat "$VERDICT"
exit $status
