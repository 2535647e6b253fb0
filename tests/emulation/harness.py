"""Builds and runs the host-emulation programs of tests/emulation/ with g++ (no torch).

    python3 tests/emulation/harness.py --sanitize     # make emulate-sanitize

``primitives_test`` checks every primitive of csrc/device/primitives.cuh against the PTX
definitions; ``kernels_check`` runs the kernels of csrc/ against a float64 reference;
``sim_driver`` is benchmarks/sim/driver.cu (the simulated-GPU driver) on the emulation.
``--sanitize`` builds both twice (kernels_check runs on an emulated sm_80 and sm_90), with ``-fsanitize=address,undefined`` and with
``-fsanitize=thread`` (CUDA threads as OS threads, so ThreadSanitizer sees races between
them), runs them, and exits non-zero on any finding or mismatch.
Builds are cached under build/emulation/, keyed by the sources and flags.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = pathlib.Path(__file__).resolve().parent
BUILD = ROOT / "build" / "emulation"

KERNEL_SOURCES = sorted(CSRC.glob("**/*.cu"))
EMULATION_SOURCE = CSRC / "emulation" / "emulation.cpp"
# The simulated-GPU drivers (benchmarks/sim/), built here so that CI checks their host side.
SIM_DRIVERS = ROOT / "benchmarks" / "sim"
PROGRAMS = {
    "primitives_test": [HERE / "primitives_test.cpp"],
    "kernels_check": [*KERNEL_SOURCES, HERE / "kernels_check.cpp"],
    "sim_driver": [*KERNEL_SOURCES, SIM_DRIVERS / "driver.cu"],
}
# The programs that check themselves without arguments (the sanitizer runs); sim_driver runs
# one family per call (tests/test_sim_harness.py).
SANITIZED = ("primitives_test", "kernels_check")
# kernels_check again on an emulated sm_90: what the launchers choose from the device's
# limits (the forward's 128-key tiles) differs from the default sm_80's.
SANITIZED_ARCHS = {"kernels_check": ("80", "90")}
SANITIZERS = {
    "address,undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                          "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}
# halt_on_error: a finding fails the run; detect_leaks: kernels abandoned by a failed launch
# are not the question here.
SANITIZER_ENV = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
                 "TSAN_OPTIONS": "halt_on_error=1"}


def _cuda_include_dir() -> str:
    sys.path.insert(0, str(ROOT))
    from dsa_ops.extension import cuda_include_dir  # the same search as the JIT build

    directory = cuda_include_dir()
    if directory is None:
        raise RuntimeError("no CUDA headers (cuda_fp16.h) found: set CUDA_HOME")
    return directory


def build(program: str, *, fault: int = 0, sanitizer: str | None = None,
          optimize: str = "-O1") -> pathlib.Path:
    """Compile ``program`` against the emulation; returns the executable (cached)."""
    sources = [*PROGRAMS[program], EMULATION_SOURCE]
    flags = ["-std=c++20", optimize, "-g", "-pthread", "-DDSA_OPS_HOST_EMULATION",
             f"-DDSA_OPS_EMULATION_FAULT={fault}", "-Wall", "-Wno-unknown-pragmas",
             f"-I{CSRC}", f"-I{_cuda_include_dir()}"]
    if sanitizer is not None:
        flags += ["-DDSA_OPS_EMULATION_OS_THREADS", *SANITIZERS[sanitizer]]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.glob("**/*")) + sorted(HERE.glob("*.cpp")) + sorted(SIM_DRIVERS.glob("*.[ch]*")):
        if path.is_file():
            digest.update(str(path).encode() + path.read_bytes())
    executable = BUILD / f"{program}-{digest.hexdigest()[:16]}"
    if not executable.is_file():
        BUILD.mkdir(parents=True, exist_ok=True)
        # .cu files are C++ to g++; -x none switches back to guessing from the suffix.
        command = ["g++", *flags, "-x", "c++", *(str(s) for s in sources if s.suffix == ".cu"),
                   "-x", "none", *(str(s) for s in sources if s.suffix != ".cu"),
                   "-o", str(executable) + ".tmp"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(str(executable) + ".tmp", executable)
    return executable


def run(executable: pathlib.Path, *args: str, sanitizer: str | None = None,
        timeout: float = 1800, arch: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(SANITIZER_ENV if sanitizer else {}))
    if arch is not None:
        env["DSA_OPS_CUDA_EMULATE_ARCH"] = arch
    return subprocess.run([str(executable), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def sanitize() -> int:
    """Both programs under both sanitizer builds; the number of failed runs."""
    failed = 0
    for sanitizer in SANITIZERS:
        for program in SANITIZED:
            for arch in SANITIZED_ARCHS.get(program, (None,)):
                on = f", sm_{arch}" if arch else ""
                print(f"== {program}, -fsanitize={sanitizer}{on}", flush=True)
                result = run(build(program, sanitizer=sanitizer), sanitizer=sanitizer, arch=arch)
                print(result.stdout[-2000:] + result.stderr[-6000:], flush=True)
                failed += result.returncode != 0
    print(f"emulate-sanitize: {'clean' if failed == 0 else f'{failed} runs FAILED'}")
    return failed


if __name__ == "__main__":
    if sys.argv[1:] != ["--sanitize"]:
        sys.exit(__doc__)
    sys.exit(1 if sanitize() else 0)
