"""When ``dsa_ops._C`` needs recompiling: a content stamp of everything the build depends on.

The stamp is a SHA-256 over the files under ``csrc/``, ``setup.py`` and ``pyproject.toml``
(paths and contents), the torch version and its CUDA version, the nvcc that would compile
(its ``--version``), the CUDA architectures, the Python extension suffix,
``DSA_OPS_NO_CUDA`` and the C++ compiler. ``setup.py`` writes it to ``dsa_ops/_C.build-stamp`` together with the
SHA-256 of the library it built; while both still match, ``pip install -e .``, ``make
install`` (and so ``make test`` / ``make bench``) reuse the library instead of recompiling.
``DSA_OPS_FORCE_REBUILD=1`` (or ``make rebuild``) ignores the stamp.

Stdlib only at import time (torch is imported inside the functions that need it):
``setup.py`` loads this file by path, before the package is installed, and the Makefile runs
it as a script::

    python dsa_ops/_build_stamp.py check    # exit 0: installed from this tree, nothing to rebuild
    python dsa_ops/_build_stamp.py record   # after a successful install: remember its inputs
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
from typing import Mapping, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAMP_NAME = "_C.build-stamp"
FORCE_VARIABLE = "DSA_OPS_FORCE_REBUILD"
# Without a visible GPU the extension is built for Ampere and Hopper.
DEFAULT_ARCH_LIST = "8.0;9.0"
# Files of the tree the library's contents depend on (besides everything under csrc/).
BUILD_FILES = ("setup.py", "pyproject.toml")


# ----------------------------------------------------------------------------- build settings
def _has_nvcc(cuda_home: Optional[str]) -> bool:
    return bool(cuda_home) and (pathlib.Path(cuda_home) / "bin" / "nvcc").exists()


def resolve_cuda_home() -> Optional[str]:
    """The CUDA toolkit that compiles: ``$CUDA_HOME``, then ``/usr/local/cuda``, then torch's
    own guess (from nvcc on the PATH); None without nvcc."""
    from torch.utils import cpp_extension

    return next((home for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                                   cpp_extension.CUDA_HOME) if _has_nvcc(home)), None)


def resolve_arch_list() -> str:
    """``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs' capabilities, else Ampere + Hopper."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if requested:
        return requested
    import torch

    if torch.cuda.is_available():
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    return DEFAULT_ARCH_LIST


def _nvcc_version(cuda_home: Optional[str]) -> Optional[str]:
    if cuda_home is None:
        return None
    try:
        return subprocess.run([str(pathlib.Path(cuda_home) / "bin" / "nvcc"), "--version"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvcc failed: {error}"


def cxx_compiler() -> Optional[str]:
    """The C++ compiler a build would use (``$CXX``, else ``c++``), or None when there is none."""
    import shutil

    return shutil.which(os.environ.get("CXX") or "c++")


def current_inputs() -> dict[str, Optional[str]]:
    """The settings of a build in this environment now (the files come separately)."""
    import torch

    no_cuda = os.environ.get("DSA_OPS_NO_CUDA") == "1"
    cuda_home = None if no_cuda or torch.version.cuda is None else resolve_cuda_home()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": _nvcc_version(cuda_home),
        "arch_list": resolve_arch_list() if cuda_home else None,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "no_cuda": str(no_cuda),
        "cxx": cxx_compiler(),
    }


# ----------------------------------------------------------------------------- the stamp
def source_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Every file the build reads from the tree: ``csrc/**`` and ``BUILD_FILES``, sorted."""
    files = [path for path in (root / "csrc").rglob("*") if path.is_file()]
    files += [root / name for name in BUILD_FILES if (root / name).is_file()]
    return sorted(files)


def stamp(inputs: Mapping[str, Optional[str]], root: pathlib.Path = ROOT) -> str:
    """SHA-256 hex digest of the tree's build files (relative paths and contents) and ``inputs``.

    Editor droppings such as ``__pycache__`` never live under csrc/, so every file counts:
    a spurious rebuild costs minutes, a missed one a wrong library.
    """
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(dict(inputs), sort_keys=True).encode())
    return digest.hexdigest()


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_path(root: pathlib.Path = ROOT) -> pathlib.Path:
    """Where the in-place (editable) build puts the library."""
    return root / "dsa_ops" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"


def stamp_path(root: pathlib.Path = ROOT) -> pathlib.Path:
    return root / "dsa_ops" / STAMP_NAME


def write(inputs: Mapping[str, Optional[str]], library: Optional[pathlib.Path],
          root: pathlib.Path = ROOT) -> None:
    """Record that ``library`` (None: the build has no extension) was built from ``inputs``."""
    record = {"stamp": stamp(inputs, root), "inputs": dict(inputs),
              "library_sha256": file_sha256(library) if library is not None else None}
    stamp_path(root).write_text(json.dumps(record, indent=1) + "\n")


def why_stale(inputs: Mapping[str, Optional[str]], expect_library: bool,
              root: pathlib.Path = ROOT) -> Optional[str]:
    """None when the recorded build still matches ``inputs`` and the tree; else the reason."""
    if os.environ.get(FORCE_VARIABLE) == "1":
        return f"{FORCE_VARIABLE}=1"
    try:
        record = json.loads(stamp_path(root).read_text())
    except (OSError, ValueError):
        return f"no readable build stamp at {stamp_path(root)}"
    if record.get("stamp") != stamp(inputs, root):
        changed = [key for key, value in inputs.items() if record.get("inputs", {}).get(key) != value]
        return ("changed since the last build: " +
                (", ".join(changed) if changed else "csrc/, setup.py or pyproject.toml"))
    library = library_path(root)
    if not expect_library:
        return None
    if not library.is_file():
        return f"{library.name} is missing"
    if record.get("library_sha256") != file_sha256(library):
        return f"{library.name} is not the library the stamp recorded"
    return None


def extension_expected(inputs: Mapping[str, Optional[str]]) -> bool:
    """Whether setup.py builds the extension under these settings: with a C++ compiler it
    always does (its CUDA kernels too with a CUDA torch and nvcc, else its CPU kernels)."""
    return inputs.get("cxx") is not None


# ----------------------------------------------------------------------------- command line
def _installed_from(root: pathlib.Path) -> bool:
    """Whether ``import dsa_ops`` (outside this tree's folder) finds this tree's package."""
    import importlib.util

    spec = importlib.util.find_spec("dsa_ops")
    return spec is not None and spec.origin is not None and \
        pathlib.Path(spec.origin).resolve().parent == root / "dsa_ops"


def main(argv: Optional[list[str]] = None) -> int:
    # Run as a script, this file's folder heads sys.path; its modules (ops.py, modules.py…)
    # must not shadow top-level ones, and `import dsa_ops` must find the installed package.
    here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]
    args = sys.argv[1:] if argv is None else argv
    if args not in (["check"], ["record"]):
        print("usage: python dsa_ops/_build_stamp.py check|record", file=sys.stderr)
        return 2
    inputs = current_inputs()
    expect_library = extension_expected(inputs)
    if args == ["record"]:
        library = library_path() if expect_library and library_path().is_file() else None
        write(inputs, library)
        return 0
    if not _installed_from(ROOT):
        print(f"dsa_ops: not installed from {ROOT}: installing")
        return 1
    reason = why_stale(inputs, expect_library)
    if reason is not None:
        print(f"dsa_ops: rebuilding ({reason})")
        return 1
    print(f"dsa_ops: installed from this tree and up to date ({stamp_path().name} matches "
          "csrc/, setup.py, torch, CUDA, arch list): not reinstalling, not recompiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
