# Two entry points that set everything up themselves on a fresh machine:
#   make test    install, build the CUDA extension when nvcc is there, run the test suite
#   make bench   install, build, run the benchmarks on their default configurations; JSON, summary
#                and chart land in benchmarks/results/<date>_<device>/ (or $BENCH_OUT)
#   make gpu-check  on a GPU machine: build, GPU tests, compute-sanitizer, benchmarks (benchmarks/gpu_check.sh)
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install test bench gpu-check
install:
	$(PIP) "torch==$(TORCH_VERSION)" ninja pybind11 setuptools wheel
	$(PIP) --no-build-isolation -e ".[test,dlib]"
	$(PYTHON) -m dsa_ops

test: install
	$(PYTHON) -m pytest tests/ -q
	$(PYTHON) -m pytest benchmarks/ -q --benchmark-disable

bench: install
	$(PYTHON) -m benchmarks.run

gpu-check:
	bash benchmarks/gpu_check.sh
