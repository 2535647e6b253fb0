"""Finding and loading the compiled CUDA library ``dsa_ops._C``.

The library registers kernels only (``TORCH_LIBRARY_IMPL``): the op schemas live in
``dsa_ops.ops``, so the package works without it. It has no ``PyInit`` and is loaded
with ``torch.ops.load_library``.
"""
from __future__ import annotations

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
        _LOAD_ERROR = ("the CUDA extension dsa_ops._C was not built (install with a CUDA "
                       "build of torch and nvcc on the PATH or in CUDA_HOME: "
                       "pip install --no-build-isolation -e .)")
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
