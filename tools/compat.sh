#!/usr/bin/env bash
# `make compat`: the CPU test suite on each supported stack, one virtual environment per stack
# under .compat/<stack>/ (git-ignored, kept between runs: the first build downloads several GB of
# PyPI CUDA wheels; a stack whose requirements are unchanged is not reinstalled, a changed one
# is updated in place).
#
#   tools/compat.sh [STACK ...]        default: every stack below
#   COMPAT_SETUP_ONLY=1 tools/compat.sh   build the environments, run nothing
#
# Stacks (python, pins):
#   oldest  python3.12, torch 2.11 + triton 3.6   the GPU machines' stack; install_requires' floor
#   newest  python3.13, torch 2.15 + triton 3.9   the newest releases
# The machine's pip constraint file (if any) is bypassed with PIP_CONSTRAINT=/dev/null (an empty value does not override it) so these pins
# resolve; nothing outside .compat/ is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A STACK_PYTHON=(
    [oldest]="${COMPAT_PYTHON_OLDEST:-python3.12}"
    [newest]="${COMPAT_PYTHON_NEWEST:-python3.13}"
)
declare -A STACK_PINS=(
    # triton 3.6's interpreter turns 1-element arrays into Python ints, which NumPy 2.5
    # refuses ("only 0-dimensional arrays can be converted"): the NumPy of its time.
    [oldest]="torch==2.11.* triton==3.6.* numpy<2.4"
    [newest]="torch==2.15.* triton==3.9.*"
)
# install_requires and the test extra, without the project itself (tests import it from the
# working tree through PYTHONPATH, so no build step and no editable install).
DEPENDENCIES="numpy ninja pybind11 lpips face-alignment tqdm pyyaml tensorboard pillow scikit-image torchmetrics pytest pytest-benchmark matplotlib dlib-bin face-recognition-models"

# What runs in each stack (COMPAT_TESTS=tests/ for everything): every backend's shared suite
# (reference, cpu, triton under the interpreter; the CUDA backend skips without the built
# extension), the Triton specifics, the KL op, the ops and the module, and the trainer (one
# step, end-to-end training, checkpoints, 2-process gloo and synchronised BatchNorm).
SUITE="${COMPAT_TESTS:-tests/test_reference.py tests/test_backends.py tests/test_cpu_backend.py tests/test_triton.py tests/test_attention_kl.py tests/test_ops.py tests/test_modules.py tests/test_step.py tests/test_train.py tests/test_checkpoint.py tests/test_ddp.py}"

# The interpreter by name on the PATH, else a pyenv installation of it (pyenv's shims refuse
# versions that are installed but not selected).
find_python() {
    local name="$1" candidate
    if "$name" -c '' 2>/dev/null; then echo "$name"; return; fi
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/"$name"; do
        [[ -x "$candidate" ]] && { echo "$candidate"; return; }
    done
    echo "compat: $name not found (on the PATH or under pyenv); set COMPAT_PYTHON_OLDEST/NEWEST" >&2
    exit 2
}

build_stack() {
    local stack="$1" venv=".compat/$1"
    local wanted="${STACK_PINS[$stack]} $DEPENDENCIES"
    if [[ -f "$venv/.requirements" && "$(cat "$venv/.requirements")" == "$wanted" ]]; then
        return
    fi
    [[ -x "$venv/bin/python" ]] || "$(find_python "${STACK_PYTHON[$stack]}")" -m venv "$venv"
    # shellcheck disable=SC2086  # the pins and names are word lists
    PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install --disable-pip-version-check -q \
        ${STACK_PINS[$stack]} $DEPENDENCIES
    echo "$wanted" > "$venv/.requirements"
}

run_stack() {
    local stack="$1" venv=".compat/$1" start=$SECONDS
    build_stack "$stack"
    "$venv/bin/python" -c 'import sys, torch, triton; print(f"compat[{sys.argv[1]}]: python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")' "$stack"
    if [[ -z "${COMPAT_SETUP_ONLY:-}" ]]; then
        # shellcheck disable=SC2086
        PYTHONPATH="$PWD" DSA_OPS_DISABLE_EXTENSION=1 "$venv/bin/python" -m pytest $SUITE -q -p no:cacheprovider
    fi
    echo "compat[$stack]: $((SECONDS - start)) s"
}

stacks=("$@")
[[ ${#stacks[@]} -gt 0 ]] || stacks=(oldest newest)
for stack in "${stacks[@]}"; do
    [[ -n "${STACK_PINS[$stack]:-}" ]] || { echo "compat: unknown stack '$stack' (expected: ${!STACK_PINS[*]})" >&2; exit 2; }
    run_stack "$stack"
done
