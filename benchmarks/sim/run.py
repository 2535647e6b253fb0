"""Run the project's CUDA kernels (and FlashAttention-2's forward as the anchor) on a simulated GPU.

    python -m benchmarks.sim.run --preset correctness            # every family, float16 + bfloat16, odd shape
    python -m benchmarks.sim.run --preset layer14                # the paper's layer 14 on 8 SMs, FA2 beside it
    python -m benchmarks.sim.run --family forward --dtype float16 \\
        --shape "--batch 1 --length 4096 --hole 32" --fa2-pairs 1024:3072
    python -m benchmarks.sim.run --preset correctness --plan     # what it would build and run

Builds ``benchmarks/sim/driver.cu`` (with every kernel of ``csrc/``) and, when FA2 runs
(layer14, ``--fa2-pairs``), ``benchmarks/sim/fa2_forward.cu`` as sm_90 PTX (the simulator runs PTX) into ``build/sim/``,
runs each case under GPGPU-Sim in its own folder (``--runs``, default ``$DSA_GPUSIM/runs/
dsa_ops-<time>``), reads the driver's checks and counts and the simulator's per-kernel
statistics from the log, and writes ``results.json`` and ``results.md`` (``--out``,
default the runs folder). Exits 1 when a case's check fails or a run breaks.

Where things are (environment):
  DSA_GPUSIM      the simulator's work folder (shared/tools/gpusim's recipe): src/setup_environment,
                  cuda/ (the CUDA toolkit plus cuobjdump), configs/<name>/gpgpusim.config
  DSA_FA2_SRC     a flash-attention checkout (csrc/flash_attn/src/flash_fwd_kernel.h)
  DSA_CUTLASS     a CUTLASS checkout (include/cute/tensor.hpp)
The cycle counts are a model's: compare kernels run in the same configuration, not with a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "sim"

FAMILIES = ("forward", "backward", "dual-forward", "dual-backward", "kl-forward", "kl-backward",
            "partition")
DTYPES = ("float16", "bfloat16", "float32")
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-cudart", "shared",
              "-gencode", "arch=compute_90,code=compute_90"]
# The paper's layer 14 (64 × 64 map, 32 × 32 hole): cross branch 1024 queries × 3072 keys,
# self branch 1024 × 1024; Dqk 16, Dv 128, one sample.
LAYER14 = "--batch 1 --length 4096 --hole 32 --qk-dim 16 --v-dim 128"


class HarnessError(Exception):
    """A setup problem, reported as one line."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # a driver family, or "fa2-forward"
    dtype: str
    args: tuple[str, ...]  # the driver's shape arguments

    @property
    def is_fa2(self) -> bool:
        return self.family == "fa2-forward"


def driver_case(family: str, dtype: str, shape: str, label: str) -> Case:
    name = f"{family}-{dtype}-{label}" if family != "partition" else f"partition-{label}"
    return Case(name, family, dtype, tuple(shlex.split(shape)))


def fa2_case(batch: int, queries: int, keys: int) -> Case:
    return Case(f"fa2-forward-float16-{queries}x{keys}", "fa2-forward", "float16",
                ("--batch", str(batch), "--queries", str(queries), "--keys", str(keys)))


def preset_cases(preset: str, fa2: bool) -> list[Case]:
    if preset == "correctness":
        cases = [driver_case(f, d, "--preset odd", "odd")
                 for f in FAMILIES if f != "partition" for d in ("float16", "bfloat16")]
        return cases + [driver_case("partition", "float16", "--preset odd", "odd")]
    if preset == "layer14":
        cases = []
        for keys, label in (("complement", "cross1024x3072"), ("queries", "self1024x1024")):
            for family in ("forward", "backward"):
                cases.append(driver_case(family, "float16", f"{LAYER14} --keys {keys}", label))
        if fa2:
            cases += [fa2_case(1, 1024, 3072), fa2_case(1, 1024, 1024)]
        return cases
    raise HarnessError(f"--preset must be correctness or layer14, got {preset!r}")


# ----------------------------------------------------------------------------- locations
def simulator_dir() -> Path:
    value = os.environ.get("DSA_GPUSIM")
    if not value:
        raise HarnessError("DSA_GPUSIM is not set: point it at the simulator's work folder "
                           "(src/setup_environment, cuda/, configs/; see docs/simulated-gpu.md)")
    sim = Path(value)
    for needed in ("src/setup_environment", "cuda/bin"):
        if not (sim / needed).exists():
            raise HarnessError(f"DSA_GPUSIM={sim} has no {needed}: not a built simulator "
                               "(shared/tools/gpusim/README.md has the recipe)")
    return sim


def config_dir(config: str, sim: Optional[Path]) -> Path:
    """A config name under $DSA_GPUSIM/configs (h100, h100-8sm) or a folder path."""
    path = Path(config) if ("/" in config or sim is None) else sim / "configs" / config
    if not (path / "gpgpusim.config").is_file():
        raise HarnessError(f"--config {config}: no gpgpusim.config in {path}")
    return path


def core_clock_mhz(config_text: str) -> float:
    """The core clock of a gpgpusim.config (-gpgpu_clock_domains <core>:<icnt>:<l2>:<dram>)."""
    match = re.search(r"^\s*-gpgpu_clock_domains\s+([0-9.]+):", config_text, re.MULTILINE)
    if match is None:
        raise HarnessError("the config has no -gpgpu_clock_domains line (the core clock)")
    return float(match.group(1))


def fa2_include_dirs() -> list[Path]:
    missing = [name for name in ("DSA_FA2_SRC", "DSA_CUTLASS") if not os.environ.get(name)]
    if missing:
        raise HarnessError(f"FA2's forward needs {' and '.join(missing)}: the flash-attention and CUTLASS "
                           "checkouts (see docs/simulated-gpu.md)")
    fa2 = Path(os.environ["DSA_FA2_SRC"]) / "csrc" / "flash_attn" / "src"
    cutlass = Path(os.environ["DSA_CUTLASS"]) / "include"
    if not (fa2 / "flash_fwd_kernel.h").is_file():
        raise HarnessError(f"DSA_FA2_SRC: no csrc/flash_attn/src/flash_fwd_kernel.h under {os.environ['DSA_FA2_SRC']}")
    if not (cutlass / "cute" / "tensor.hpp").is_file():
        raise HarnessError(f"DSA_CUTLASS: no include/cute/tensor.hpp under {os.environ['DSA_CUTLASS']}")
    return [HERE / "fa2_stub", fa2, cutlass]


# ----------------------------------------------------------------------------- build
def build_commands(fa2: bool) -> dict[str, list[str]]:
    """nvcc command per binary (PTX only: -gencode arch=compute_90,code=compute_90)."""
    kernels = sorted(str(p) for p in CSRC.glob("**/*.cu") if "emulation" not in p.parts)
    commands = {"dsa_sim": ["nvcc", *NVCC_FLAGS, f"-I{CSRC}", str(HERE / "driver.cu"), *kernels,
                            "-o", str(BUILD / "dsa_sim")]}
    if fa2:
        includes = [f"-I{p}" for p in fa2_include_dirs()]
        commands["fa2_forward"] = ["nvcc", *NVCC_FLAGS, *includes, str(HERE / "fa2_forward.cu"),
                                   "-o", str(BUILD / "fa2_forward")]
    return commands


def sources(name: str) -> list[Path]:
    """What a binary is built from (its stamp's content)."""
    if name == "dsa_sim":
        return sorted(CSRC.glob("**/*.cu*")) + sorted(CSRC.glob("**/*.h")) + [HERE / "driver.cu", HERE / "sim_host.h"]
    return [HERE / "fa2_forward.cu", HERE / "sim_host.h", *sorted((HERE / "fa2_stub").glob("**/*.*"))]


def build(fa2: bool) -> dict[str, Path]:
    """Builds what is missing. Each binary lives under build/sim/<hash of its command and
    sources>/ and is written whole (a temporary file, then a hard link that fails where the
    binary exists): a call on another tree, a later call on a changed one, or a call
    building the same binary at the same time never replaces the binary a running
    simulation was started from (GPGPU-Sim reads the PTX back from its executable's path)."""
    binaries = {}
    for name, command in build_commands(fa2).items():
        digest = hashlib.sha256(" ".join(command).encode())
        for path in sources(name):
            digest.update(str(path).encode() + path.read_bytes())
        binary = BUILD / digest.hexdigest()[:16] / name
        if not binary.is_file():
            binary.parent.mkdir(parents=True, exist_ok=True)
            partial = binary.with_name(f"{name}.{os.getpid()}.partial")
            print(f"building {name} (sm_90 PTX) ...", flush=True)
            try:
                result = subprocess.run([*command[:-1], str(partial)], capture_output=True, text=True)
            except FileNotFoundError:
                raise HarnessError("nvcc not found on PATH (the drivers build with the CUDA toolkit)")
            if result.returncode != 0:
                raise HarnessError(f"building {name} failed:\n{result.stderr[-4000:]}")
            try:
                os.link(partial, binary)
            except FileExistsError:
                pass  # a concurrent call published the same build first: keep its file
            finally:
                partial.unlink()
        binaries[name] = binary
    return binaries


# ----------------------------------------------------------------------------- the log
@dataclasses.dataclass
class KernelStats:
    name: str  # mangled
    cycles: int
    instructions: int  # thread instructions
    warp_instructions: Optional[int]
    ipc: float
    stalls: dict[str, int]


# Counters the simulator prints after every kernel; some are totals since the start of the run.
_STALL_KEYS = ("Stall", "W0_Idle", "W0_Scoreboard")
_COUNTERS = ("gpgpu_n_tot_thrd_icount", "gpgpu_n_tot_w_icount", "gpgpu_n_stall_shd_mem",
             "gpgpu_n_shmem_bkconflict", "gpgpu_n_load_insn", "gpgpu_n_store_insn",
             "gpgpu_n_shmem_insn", "L1D_total_cache_accesses", "L1D_total_cache_misses",
             "L2_total_cache_accesses", "L2_total_cache_misses")


def _number(block: str, key: str) -> Optional[float]:
    match = re.search(rf"^\s*{re.escape(key)}\s*=\s*([-0-9.e+]+)", block, re.MULTILINE)
    return float(match.group(1)) if match else None


def parse_kernels(log: str) -> list[KernelStats]:
    """Per-kernel statistics, in launch order. The shader counters (stall histogram, warp
    instructions, memory) are running totals in GPGPU-Sim; they are turned into each kernel's
    own share when the thread-instruction counter shows it (it then equals gpu_tot_sim_insn)."""
    blocks = re.split(r"^kernel_name = ", log, flags=re.MULTILINE)[1:]
    kernels, previous = [], {}
    for block in blocks:
        name = block.split(None, 1)[0]
        counters: dict[str, float] = {}
        for key in _COUNTERS:
            value = _number(block, key)
            if value is not None:
                counters[key] = value
        histogram = re.search(r"^Stall:.*$", block, re.MULTILINE)
        if histogram:
            for item in histogram.group(0).split():
                key, _, value = item.partition(":")
                if key in _STALL_KEYS or re.fullmatch(r"W\d+", key):
                    counters[key] = float(value)
        cumulative = counters.get("gpgpu_n_tot_thrd_icount") == _number(block, "gpu_tot_sim_insn")
        own = {k: v - (previous.get(k, 0) if cumulative else 0) for k, v in counters.items()}
        previous = counters
        warp_instructions = own.get("gpgpu_n_tot_w_icount")
        kernels.append(KernelStats(
            name=name, cycles=int(_number(block, "gpu_sim_cycle") or 0),
            instructions=int(_number(block, "gpu_sim_insn") or 0),
            warp_instructions=None if warp_instructions is None else int(warp_instructions),
            ipc=_number(block, "gpu_ipc") or 0.0,
            stalls={k: int(v) for k, v in own.items()
                    if k not in ("gpgpu_n_tot_thrd_icount", "gpgpu_n_tot_w_icount")}))
    return kernels


@dataclasses.dataclass
class DriverOutput:
    counts: dict[str, tuple[float, float]]  # kernel -> (flops, exponentials)
    checks: list[dict]
    result: Optional[str]  # PASS, FAIL, or None (the run broke before its result)
    errors: list[str]


def parse_driver(log: str) -> DriverOutput:
    counts, checks, result, errors = {}, [], None, []
    for line in log.splitlines():
        if line.startswith("count "):
            fields = line.split()
            values = dict(f.split("=", 1) for f in fields[2:])
            counts[fields[1]] = (float(values["flops"]), float(values["exp"]))
        elif line.startswith("check "):
            fields = line.split()
            values = dict(f.split("=", 1) for f in fields[2:])
            checks.append({"output": fields[1], "max_error": float(values["max_err"]),
                           "worst_error_over_tolerance": float(values["worst"]),
                           "bad": int(values["bad"]), "of": int(values["of"])})
        elif line.startswith("result "):
            result = line.split()[1]
        elif line.startswith("error:"):
            errors.append(line)
    return DriverOutput(counts, checks, result, errors)


def kernel_label(mangled: str, counts: dict[str, tuple[float, float]]) -> Optional[str]:
    """The counted kernel a mangled name is (its identifier appears length-prefixed)."""
    for name in counts:
        if f"{len(name)}{name}" in mangled:
            return name
    return None


# ----------------------------------------------------------------------------- runs
def run_command(case: Case, binaries: dict[str, Path]) -> list[str]:
    binary = binaries["fa2_forward" if case.is_fa2 else "dsa_sim"]
    return [str(binary), *case.args] if case.is_fa2 else [str(binary), case.family, case.dtype, *case.args]


def simulate(case: Case, command: list[str], sim: Path, config: Path, run_dir: Path,
             timeout: Optional[float]) -> tuple[str, float, Optional[int]]:
    """Runs one command under the simulator in run_dir; (log, wall seconds, exit status)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for item in config.iterdir():
        if item.is_file():
            (run_dir / item.name).write_bytes(item.read_bytes())
    env = dict(os.environ, CUDA_INSTALL_PATH=str(sim / "cuda"),
               PATH=f"{sim / 'bin'}:{sim / 'cuda' / 'bin'}:{os.environ.get('PATH', '')}")
    # setup_environment with an explicit "release": sourced bare it reads the caller's
    # arguments; it prints git noise on stderr (the source is an archive, not a clone).
    script = (f"source {shlex.quote(str(sim / 'src' / 'setup_environment'))} release >/dev/null 2>&1 "
              f"&& exec nice -n 10 \"$@\"")
    start = time.monotonic()
    with open(run_dir / "sim.log", "w") as log_file:
        try:
            status = subprocess.run(["bash", "-c", script, "sim", *command], cwd=run_dir, env=env,
                                    stdout=log_file, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = None
    wall = time.monotonic() - start
    return (run_dir / "sim.log").read_text(errors="replace"), wall, status


def finished_run(run_dir: Path) -> tuple[str, float, Optional[int]]:
    """(log, wall seconds, exit status) of a run folder simulate() filled earlier. The exit
    status is not kept: a log whose driver printed PASS counts as exit 0, any other as 1;
    the wall time is the simulator's own last report."""
    log = (run_dir / "sim.log").read_text(errors="replace")
    driver = parse_driver(log)
    status = 0 if driver.result == "PASS" else 1
    seconds = re.findall(r"gpgpu_simulation_time = .*\((\d+) sec\)", log)
    return log, float(seconds[-1]) if seconds else 0.0, status


def not_run_record(case: Case) -> dict:
    """A case --collect found no run of: listed as NOT RUN, never as a pass."""
    return {"case": case.name, "family": case.family, "dtype": case.dtype, "args": list(case.args),
            "result": "NOT RUN", "exit_status": None, "wall_s": None, "checks": [], "errors": [],
            "kernels": [], "cycles": 0, "log": None}


def case_record(case: Case, log: str, wall: float, status: Optional[int], clock_mhz: float,
                run_dir: Path) -> dict:
    driver = parse_driver(log)
    kernels = []
    for stats in parse_kernels(log):
        label = kernel_label(stats.name, driver.counts) or stats.name
        flops, exponentials = driver.counts.get(label, (None, None))
        kernels.append({"kernel": label, "mangled": stats.name, "cycles": stats.cycles,
                        "us": stats.cycles / clock_mhz, "instructions": stats.instructions,
                        "warp_instructions": stats.warp_instructions, "ipc": stats.ipc,
                        "flops": flops, "exponentials": exponentials, "stalls": stats.stalls})
    if status is None:
        outcome = "TIMEOUT"
    elif driver.result == "PASS" and status == 0:
        outcome = "PASS"
    elif driver.result == "FAIL":
        outcome = "FAIL"
    else:
        outcome = "ERROR"
    return {"case": case.name, "family": case.family, "dtype": case.dtype, "args": list(case.args),
            "result": outcome, "exit_status": status, "wall_s": round(wall, 1),
            "checks": driver.checks, "errors": driver.errors, "kernels": kernels,
            "cycles": sum(k["cycles"] for k in kernels), "log": str(run_dir / "sim.log")}


def _fa2_pairs(record: dict) -> tuple[int, int]:
    """(queries, keys) per sample of an FA2 case."""
    args = record["args"]
    return int(args[args.index("--queries") + 1]), int(args[args.index("--keys") + 1])


def attach_fa2_ratios(records: list[dict], anchors: dict[str, tuple[int, int]]) -> None:
    """ratio_to_fa2 = cycles / FA2 forward's cycles at the same query-key pairs."""
    fa2 = {_fa2_pairs(r): r["cycles"] for r in records
           if r["family"] == "fa2-forward" and r["result"] == "PASS"}
    for record in records:
        pairs = anchors.get(record["case"])
        record["fa2_pairs"] = list(pairs) if pairs else None
        anchor = fa2.get(pairs) if pairs else None
        record["ratio_to_fa2"] = record["cycles"] / anchor if anchor else None
        for kernel in record["kernels"]:
            kernel["ratio_to_fa2"] = kernel["cycles"] / anchor if anchor else None


def previous_records(path: Path, config: str) -> dict[str, dict]:
    """The records of an earlier results.json by case name, each with the commit it was
    built from (``--previous``); refused when its config differs."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HarnessError(f"--previous {path}: not a readable results.json ({error})") from None
    if data.get("config") != config:
        raise HarnessError(f"--previous {path} is of config {data.get('config')!r}, not {config!r}")
    return {record["case"]: {"commit": data.get("commit", "unknown"), **record}
            for record in data.get("cases", [])}


def source_commit() -> str:
    """The checkout's commit, marked when the tree has uncommitted changes (kept results
    should come from a clean one)."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def _si(value: Optional[float]) -> str:
    if value is None:
        return "–"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def markdown_table(records: list[dict], config: str, clock_mhz: float) -> str:
    lines = [f"Simulated GPU (GPGPU-Sim, config `{config}`, core clock {clock_mhz:g} MHz): "
             "model cycles, not measurements; compare ratios between kernels of one config.",
             "", "| case | kernel | dtype | result | cycles | µs | FLOPs | exp | ratio to FA2 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        if not r["kernels"]:  # a broken run or one --collect did not find: no numbers
            lines.append(f"| {r['case']} | – | {r['dtype']} | {r['result']} | – | – | – | – | – |")
            continue
        rows = r["kernels"] if len(r["kernels"]) == 1 else r["kernels"] + [
            {"kernel": "total", "cycles": r["cycles"], "us": r["cycles"] / clock_mhz,
             "flops": sum(k["flops"] or 0 for k in r["kernels"]) or None,
             "exponentials": sum(k["exponentials"] or 0 for k in r["kernels"]) or None,
             "ratio_to_fa2": r.get("ratio_to_fa2")}]
        for k in rows:
            ratio = k.get("ratio_to_fa2")
            lines.append(f"| {r['case']} | {k['kernel']} | {r['dtype']} | {r['result']} | "
                         f"{k['cycles']:,} | {k['us']:.1f} | {_si(k['flops'])} | "
                         f"{_si(k['exponentials'])} | {'–' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("correctness", "layer14"))
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="a driver family (repeatable), with --shape")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable (default float16)")
    parser.add_argument("--shape", default="--preset odd",
                        help="the driver's shape arguments, quoted (default: '--preset odd')")
    parser.add_argument("--no-fa2", action="store_true", help="layer14 without FA2's forward")
    parser.add_argument("--fa2-pairs", action="append", default=[], metavar="QUERIES:KEYS",
                        help="FA2 at these per-sample pairs (batch 1) for --family cases")
    parser.add_argument("--config", default="h100-8sm",
                        help="a config under $DSA_GPUSIM/configs (h100, h100-8sm) or a folder")
    parser.add_argument("--runs", type=Path, help="where the run folders go")
    parser.add_argument("--out", type=Path, help="where results.json and results.md go (default: --runs)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="simulations at once (default 1)")
    parser.add_argument("--timeout", type=float, help="seconds per simulation")
    parser.add_argument("--collect", action="store_true",
                        help="simulate nothing: read the selected cases' finished logs from --runs "
                             "(runs of earlier or separate calls) and write the results")
    parser.add_argument("--previous", type=Path, metavar="RESULTS_JSON",
                        help="with --collect: a case without a run folder under --runs takes its "
                             "record from this earlier results.json of the same config")
    parser.add_argument("--plan", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    if args.previous is not None and not args.collect:
        parser.error("--previous goes with --collect")
    if (args.preset is None) == (args.family is None):
        parser.error("give either --preset or --family")
    if args.jobs < 1:
        parser.error("-j/--jobs must be >= 1")
    return args


def selected_cases(args: argparse.Namespace) -> tuple[list[Case], dict[str, tuple[int, int]]]:
    """The cases and, per case name, the FA2 pairs it is compared with."""
    anchors: dict[str, tuple[int, int]] = {}
    if args.preset:
        cases = preset_cases(args.preset, fa2=not args.no_fa2)
        if args.preset == "layer14":
            for case in cases:
                if not case.is_fa2:
                    anchors[case.name] = (1024, 3072) if "cross" in case.name else (1024, 1024)
        return cases, anchors
    label = "custom" if args.shape != "--preset odd" else "odd"
    cases = [driver_case(f, d, args.shape, label) for f in args.family for d in (args.dtype or ["float16"])]
    for text in args.fa2_pairs:
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise HarnessError(f"--fa2-pairs expects QUERIES:KEYS, got {text!r}")
        pairs = int(match.group(1)), int(match.group(2))
        cases.append(fa2_case(1, *pairs))
        for case in cases:
            if not case.is_fa2 and case.family in ("forward", "backward"):
                anchors.setdefault(case.name, pairs)
    return cases, anchors


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cases, anchors = selected_cases(args)
        fa2 = any(c.is_fa2 for c in cases)
        if args.plan:
            return print_plan(args, cases, fa2)
        if args.collect and args.runs is None:
            raise HarnessError("--collect reads the run folders under --runs: name them")
        sim = simulator_dir()
        config = config_dir(args.config, sim)
        clock = core_clock_mhz((config / "gpgpusim.config").read_text())
        binaries = {} if args.collect else build(fa2)
        previous = previous_records(args.previous, args.config) if args.previous else {}
        if args.collect:
            if not any((args.runs / c.name / "sim.log").is_file() for c in cases):
                raise HarnessError(f"--collect: no sim.log under {args.runs} for any of "
                                   f"{', '.join(c.name for c in cases)}")
    except HarnessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    commit = source_commit()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = args.runs or sim / "runs" / f"dsa_ops-{stamp}"
    out = args.out or runs

    def one(case: Case) -> dict:
        run_dir = runs / case.name
        if args.collect:
            if not (run_dir / "sim.log").is_file():
                if previous.get(case.name, {}).get("result", "NOT RUN") != "NOT RUN":
                    record = previous[case.name]
                    print(f"{case.name}: {record['result']}, {record['cycles']:,} cycles "
                          f"(from {args.previous}, commit {record['commit'][:10]})", flush=True)
                    return record
                print(f"{case.name}: NOT RUN (no {run_dir / 'sim.log'})", flush=True)
                return not_run_record(case)
            log, wall, status = finished_run(run_dir)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "commit").write_text(commit + "\n")  # what the binaries were built from
            log, wall, status = simulate(case, run_command(case, binaries), sim, config, run_dir,
                                         args.timeout)
        record = case_record(case, log, wall, status, clock, run_dir)
        built_from = run_dir / "commit"
        record["commit"] = built_from.read_text().strip() if built_from.is_file() else "unknown"
        print(f"{case.name}: {record['result']}, {record['cycles']:,} cycles, {wall:.0f} s wall", flush=True)
        return record

    print(f"{len(cases)} case(s) on {config} ({clock:g} MHz), {args.jobs} at a time; runs in {runs}",
          flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(one, cases))
    attach_fa2_ratios(records, anchors)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(records, args.config, clock)
    (out / "results.json").write_text(json.dumps(
        {"config": args.config, "config_dir": str(config), "core_clock_mhz": clock,
         "simulated": True, "commit": commit, "cases": records}, indent=2) + "\n")
    (out / "results.md").write_text(table)
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0 if all(r["result"] == "PASS" for r in records) else 1


def print_plan(args: argparse.Namespace, cases: list[Case], fa2: bool) -> int:
    print(f"config: {args.config}; {args.jobs} simulation(s) at a time")
    try:
        commands = build_commands(fa2)
    except HarnessError as error:  # FA2 paths missing: say so, still show the cases
        print(f"note: {error}")
        commands = build_commands(False)
    for name, command in commands.items():
        print(f"build {name} (into build/sim/<hash>/): {shlex.join(command)}")
    binaries = {name: BUILD / "<hash>" / name for name in ("dsa_sim", "fa2_forward")}
    for case in cases:
        print(f"run {case.name}: {shlex.join(run_command(case, binaries))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
