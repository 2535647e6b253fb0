#!/usr/bin/env bash
# The GPU verification of this repository in as few device calls as possible: build the
# extension, run every test that needs a GPU, compute-sanitizer over the CUDA kernels,
# and the benchmark suite. Everything it writes goes under $OUT (default: a dated folder
# in benchmarks/results/), so one call brings back all logs and the benchmark JSON.
#
#   bash benchmarks/gpu_check.sh [build] [test] [sanitize] [bench] [report]   (default: all)
#
# Each stage logs to $OUT/<stage>.log and the script ends with a one-line verdict per
# stage. BENCH_FILTER (a pytest -k expression) limits the benchmark stage, e.g. to fit one
# stage into a time-limited call: BENCH_FILTER="not 256x256 and not 128x128".
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-')
name="$(date +%F)_${gpu:-no-gpu}"
OUT=${OUT:-benchmarks/results/$name}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DSA_OPS_EXPECT_EXTENSION=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench report)
declare -A verdict

run_stage() {  # run_stage NAME COMMAND...: log to $OUT/NAME.log, remember the exit code
    local stage=$1; shift
    echo "=== $stage: $*"
    "$@" 2>&1 | tee "$OUT/$stage.log" | tail -n 25
    verdict[$stage]=${PIPESTATUS[0]}
}

for stage in "${stages[@]}"; do
    case $stage in
        build)
            run_stage build bash -c "$PYTHON -m pip install --no-build-isolation --no-deps -e . \
                && $PYTHON -m dsa_ops && nvidia-smi && nvcc --version \
                && $PYTHON -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)' \
                && git rev-parse HEAD" ;;
        test)
            run_stage test "$PYTHON" -m pytest -q -rs tests/test_backends.py tests/test_cuda_backend.py \
                tests/test_ops.py tests/test_modules.py tests/test_reference.py tests/test_generator.py ;;
        sanitize)
            for tool in memcheck racecheck; do
                run_stage "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 \
                    "$PYTHON" tests/sanitize_cuda.py
            done ;;
        bench)
            run_stage bench "$PYTHON" -m pytest benchmarks/ --benchmark-only -q \
                -k "${BENCH_FILTER:-}" --benchmark-json="$OUT/$name.json" ;;
        report)
            run_stage report "$PYTHON" -m benchmarks.report "$OUT/$name.json" \
                --markdown "$OUT/$name.md" --png "$OUT/$name.png" ;;
        *) echo "unknown stage '$stage' (build, test, sanitize, bench, report)"; exit 2 ;;
    esac
done

echo "=== verdict ($OUT)"
status=0
for stage in "${!verdict[@]}"; do
    echo "$stage: $([ "${verdict[$stage]}" -eq 0 ] && echo ok || echo "FAILED (exit ${verdict[$stage]})")"
    [ "${verdict[$stage]}" -eq 0 ] || status=1
done
exit $status
