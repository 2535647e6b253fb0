"""Compile every launch the Triton backend makes for some shapes, ahead of time, for a GPU
architecture this machine need not have; print one JSON line per distinct kernel.

    python -m tests.triton_aot '{"capability": 90, "cases": [[B, L, Dqk, Dv, "float16", "highest"], ...]}'

The launches are recorded by running the masked-attention Triton launchers on CPU
tensors with ``torch.library.wrap_triton`` replaced by a recorder and the GPU tile table
forced (``triton_common.capability``); each distinct launch is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))`` and
``ptxas -v`` reports registers and spills. Runs without TRITON_INTERPRET (the kernels
must be real ``JITFunction``s), hence a subprocess of the tests.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from dsa_ops import reference  # noqa: E402
from dsa_ops.ops import triton_common  # noqa: E402
from dsa_ops.ops.masked_attention import triton as masked_triton  # noqa: E402
from dsa_ops.ops.partition import triton as partition_triton  # noqa: E402


def record_launches(case, capability):
    """The (kernel, args, kwargs) of one forward + backward of the dual op on the model's
    layout: q/k/v with unit-stride channels, grad_out with unit-stride rows."""
    batch, length, qk_dim, v_dim, dtype_name, precision = case
    dtype = getattr(torch, dtype_name)
    records = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.fn, args, kwargs))

    saved = (torch.library.wrap_triton, triton_common.capability,
             partition_triton.partition_indices, torch.get_float32_matmul_precision())
    torch.library.wrap_triton = Recorder
    triton_common.capability = lambda device: (capability // 10, capability % 10)
    partition_triton.partition_indices = reference.partition_indices
    torch.set_float32_matmul_precision(precision)
    try:
        packed = torch.zeros(batch, length, 2 * (2 * qk_dim + v_dim), dtype=dtype)
        branches = packed.split([qk_dim, qk_dim, v_dim] * 2, dim=2)
        foreground = torch.zeros(batch, length, dtype=torch.bool)
        foreground[:, : length // 4] = True
        outputs = masked_triton.dual_forward(*branches, foreground, 0.125)
        grad_out = torch.zeros(batch, v_dim, length, dtype=dtype).transpose(1, 2)
        masked_triton.dual_backward(grad_out, grad_out, *branches, *outputs[:4], foreground,
                                    *outputs[4:], 0.125)
    finally:
        (torch.library.wrap_triton, triton_common.capability, partition_triton.partition_indices,
         precision) = saved
        torch.set_float32_matmul_precision(precision)
    return records


def _ptxas_report(ptx: str, capability: int) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{capability}{'a' if capability == 90 else ''}"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o",
                                 os.path.join(folder, "kernel.o")], capture_output=True, text=True)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    registers = re.search(r"Used (\d+) registers", result.stderr)
    if not (spills and registers):
        raise RuntimeError(f"unexpected ptxas output: {result.stderr[-500:]}")
    return dict(registers=int(registers.group(1)),
                spill_bytes=int(spills.group(1)) + int(spills.group(2)))


def _load_layouts(ttgir: str) -> list[dict]:
    """Shape and thread arrangement of every 2-D floating-point load in the TTGIR."""
    layouts = {}
    for name, body in re.findall(r"^(#\w+) = #ttg\.blocked<\{([^}]*)\}>", ttgir, re.M):
        fields = dict(re.findall(r"(\w+) = \[([\d, ]*)\]", body))
        layouts[name] = {key: [int(x) for x in value.split(",")] for key, value in fields.items()}
    loads = []
    for shape, element, layout in re.findall(
            r"tt\.load .*?: tensor<(\d+x\d+)x!tt\.ptr<(f16|bf16|f32)>, (#\w+)>", ttgir):
        if layout in layouts:
            loads.append(dict(shape=[int(x) for x in shape.split("x")], **layouts[layout]))
    return loads


def compile_launches(cases, capability):
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    seen = set()
    for case in cases:
        for fn, args, kwargs in record_launches(case, capability):
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                                  specialization, options)
            key = (fn.__name__, str(sorted(signature.items())),
                   str(sorted(constexprs.items(), key=str)), str(options.hash()))
            if key in seen:
                continue
            seen.add(key)
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            blocks = {name: value for name, value in kwargs.items() if name.isupper()}
            yield dict(case=case, capability=capability, kernel=fn.__name__,
                       constexprs={k: v for k, v in blocks.items() if k.startswith("BLOCK")},
                       num_warps=options.num_warps, num_stages=options.num_stages,
                       dtype=case[4], shared_bytes=kernel.metadata.shared,
                       cp_async="cp.async" in kernel.asm["ptx"],
                       loads=_load_layouts(kernel.asm["ttgir"]),
                       wgmma_dots=len(re.findall(r"ttng\.warp_group_dot ", kernel.asm["ttgir"])),
                       other_dots=len(re.findall(r"= tt\.dot ", kernel.asm["ttgir"])),
                       **_ptxas_report(kernel.asm["ptx"], capability))


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    for report in compile_launches(request["cases"], request["capability"]):
        print(json.dumps(report), flush=True)
