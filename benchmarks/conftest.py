"""pytest-benchmark suite for ``dsa_ops``: the fused masked-attention op, the DSA module and
the generator, against the reference and the strongest ready-made alternatives.

    pytest benchmarks/ --benchmark-only --benchmark-json=RESULTS.json
    python -m benchmarks.report RESULTS.json --png RESULTS.png --markdown RESULTS.md

What the suite makes visible (the targets; an H100 or H200 at batch 16):

- the fused backends (``dsa_ops[cuda]``, ``dsa_ops[triton]``) at least 5× faster than the
  reference in the forward and 3× in forward+backward at layer 14 (64×64×128);
- the fused backends faster than ``sdpa-mask`` (SDPA with a dense boolean mask),
  ``flex`` (FlexAttention with a block mask) and ``varlen-mem-efficient`` (gather +
  PyTorch's varlen memory-efficient attention + scatter) on every paper configuration;
- the ``DualSpatialAttention`` module faster than contextual attention (CA) at layer 14,
  against the paper's 6.4 ms vs 12.9 ms per image (``extra_info["ms_per_image"]``);
- at 256×256 the fused backends run where the reference and the dense contenders are OOM.

Families: ``test_masked_attention.py`` (the op, per branch), ``test_module.py`` (DSA module
vs CA), ``test_training.py`` (one generator training step, images/s). Configurations,
masks and FLOP counts: ``cases.py``; contenders: ``contenders.py``; measuring and
recording: ``harness.py``. Without a GPU the CPU contenders run at a reduced batch (the
test ids end in ``-cpu``) and the GPU-only ones skip with the reason; with
``--benchmark-disable`` every case runs once, as a smoke test.

``--matrix=headline`` (the default, also ``DSA_BENCH_MATRIX``) runs the cases the headline
table needs (``cases.in_headline``); ``--matrix=full`` every case. The expected duration
is printed after collection. ``-k``/``-m`` select within the matrix.

Cases that cannot run are skipped with status "unsupported" or "OOM" and the reason, and
are listed in the JSON under ``"not_run"``; the JSON's ``machine_info`` carries the GPU,
the torch/CUDA/Triton versions and the available ``dsa_ops`` backends.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

import dsa_ops
from benchmarks.cases import (DEFAULT_MATRIX, DEVICE, MATRICES, MATRIX_VARIABLE, expected_duration,
                              in_headline)
from benchmarks.harness import NOT_RUN

# The benchmark family of each test function (the report's tables).
FAMILIES = {"test_masked_attention": "op", "test_attention_module": "module",
            "test_oracle_loss": "oracle-kl", "test_generator_training_step": "training"}


def pytest_addoption(parser):
    parser.addoption("--matrix", choices=MATRICES, default=None,
                     help=f"benchmark cases to run: headline (default; ${MATRIX_VARIABLE}) = the "
                          "results table's cases in minutes, full = every case")


def selected_matrix(config) -> str:
    matrix = config.getoption("--matrix") or os.environ.get(MATRIX_VARIABLE) or DEFAULT_MATRIX
    if matrix not in MATRICES:
        raise pytest.UsageError(f"{MATRIX_VARIABLE} must be one of {', '.join(MATRICES)}; got {matrix!r}")
    return matrix


def _in_matrix(item, matrix: str) -> bool:
    if matrix == "full" or not hasattr(item, "callspec"):
        return True
    family = FAMILIES.get(item.originalname)
    if family is None:
        return True
    params = item.callspec.params
    return in_headline(family, params.get("config"), params.get("mask_kind"), params.get("dtype"))


def pytest_collection_modifyitems(config, items):
    matrix = selected_matrix(config)
    kept = [item for item in items if _in_matrix(item, matrix)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if not _in_matrix(item, matrix)])
        items[:] = kept


def pytest_report_collectionfinish(config, start_path, items):
    return [expected_duration(len(items), selected_matrix(config), DEVICE.type)]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["not_run"] = list(NOT_RUN)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["benchmark_device"] = str(DEVICE)
    machine_info["gpu"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["triton"] = _triton_version()
    machine_info["python"] = platform.python_version()
    machine_info["dsa_ops"] = dsa_ops.__version__
    machine_info["dsa_ops_backends"] = dsa_ops.available_backends(DEVICE)
