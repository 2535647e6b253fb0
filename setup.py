"""Builds dsa_ops._C from csrc/ when torch is a CUDA build and nvcc is found.

    pip install --no-build-isolation -e .

Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible, else the
visible GPU's), MAX_JOBS (ninja parallelism), DSA_OPS_NO_CUDA=1 (skip the extension).
Without a CUDA toolchain the pure-Python parts (reference and Triton backends) install.
"""
import glob
import os
import pathlib
import sys

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).resolve().parent


def _say(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\ndsa_ops: {message}\n{bar}\n", file=sys.stderr)


def _has_nvcc(cuda_home) -> bool:
    return bool(cuda_home) and (pathlib.Path(cuda_home) / "bin" / "nvcc").exists()


def _extension_build():
    """(ext_modules, cmdclass): the CUDA extension, or nothing with one clear message."""
    if os.environ.get("DSA_OPS_NO_CUDA") == "1":
        _say("DSA_OPS_NO_CUDA=1: building without the CUDA extension (reference + Triton only).")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not installed in the build environment: installing the pure-Python parts "
             "only. Install torch first and build with --no-build-isolation to get the CUDA kernels.")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: installing the pure-Python parts only "
             "(reference + Triton backends); no CUDA kernels.")
        return [], {}
    # CUDA_HOME, then /usr/local/cuda, then torch's own guess (from nvcc on the PATH).
    cuda_home = next((home for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                                        cpp_extension.CUDA_HOME) if _has_nvcc(home)), None)
    if cuda_home is None:
        _say(f"nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): installing the pure-Python parts "
             "only; set CUDA_HOME to a CUDA toolkit to build the CUDA kernels.")
        return [], {}
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

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
            "cxx": ["-O3", *fallback_includes],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    _say(f"building the CUDA extension dsa_ops._C for TORCH_CUDA_ARCH_LIST="
         f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')} with {cuda_home}")
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


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
