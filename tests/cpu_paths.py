"""Run a command on a forced CPU code path, to see what another CPU computes.

    python -m tests.cpu_paths avx2 -- python -m pytest tests/test_backends.py -q

Floating-point results depend on which kernels a library picks for the CPU it runs on. An
AVX-512 machine can run the kernels of an AVX2-only one (AMD before Zen 4, older Intel):

- ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own vectorised CPU kernels (check:
  ``torch.backends.cpu.get_cpu_capability()``).
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (convolutions, some matmuls; check: ``ONEDNN_VERBOSE=1``).
- ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL (torch's BLAS on x86; check: ``MKL_VERBOSE=1``).
- ``OPENBLAS_CORETYPE=Haswell``: numpy's OpenBLAS, which the Triton interpreter uses for
  ``tl.dot`` (check: ``python -m tests.cpu_paths avx2`` prints the core OpenBLAS chose).

On a machine without AVX2 these settings cannot raise the instruction set; the check below
then fails with the capability the libraries report.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

CPU_PATHS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
}
EXPECTED = {"avx2": {"torch": "AVX2", "openblas": "Haswell"}}


def openblas_core() -> str:
    """The kernel family numpy's OpenBLAS chose (``gotoblas_corename``), or why unknown."""
    import numpy

    libraries = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs",
                                       "*openblas*.so*"))
    for path in libraries:
        library = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            if hasattr(library, symbol):
                function = getattr(library, symbol)
                function.restype = ctypes.c_char_p
                return function().decode()
    return "unknown (numpy does not bundle OpenBLAS here)"


def describe() -> dict[str, str]:
    """What this process's libraries run on: torch's CPU capability and OpenBLAS's core."""
    import torch

    return {"torch": torch.backends.cpu.get_cpu_capability(), "openblas": openblas_core()}


def main(argv: list[str]) -> int:
    usage = f"usage: python -m tests.cpu_paths {{{','.join(CPU_PATHS)}}} [-- COMMAND ...]"
    if not argv or argv[0] not in CPU_PATHS or (len(argv) > 1 and argv[1] != "--"):
        print(f"{usage}: the first argument names the CPU path", file=sys.stderr)
        return 2
    path, command = argv[0], argv[2:]
    if os.environ.get("_CPU_PATH_CHECK") != path:
        # The libraries read the settings when they load: check them in a fresh process.
        os.environ.update(CPU_PATHS[path], _CPU_PATH_CHECK=path)
        os.execv(sys.executable, [sys.executable, "-m", "tests.cpu_paths", *argv])
    found = describe()
    wrong = {name: value for name, value in found.items()
             if name in EXPECTED[path] and value.lower() != EXPECTED[path][name].lower()
             and not value.startswith("unknown")}
    if wrong:
        print(f"cpu_paths: {path} was not forced: {wrong} (expected {EXPECTED[path]})", file=sys.stderr)
        return 1
    print(f"cpu_paths: {path}: " + ", ".join(f"{name} {value}" for name, value in found.items()) +
          " | " + " ".join(f"{key}={value}" for key, value in CPU_PATHS[path].items()), flush=True)
    if command:
        del os.environ["_CPU_PATH_CHECK"]
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
