"""Finding and loading the compiled library ``dsa_ops._C`` (the CUDA kernels where it was
built with nvcc, and the cpu backend's float32 kernels), and the CUDA kernels' host emulation.

The library registers kernels only (``TORCH_LIBRARY_IMPL``): the op schemas live in
``dsa_ops.ops``, so the package works without it. It has no ``PyInit`` and is loaded
with ``torch.ops.load_library``.

With ``DSA_OPS_CUDA_EMULATE=1`` in the environment when ``dsa_ops`` is imported, the same
kernels and bindings are also compiled by the host C++ compiler against
``csrc/emulation/`` (JIT, cached by ``torch.utils.cpp_extension`` under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and registered for the
CPU dispatch key: ``backend="cuda"`` then runs them on CPU tensors.
"""
from __future__ import annotations

import glob
import importlib.machinery
import os
import pathlib

import torch

_LOADED_PATH: str | None = None
_LOAD_ERROR: str | None = None


def _library_path() -> pathlib.Path | None:
    package_dir = pathlib.Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load() -> None:
    """Load ``dsa_ops._C`` once; remember why it failed instead of raising."""
    global _LOADED_PATH, _LOAD_ERROR
    if _LOADED_PATH is not None or _LOAD_ERROR is not None:
        return
    if os.environ.get("DSA_OPS_DISABLE_EXTENSION") == "1":
        _LOAD_ERROR = "disabled by DSA_OPS_DISABLE_EXTENSION=1"
        return
    path = _library_path()
    if path is None:
        _LOAD_ERROR = ("the compiled library dsa_ops._C was not built (it needs a C++ compiler, "
                       "and for its CUDA kernels a CUDA build of torch and nvcc on the PATH or in "
                       "CUDA_HOME: pip install --no-build-isolation -e .)")
        return
    try:
        torch.ops.load_library(str(path))
    except OSError as error:
        _LOAD_ERROR = f"dsa_ops._C at {path} failed to load: {error}"
        return
    _LOADED_PATH = str(path)


def is_loaded() -> bool:
    load()
    return _LOADED_PATH is not None


def load_error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    load()
    return _LOAD_ERROR


def loaded_path() -> str | None:
    load()
    return _LOADED_PATH


# ----------------------------------------------------------------------------- host emulation
EMULATE_VARIABLE = "DSA_OPS_CUDA_EMULATE"
_CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
_EMULATION_REQUESTED = os.environ.get(EMULATE_VARIABLE) == "1"  # read once, at import
_EMULATION_LOADED = False
_EMULATION_ERROR: str | None = None


def emulation_requested() -> bool:
    return _EMULATION_REQUESTED


def cuda_include_dir() -> str | None:
    """A directory with the CUDA toolkit headers (for ``__half``, ``__nv_bfloat16``, ``dim3``,
    ``cudaError_t``): ``$CUDA_HOME``, ``/usr/local/cuda`` or the pip wheel torch depends on."""
    candidates = [os.path.join(home, "include") for home in (os.environ.get("CUDA_HOME"),
                                                            "/usr/local/cuda") if home]
    candidates += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia",
                                                "cu*", "include")))
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "cuda_fp16.h")):
            return os.path.abspath(directory)
    return None


def emulation_sources(build_directory: pathlib.Path) -> list[str]:
    """The emulation runtime, then one C++ wrapper per CUDA-side file of csrc/ that setup.py
    compiles (every op's ``bindings.cpp`` and every kernel file, ``.cu``; not the CPU kernels
    of ``cpu/`` folders, which ``dsa_ops._C`` registers itself): the JIT builder sends ``.cu``
    files to nvcc, and names objects by file name alone, so the op directories' files of one
    name (``bindings.cpp``, ``forward.cu``) need wrappers named by their paths."""
    build_directory.mkdir(parents=True, exist_ok=True)
    emulation = _CSRC / "emulation"
    sources = [str(emulation / "emulation.cpp")]
    # cpu/ folders hold CPU kernels proper (dsa_ops._C registers them); they emulate nothing.
    compiled = sorted(path for pattern in ("**/*.cpp", "**/*.cu") for path in _CSRC.glob(pattern)
                      if emulation not in path.parents and "cpu" not in path.relative_to(_CSRC).parts)
    for source in compiled:
        stem = "_".join(source.relative_to(_CSRC).with_suffix("").parts)
        wrapper = build_directory / f"emulated_{stem}.cpp"
        text = f'#include "{source}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    return sources


def emulation_flags(include_dir: str) -> list[str]:
    # Hidden visibility: the kernels' launchers bind within this library even when the CUDA
    # build dsa_ops._C, which has the same symbols, is loaded in the same process.
    return ["-std=c++20", "-O2", "-fvisibility=hidden", "-DDSA_OPS_HOST_EMULATION",
            "-Wno-unknown-pragmas", f"-I{_CSRC}", f"-I{include_dir}"]


def load_emulation() -> None:
    """Build (first time, about a minute) and load the emulated kernels; remember why not."""
    global _EMULATION_LOADED, _EMULATION_ERROR
    if _EMULATION_LOADED or _EMULATION_ERROR is not None:
        return
    include_dir = cuda_include_dir()
    if include_dir is None:
        _EMULATION_ERROR = ("the emulated CUDA kernels need the CUDA headers (cuda_fp16.h): set "
                            "CUDA_HOME to a CUDA toolkit")
        return
    from torch.utils import cpp_extension

    name = "dsa_ops_cuda_emulation"
    build_directory = pathlib.Path(cpp_extension._get_build_directory(name, verbose=False))
    try:
        # Loads the library too (torch.ops.load_library).
        cpp_extension.load(name=name, sources=emulation_sources(build_directory),
                           extra_cflags=emulation_flags(include_dir),
                           build_directory=str(build_directory), with_cuda=False,
                           is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as error:
        _EMULATION_ERROR = f"building the emulated CUDA kernels failed: {error}"
        return
    _EMULATION_LOADED = True


def emulation_error() -> str | None:
    """Why ``backend="cuda"`` cannot run on CPU tensors, or None when it can."""
    if not emulation_requested():
        return (f"the CUDA kernels need CUDA tensors (or {EMULATE_VARIABLE}=1 before importing "
                f"dsa_ops, for their host emulation on CPU tensors)")
    load_emulation()
    return _EMULATION_ERROR
