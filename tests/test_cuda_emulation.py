"""The host emulation of the CUDA kernels (csrc/device/primitives.cuh, csrc/emulation/).

- the primitives against their PTX definitions (tests/emulation/primitives_test.cpp);
- the kernels against a float64 reference, and the same harness failing when a fault is
  planted at compile time (DSA_OPS_EMULATION_FAULT: swapped mma A-fragment registers, a
  dropped __syncthreads);
- the backend switch: DSA_OPS_CUDA_EMULATE=1 (read at import) makes ``backend="cuda"``
  take CPU tensors, and without it nothing changes.

``make test`` runs this file twice, without and with the variable (the second time with
the numerical suites tests/test_backends.py and tests/test_cuda_backend.py on the emulated
backend). Needs g++ and the CUDA headers, as the emulated build does.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import dsa_ops
from dsa_ops import extension, ops
from tests.emulation import harness

ROOT = pathlib.Path(__file__).resolve().parents[1]

needs_host_build = pytest.mark.skipif(
    shutil.which("g++") is None or extension.cuda_include_dir() is None,
    reason="needs g++ and the CUDA headers (cuda_fp16.h)")
# The g++-built programs do not depend on the variable: they run once, in the plain session.
plain_session_only = pytest.mark.skipif(
    extension.emulation_requested(), reason="runs in make test's session without the variable")

CUDA_OPS = ("partition_indices", "masked_attention_fwd_cuda", "masked_attention_bwd_cuda",
            "dual_masked_attention_fwd_cuda", "dual_masked_attention_bwd_cuda",
            "attention_kl_fwd_cuda", "attention_kl_bwd_cuda")


def _run(program: str, *args: str, fault: int = 0, optimize: str = "-O1"):
    result = harness.run(harness.build(program, fault=fault, optimize=optimize), *args, timeout=600)
    return result.returncode, result.stdout + result.stderr


@needs_host_build
@plain_session_only
def test_primitives_match_their_ptx_definitions():
    returncode, output = _run("primitives_test")
    assert returncode == 0, output
    assert "primitives: 0 failed checks" in output


def test_emulated_build_takes_every_file_setup_py_compiles_under_distinct_names(tmp_path):
    """Every op has its own bindings.cpp (and forward.cu): the JIT builder names objects by
    file name alone, so each file goes in through a wrapper named by its path. The CPU
    kernels of cpu/ folders emulate nothing and stay out (dsa_ops._C registers them)."""
    sources = [pathlib.Path(s) for s in extension.emulation_sources(tmp_path)]
    assert len({s.name for s in sources}) == len(sources)
    assert sources[0] == ROOT / "csrc" / "emulation" / "emulation.cpp"
    included = {pathlib.Path(s.read_text().split('"')[1]) for s in sources[1:]}
    every_source = {p for p in (ROOT / "csrc").glob("**/*") if p.suffix in (".cu", ".cpp")}
    cpu_kernels = {p for p in every_source if "cpu" in p.relative_to(ROOT / "csrc").parts}
    assert ROOT / "csrc" / "masked_attention" / "cpu" / "attention.cpp" in cpu_kernels
    compiled = {p for p in every_source - cpu_kernels
                if "emulation" not in p.relative_to(ROOT / "csrc").parts}
    assert included == compiled
    assert {p.relative_to(ROOT / "csrc").as_posix() for p in compiled if p.name == "bindings.cpp"} == {
        "partition/bindings.cpp", "masked_attention/bindings.cpp", "attention_kl/bindings.cpp"}


# (fault, what it plants): the quick float16 case must pass clean and fail with each fault.
FAULTS = [(0, "none"), (1, "mma A-fragment registers 1 and 2 swapped"),
          (2, "second __syncthreads of every block dropped")]


@needs_host_build
@plain_session_only
@pytest.mark.parametrize("fault, planted", FAULTS, ids=[name for _, name in FAULTS])
def test_kernel_harness_catches_planted_faults(fault, planted):
    returncode, output = _run("kernels_check", "--quick", fault=fault, optimize="-O0")
    if fault == 0:
        assert returncode == 0 and "FAILURES: 0" in output, output
    else:
        assert returncode != 0 and "FAIL" in output, f"fault not caught ({planted}):\n{output}"


needs_emulation = pytest.mark.skipif(not extension.emulation_requested(),
                                     reason=f"runs with {extension.EMULATE_VARIABLE}=1 (make test)")


@pytest.mark.skipif(extension.emulation_requested(),
                    reason=f"checks the import without {extension.EMULATE_VARIABLE}=1")
def test_without_the_variable_cuda_takes_no_cpu_tensors():
    assert "cuda" not in dsa_ops.available_backends("cpu")
    assert ops.backend_unavailable_reason("cuda", "cpu") is not None
    for name in CUDA_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{name}", "CPU"), name


@needs_emulation
def test_with_the_variable_cuda_is_a_cpu_backend():
    assert "cuda" in dsa_ops.available_backends("cpu")
    assert ops.backend_unavailable_reason("cuda", "cpu") is None


@needs_emulation
@pytest.mark.parametrize("arch", [80, 86, 89, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_takes_what_the_gpus_shared_memory_holds(monkeypatch, arch, dtype):
    """16-bit kernels fit every GPU with 99 KiB per block; float32's need the 163 KiB of
    sm_80/90: on sm_86/89 the backend says why and "auto" takes Triton. The emulation
    refuses oversized launches as those GPUs do, which ``test_kernels_fit_99_kib_gpus`` runs."""
    monkeypatch.setenv("DSA_OPS_CUDA_EMULATE_ARCH", str(arch))
    q, v = torch.zeros(1, 4, 16, dtype=dtype), torch.zeros(1, 4, 512, dtype=dtype)
    reason = ops.get_backend("cuda").unsupported_reason(q, v)
    if dtype == torch.float32 and arch in (86, 89):
        assert "163 KiB" in reason and "99 KiB" in reason and "triton" in reason
    else:
        assert reason is None


# Forward and backward of the cuda backend against the reference, on the emulated GPU of
# DSA_OPS_CUDA_EMULATE_ARCH, for each (form, Dqk, Dv, scale) of CASES, in both 16-bit dtypes.
_BACKEND_ON_ARCH = """
import torch, dsa_ops
from tests.attention_cases import assert_close_by_dtype, make_case, reference_results
for dtype in (torch.bfloat16, torch.float16):
    for form, qk_dim, v_dim, scale in CASES:
        case = make_case(4, HEIGHT, WIDTH, qk_dim, v_dim, form=form, dtype=dtype, scale=scale,
                         seed=v_dim)
        q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
        out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask,
                                       scale=case.scale, backend="cuda")
        out.backward(case.grad_out)
        (exact_out, exact_grads), (base_out, base_grads) = (
            reference_results(case, exact=True), reference_results(case, exact=False))
        assert_close_by_dtype(out, exact_out, base_out, "out")
        for name, grad, exact, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad),
                                           exact_grads, base_grads):
            assert_close_by_dtype(grad, exact, base, name)
print("matches the reference")
"""


def _backend_matches_reference_on(arch: int, cases, height: int, width: int) -> None:
    """_BACKEND_ON_ARCH in a subprocess: the emulated architecture is fixed per process."""
    script = (_BACKEND_ON_ARCH.replace("CASES", repr(tuple(cases)))
              .replace("HEIGHT", str(height)).replace("WIDTH", str(width)))
    env = {**os.environ, "DSA_OPS_CUDA_EMULATE_ARCH": str(arch)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "matches the reference" in result.stdout, (
        result.stdout + result.stderr)


@needs_emulation
def test_kernels_fit_99_kib_gpus():
    """16-bit forward and backward on an emulated sm_86 (99 KiB per block; the emulation
    refuses larger launches as the GPU does): the forward's widest V blocks (256 columns, Dv
    512 in two halves) and the key side at Dqk 64 with V in 128-column chunks fit."""
    _backend_matches_reference_on(86, [("cross", 64, 512, None), ("cross", 64, 256, None),
                                       ("cross", 16, 136, None)], height=7, width=10)


@needs_emulation
def test_forward_with_128_key_tiles_on_sm_90():
    """On an emulated sm_90 (228 KiB of shared memory an SM) the 16-bit forward takes
    128-key tiles for Dqk ≤ 32, Dv ≤ 128 (two blocks still fit an SM); the rest of the suite
    runs the default sm_80, where it keeps 64. L = 156: a full and a partial key tile, a
    negative scale among the cases."""
    _backend_matches_reference_on(90, [("cross", 16, 128, None), ("self", 32, 64, -0.5),
                                       ("cross", 20, 100, 2.0)], height=12, width=13)


@needs_emulation
@pytest.mark.parametrize("name", CUDA_OPS)
def test_emulation_registers_a_cpu_kernel_for_every_cuda_op(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{name}", "CPU")


@needs_emulation
def test_emulated_bindings_reject_unsupported_inputs_naming_the_argument():
    q = torch.randn(2, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"v must have shape \(B, L, Dv\)"):
        torch.ops.dsa_ops.masked_attention_fwd_cuda(q, q, torch.randn(2, 9, 8), mask, mask, 1.0)
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16"):
        torch.ops.dsa_ops.masked_attention_fwd_cuda(q.double(), q.double(), q.double(), mask,
                                                    mask, 1.0)
