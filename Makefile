# Two entry points that set everything up themselves on a fresh machine:
#   make test    install, build the CUDA extension when nvcc is there, run the test suite
#   make bench   install, build, run the headline benchmarks (a few minutes); JSON, summary
#                and chart land in benchmarks/results/<date>_<device>/ (or $BENCH_OUT)
#   make bench-full  the whole benchmark matrix (prints its expected duration first)
#   make rebuild     recompile the CUDA extension even when nothing changed
#   make gpu-check  on a GPU machine: build, GPU tests, compute-sanitizer, benchmarks (benchmarks/gpu_check.sh)
#   make emulate-sanitize  the CUDA kernels' host emulation under ASan+UBSan and TSan (before any kernel change lands)
#   make test-avx2  the numerics-sensitive tests on the AVX2 code paths of torch, oneDNN, MKL and
#                numpy's OpenBLAS, forced on any AVX2 CPU (what AMD and older Intel machines run)
#   make compat  the CPU suite (a subset covering every backend and the trainer) on the oldest and
#                newest torch/triton stacks, one virtual environment each under .compat/
# The install step reinstalls and recompiles only when csrc/, setup.py, pyproject.toml, torch,
# its CUDA version, nvcc or the arch list changed (dsa_ops/_build_stamp.py); DSA_OPS_FORCE_REBUILD=1
# forces it.
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install rebuild test test-avx2 bench bench-full gpu-check emulate-sanitize compat
install:
	$(PIP) "torch==$(TORCH_VERSION)" ninja pybind11 setuptools wheel
	$(PYTHON) dsa_ops/_build_stamp.py check || \
	    { $(PIP) --no-build-isolation -e ".[test,dlib]" && $(PYTHON) dsa_ops/_build_stamp.py record; }
	$(PYTHON) -m dsa_ops

rebuild:
	DSA_OPS_FORCE_REBUILD=1 $(MAKE) install

test: install
	$(PYTHON) -m pytest tests/ -q
	DSA_OPS_CUDA_EMULATE=1 $(PYTHON) -m pytest tests/test_backends.py tests/test_cuda_backend.py tests/test_cuda_emulation.py tests/test_attention_kl.py tests/test_attention_kl_cuda.py -q -k cuda
	$(PYTHON) -m pytest benchmarks/ -q --benchmark-disable

bench: install
	$(PYTHON) -m benchmarks.run

bench-full: install
	$(PYTHON) -m benchmarks.run --matrix=full

gpu-check:
	bash benchmarks/gpu_check.sh

emulate-sanitize:
	$(PYTHON) tests/emulation/harness.py --sanitize

# The backend suite, the Triton and KL ops, DDP/synchronised BatchNorm: the tests whose
# values depend on the CPU's kernels (docs/testing.md). Run after `make test` (or install).
AVX2_TESTS ?= tests/test_backends.py tests/test_triton.py tests/test_attention_kl.py tests/test_ddp.py \
	tests/test_cpu_kernels.py
test-avx2:
	$(PYTHON) -m tests.cpu_paths avx2 -- $(PYTHON) -m pytest $(AVX2_TESTS) -q

compat:
	bash tools/compat.sh
