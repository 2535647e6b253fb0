"""Builds dsa_ops._C from csrc/: the CUDA kernels when torch is a CUDA build and nvcc is
found, and always the CPU kernels (csrc/*/cpu/, any C++ compiler).

    pip install --no-build-isolation -e .

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible, else the
visible GPU's), MAX_JOBS (ninja parallelism), DSA_OPS_NO_CUDA=1 (the CPU kernels only),
DSA_OPS_FORCE_REBUILD=1 (recompile even when nothing changed).
Without a CUDA toolchain only the CPU kernels are compiled; without a C++ compiler the
pure-Python parts (reference, Triton and the cpu backend's torch path) install.

No needless rebuild: the library is recompiled only when csrc/, setup.py, pyproject.toml,
torch, its CUDA version, nvcc or the arch list changed (dsa_ops/_build_stamp.py records a
content stamp next to the library); and when it is, ninja works in the persistent
build/ninja/ folder, so only the changed translation units compile.
"""
import glob
import importlib.util
import os
import pathlib
import shutil
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent
# Persistent, unlike the temporary folder pip's editable build hands build_ext.
NINJA_BUILD_DIR = ROOT / "build" / "ninja"


def _load_build_stamp():
    """dsa_ops/_build_stamp.py by path: the package (and its torch import) is not installed yet."""
    spec = importlib.util.spec_from_file_location("_dsa_ops_build_stamp", ROOT / "dsa_ops" / "_build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\ndsa_ops: {message}\n{bar}\n", file=sys.stderr)


def _openmp_flags(torch, build_stamp) -> list[str]:
    """``["-fopenmp"]`` for the C++ sources when ATen runs its intra-op threads on OpenMP and
    the compiler is GCC (its OpenMP calls go to the libgomp that torch loads); else ``[]``,
    said once. ATen's ``at::parallel_for`` is a header template: compiled without OpenMP,
    its parallel branch compiles away and the CPU kernels silently run on one thread."""
    import subprocess

    if not torch._C.has_openmp:
        return []  # ATen's own thread pool (ParallelNative): parallel_for needs no flag
    compiler = build_stamp.cxx_compiler()
    if compiler is None:
        return []  # nothing compiles (the caller says so)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        version = ""
    if sys.platform.startswith("linux") and version and "clang" not in version.lower():
        return ["-fopenmp"]
    _say(f"the CPU kernels will run on one thread: torch uses OpenMP, and {compiler} "
         "is not GCC on Linux (its OpenMP would not be torch's libgomp); build with CXX=g++")
    return []


def _extension_build():
    """(ext_modules, cmdclass): the extension with the CUDA kernels, with the CPU kernels
    only, or nothing, with one clear message."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not installed in the build environment: installing the pure-Python parts "
             "only. Install torch first and build with --no-build-isolation to get the kernels.")
        return [], {}
    build_stamp = _load_build_stamp()
    openmp = _openmp_flags(torch, build_stamp)
    cpu_sources = sorted(glob.glob("csrc/**/cpu/*.cpp", recursive=True))
    cpu_only = None  # why the CUDA kernels are not built
    cuda_home = None
    if os.environ.get("DSA_OPS_NO_CUDA") == "1":
        cpu_only = "DSA_OPS_NO_CUDA=1"
    elif torch.version.cuda is None:
        cpu_only = f"torch {torch.__version__} is a CPU build"
    else:
        cuda_home = build_stamp.resolve_cuda_home()
        if cuda_home is None:
            cpu_only = ("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH); set CUDA_HOME to a "
                        "CUDA toolkit to build the CUDA kernels")
    if cpu_only is not None:
        if build_stamp.cxx_compiler() is None:
            _say(f"{cpu_only}, and no C++ compiler ($CXX or c++): installing the pure-Python parts "
                 "only (reference and Triton backends; the cpu backend's torch path).")
            return [], {}
        _say(f"{cpu_only}: building dsa_ops._C with the CPU kernels only (no CUDA kernels).")
        extension = cpp_extension.CppExtension(
            name="dsa_ops._C", sources=cpu_sources, include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": ["-O3", *openmp]})
        return [extension], {"build_ext": _cached_build_ext(cpp_extension, build_stamp)}
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_stamp.resolve_arch_list()

    # csrc/emulation/ is the host emulation of the kernels (dsa_ops/extension.py builds it on
    # demand); the CUDA extension never contains it.
    sources = sorted(path for path in glob.glob("csrc/**/*.cu", recursive=True) +
                     glob.glob("csrc/**/*.cpp", recursive=True)
                     if not path.startswith(os.path.join("csrc", "emulation", "")))
    # Some toolkits lack the cuBLAS headers that ATen's CUDA headers pull in; the pip
    # wheels of the CUDA libraries carry them. -idirafter: they only fill gaps and never
    # shadow the toolkit's own runtime headers. Only host code may need them: kernels
    # include c10/cuda headers alone.
    fallback_includes = []
    for wheel_include in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..",
                                                "nvidia", "cu*", "include")):
        fallback_includes += ["-idirafter", os.path.abspath(wheel_include)]
    extension = cpp_extension.CUDAExtension(
        name="dsa_ops._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", *openmp, *fallback_includes],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    _say(f"CUDA extension dsa_ops._C: TORCH_CUDA_ARCH_LIST="
         f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')} with {cuda_home}")
    return [extension], {"build_ext": _cached_build_ext(cpp_extension, build_stamp)}


def _cached_build_ext(cpp_extension, build_stamp):
    """torch's ninja ``BuildExtension`` that skips compiling when the stamp still matches
    and otherwise compiles incrementally in ``NINJA_BUILD_DIR``."""

    class CachedBuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(NINJA_BUILD_DIR)

        def build_extension(self, ext):
            target = pathlib.Path(self.get_ext_fullpath(ext.name))
            inputs = build_stamp.current_inputs()
            reason = build_stamp.why_stale(inputs, expect_library=True)
            in_tree = build_stamp.library_path()
            if reason is None:
                _say(f"{in_tree.name} is up to date (csrc/, setup.py, torch, CUDA and arch list "
                     f"unchanged): not recompiling; {build_stamp.FORCE_VARIABLE}=1 forces it")
                if target.resolve() != in_tree.resolve():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(in_tree, target)
                return
            _say(f"compiling {ext.name}: {reason}")
            super().build_extension(ext)
            if target.resolve() != in_tree.resolve():
                # The editable install copies the library into the tree after this command.
                shutil.copyfile(target, in_tree)
            build_stamp.write(inputs, in_tree)

    return CachedBuildExtension


ext_modules, cmdclass = _extension_build()

setup(
    name="dsa_ops",
    version="0.1.0",
    description="Fused masked attention (CUDA, Triton, reference) and the OracleFace "
                "face-completion model",
    packages=find_packages(include=["dsa_ops", "dsa_ops.*", "oracleface", "oracleface.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",  # the oldest torch tested (`make compat`: 2.11 + triton 3.6, 2.15 + triton 3.9)
        "numpy",
        "ninja",
        "pybind11",
        "triton; platform_system == 'Linux'",
        "lpips",
        "face-alignment",
        "tqdm",
        "pyyaml",
        "tensorboard",
        "pillow",
        "scikit-image",
        "torchmetrics",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib"],
        "dlib": ["dlib-bin", "face-recognition-models"],
    },
    entry_points={"console_scripts": ["oracleface = oracleface.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
