"""The Triton kernels compiled ahead of time for sm_80 and sm_90 on the paper's shapes.

No GPU needed: ``tests/triton_aot.py`` records the launches of a dual forward + backward
on the model's layout and compiles each with Triton's own toolchain (``ptxas -v`` for
registers and spills). Asserted: no register spills for 16-bit and IEEE float32 kernels,
shared memory within ``SHARED_MEMORY_PER_BLOCK`` (what ``auto`` requires of a GPU) and
the architecture's per-block limit, cp.async gathers of the unit-stride channels the
module hands over, and warps running along the rows of unit-stride-row tensors.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import triton

from dsa_ops.ops import triton_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (B, L, Dqk, Dv, dtype, float32 matmul precision): the paper's layers 12 (widest V) and
# 14 (largest map) in 16 bits, layer 12 in float32 IEEE (the most registers) and tf32x3.
CASES = [[16, 256, 64, 512, "float16", "highest"], [16, 4096, 16, 128, "float16", "highest"],
         [16, 256, 64, 512, "float32", "highest"], [16, 256, 64, 512, "float32", "high"]]

pytestmark = pytest.mark.skipif(not os.path.exists(PTXAS),
                                reason="this Triton has no bundled ptxas (NVIDIA backend)")


@functools.lru_cache(maxsize=None)
def compiled(capability: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    request = json.dumps({"capability": capability, "cases": CASES})
    result = subprocess.run([sys.executable, "-m", "tests.triton_aot", request], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def describe(report: dict) -> str:
    return (f"sm_{report['capability']} {report['kernel']} {report['dtype']} {report['constexprs']} "
            f"warps {report['num_warps']} stages {report['num_stages']} (case {report['case']})")


@pytest.mark.parametrize("capability", [80, 90])
def test_every_kernel_compiles_within_the_shared_memory_limits(capability):
    reports = compiled(capability)
    kernels = {report["kernel"] for report in reports}
    assert kernels == {"_forward_kernel", "_delta_kernel", "_grad_kv_kernel", "_grad_q_kernel"}
    for report in reports:
        assert report["shared_bytes"] <= min(triton_common.SHARED_MEMORY_PER_BLOCK,
                                             SHARED_LIMIT[capability]), describe(report)


@pytest.mark.parametrize("capability", [80, 90])
def test_16bit_and_ieee_float32_kernels_do_not_spill(capability):
    checked = 0
    for report in compiled(capability):
        if report["dtype"] == "float32" and report["case"][5] != "highest":
            continue  # tf32/tf32x3: tensor-core float32, not held to the no-spill rule
        assert report["spill_bytes"] == 0, f"{describe(report)} spills {report['spill_bytes']} B"
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("capability", [80, 90])
def test_rows_with_unit_stride_channels_are_gathered_with_cp_async(capability):
    forwards = [r for r in compiled(capability)
                if r["kernel"] == "_forward_kernel" and r["dtype"] == "float16"]
    assert forwards and all(r["cp_async"] for r in forwards), [describe(r) for r in forwards]


@pytest.mark.parametrize("capability", [80, 90])
def test_unit_stride_rows_are_read_by_neighbouring_threads(capability):
    """grad_out reaches the backward with unit-stride rows (channel stride L): the delta
    kernel loads it as channels × rows with the threads of a warp along the rows, and the
    contiguous out rows as rows × channels with vectors along the channels."""
    delta = next(r for r in compiled(capability)
                 if r["kernel"] == "_delta_kernel" and r["dtype"] == "float16"
                 and r["constexprs"]["BLOCK_M"] != r["constexprs"]["BLOCK_DV"])
    rows, channels = delta["constexprs"]["BLOCK_M"], delta["constexprs"]["BLOCK_DV"]
    by_shape = {tuple(load["shape"]): load for load in delta["loads"]}
    grad_out, out = by_shape[channels, rows], by_shape[rows, channels]
    assert grad_out["order"][0] == 1 and grad_out["threadsPerWarp"][1] >= 8, grad_out
    assert out["order"][0] == 1 and out["sizePerThread"][1] >= 4, out


def test_16bit_dk_dv_products_use_wgmma_on_sm90():
    """The tutorial's transposed dK/dV form keeps every product on Hopper's wgmma."""
    reports = [r for r in compiled(90) if r["kernel"] == "_grad_kv_kernel" and r["dtype"] == "float16"]
    assert reports
    for report in reports:
        assert report["wgmma_dots"] >= 3 and report["other_dots"] == 0, describe(report)
