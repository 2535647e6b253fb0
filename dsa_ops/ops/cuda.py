"""The "cuda" backend: whether its kernels (csrc/, loaded by ``dsa_ops.extension``) can run.

The kernels register themselves from the compiled library (``TORCH_LIBRARY_IMPL(dsa_ops,
CUDA, ...)``) or, under ``DSA_OPS_CUDA_EMULATE=1``, from their host emulation on the CPU
dispatch key; the op schemas they implement are defined by the op packages. This module
holds what the kernels need of a device — the shared memory of their largest blocks —
so that "auto" can skip them with the reason where a GPU has less.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from dsa_ops import extension

# Shared memory per block the CUDA kernels' largest blocks need, by dtype. 16-bit kernels
# fit the 99 KiB of sm_86/89/120; float32's double-buffered tiles need sm_80/sm_87/sm_90's
# 163 KiB (up to 137 KiB). Where a GPU has less, the backend says so and "auto" takes Triton.
CUDA_SHARED_MEMORY_PER_BLOCK = {torch.float16: 99 * 1024, torch.bfloat16: 99 * 1024,
                                torch.float32: 163 * 1024}
# What the host emulation grants per block (csrc/emulation/emulation.cpp), by the
# architecture it emulates (DSA_OPS_CUDA_EMULATE_ARCH, default 80).
EMULATED_SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def load() -> None:
    """Load the compiled kernels and, when requested, their host emulation (once)."""
    extension.load()
    if extension.emulation_requested():
        extension.load_emulation()


def _shared_memory(device: torch.device) -> tuple[int, str]:
    """(bytes of shared memory a block may use, the GPU's name) for the kernels' device."""
    if device.type == "cpu":
        arch = int(os.environ.get("DSA_OPS_CUDA_EMULATE_ARCH") or 80)
        return EMULATED_SHARED_MEMORY.get(arch, 0), f"the emulated sm_{arch}"
    properties = torch.cuda.get_device_properties(device)
    return (getattr(properties, "shared_memory_per_block_optin",
                    max(CUDA_SHARED_MEMORY_PER_BLOCK.values())),
            properties.name)


def shared_memory_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the ``dtype`` kernels' blocks do not fit ``device``'s shared memory, or None."""
    needed = CUDA_SHARED_MEMORY_PER_BLOCK[dtype]
    available, gpu = _shared_memory(device)
    if available >= needed:
        return None
    return (f"its {str(dtype).removeprefix('torch.')} kernels need {needed // 1024} KiB of shared "
            f"memory per block; {gpu} allows {available // 1024} KiB: use backend='triton' "
            f"(what 'auto' picks there)")


def unavailable(device: torch.device) -> Optional[str]:
    """Why the CUDA kernels cannot run on ``device`` tensors here, or None."""
    if device.type == "cpu" and extension.emulation_requested():
        return extension.emulation_error()  # DSA_OPS_CUDA_EMULATE=1: the kernels' host emulation
    if extension.load_error() is not None:
        return extension.load_error()
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors; got tensors on {device}"
    if "CUDA" not in kernel_keys("masked_attention_fwd_cuda"):
        return ("dsa_ops._C was built without its CUDA kernels (no nvcc, a CPU build of torch or "
                "DSA_OPS_NO_CUDA=1 at install time): reinstall with nvcc on the PATH or in CUDA_HOME")
    return None


def kernel_keys(op_name: str) -> frozenset[str]:
    """Dispatch keys with a kernel for ``dsa_ops::op_name``: CUDA from ``dsa_ops._C``, CPU
    from the host emulation. Both load at import, so callers fix this at import too, and
    ``torch.compile`` never has to trace the dispatcher query."""
    return frozenset(key for key in ("CUDA", "CPU")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{op_name}", key))
