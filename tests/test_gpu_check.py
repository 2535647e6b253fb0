"""The CPU side of ``benchmarks/gpu_check.sh`` (``make gpu-check``): arguments, the plan, the
output layout under $OUT (at most 8 files, at most two folders deep), the sanitizer's
"not supported here", the time budget, and the report from a recorded JSON. A fake
``nvidia-smi`` and ``compute-sanitizer`` on the PATH stand in for the GPU machine."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_benchmark_report import _bench, _not_run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MAX_FILES, MAX_DEPTH = 8, 2
BUDGET_S = 480


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_gpu(tmp_path):
    """A PATH folder with nvidia-smi answering like an H200."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "nvidia-smi", 'case "$*" in\n  *compute_cap*) echo 9.0 ;;\n'
                                 '  *name*) echo "NVIDIA H200" ;;\n  *) echo "fake nvidia-smi" ;;\nesac\n')
    return bin_dir


def _run(args, env_extra, *, path_prefix=None, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env_extra}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _layout_ok(out: Path) -> list[Path]:
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= MAX_FILES, files
    assert all(len(path.relative_to(out).parts) - 1 <= MAX_DEPTH for path in files), files
    return files


def _recorded_results(path: Path) -> None:
    data = {"machine_info": {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"},
            "commit_info": {"id": "abc1234"}, "datetime": "2026-12-03T19:00:00",
            "benchmarks": [_bench("reference", 0.010), _bench("dsa_ops[cuda]", 0.001)],
            "not_run": [_not_run("flex", "unsupported", "FlexAttention failed to compile")]}
    path.write_text(json.dumps(data))


def test_plan_lists_the_default_stages_within_the_budget():
    run = _run(["--plan"], {})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    stages = [line.split()[0] for line in lines[1:-1]]
    assert stages == ["build", "test", "sanitize", "bench"]
    total = int(re.search(r"total\s+~\s*(\d+)s", lines[-1]).group(1))
    assert total == sum(int(re.search(r"~\s*(\d+)s", line).group(1)) for line in lines[1:-1])
    assert total <= BUDGET_S


def test_plan_of_chosen_stages():
    run = _run(["--plan", "report", "test-full"], {})
    assert run.returncode == 0
    assert [line.split()[0] for line in run.stdout.splitlines()[1:-1]] == ["report", "test-full"]


@pytest.mark.parametrize("args, env, message", [
    (["bogus"], {}, "gpu_check.sh: unknown stage 'bogus' (stages: build test test-full sanitize bench report)"),
    (["--fast"], {}, "gpu_check.sh: unknown option '--fast'"),
    (["report"], {"GPU_CHECK_BUDGET_S": "8min"},
     "gpu_check.sh: GPU_CHECK_BUDGET_S must be a whole number of seconds; got '8min'"),
])
def test_bad_arguments_get_one_clear_line_and_nothing_is_written(tmp_path, args, env, message):
    out = tmp_path / "out"
    run = _run(args, {"OUT": str(out), **env})
    assert run.returncode == 2
    assert run.stderr.splitlines()[0] == message
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_report_from_a_recorded_json_and_sanitizer_not_supported(tmp_path, fake_gpu):
    """A runtime that blocks the sanitizer: the probe fails, the stage says so and passes;
    the report stage turns a recorded JSON into the summary and the chart; every file is
    in $OUT."""
    _tool(fake_gpu, "compute-sanitizer",
          'echo "========= Error: Target application terminated before first instrumented API call"\n'
          "exit 1\n")
    out = tmp_path / "out"
    out.mkdir()
    _recorded_results(out / "results.json")
    run = _run(["sanitize", "report"], {"OUT": str(out)}, path_prefix=fake_gpu)
    assert run.returncode == 0, run.stdout + run.stderr
    verdict = (out / "verdict.txt").read_text().splitlines()
    assert verdict[0].startswith("sanitize  not supported here: ========= Error: Target application")
    assert re.fullmatch(r"report    ok \(\d+s\)", verdict[1])
    files = _layout_ok(out)
    assert {path.name for path in files} == {"gpu-check.log", "verdict.txt", "results.json",
                                            "summary.md", "chart.png"}
    assert "abc1234" in (out / "summary.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "gpu-check.log").read_text()
    assert "=== sanitize probe" in log and "=== report" in log


def test_a_sanitizer_finding_fails_the_run(tmp_path, fake_gpu):
    """The probe (a trivial CUDA program) passes, the kernels' driver has a finding: both
    tools' stages fail, and so does the run."""
    _tool(fake_gpu, "compute-sanitizer",
          'if [[ "$*" == *sanitize_families.py* ]]; then\n'
          '  echo "========= Invalid __global__ read of size 2 bytes"; exit 1\nfi\nexit 0\n')
    out = tmp_path / "out"
    run = _run(["sanitize"], {"OUT": str(out)}, path_prefix=fake_gpu)
    assert run.returncode == 1
    verdict = (out / "verdict.txt").read_text().splitlines()
    assert [line.split(" (")[0] for line in verdict] == ["sanitize-memcheck FAILED", "sanitize-racecheck FAILED"]
    assert all("(exit 1)" in line for line in verdict)
    assert "Invalid __global__ read" in (out / "gpu-check.log").read_text()


def test_missing_sanitizer_is_not_supported_here(tmp_path, fake_gpu):
    out = tmp_path / "out"
    env = {"OUT": str(out), "PATH": f"{fake_gpu}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    run = _run(["sanitize"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "verdict.txt").read_text().startswith("sanitize  not supported here: compute-sanitizer not found")


def test_stages_past_the_budget_are_not_run_and_fail_the_run(tmp_path, fake_gpu):
    out = tmp_path / "out"
    run = _run(["report"], {"OUT": str(out), "GPU_CHECK_BUDGET_S": "0"}, path_prefix=fake_gpu)
    assert run.returncode == 1
    assert (out / "verdict.txt").read_text().startswith("report    not run: budget of 0s spent")
    _layout_ok(out)


def test_build_without_a_gpu_says_so(tmp_path):
    out = tmp_path / "out"
    run = _run(["build"], {"OUT": str(out), "PATH": f"/usr/bin{os.pathsep}/bin"})
    assert run.returncode == 1
    assert (out / "verdict.txt").read_text().startswith("build     FAILED: no GPU visible (nvidia-smi)")


def test_default_output_folder_is_named_after_the_day_and_gpu(tmp_path, fake_gpu):
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    run = subprocess.run(["bash", str(SCRIPT), "report"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "0",
                              "PATH": f"{fake_gpu}{os.pathsep}{env['PATH']}"}, timeout=120)
    folder = re.search(r"=== verdict \((\S+),", run.stdout).group(1)
    try:
        assert re.fullmatch(r"benchmarks/results/\d{4}-\d\d-\d\d_nvidia-h200", folder)
    finally:
        for name in ("gpu-check.log", "verdict.txt"):
            (ROOT / folder / name).unlink(missing_ok=True)
        (ROOT / folder).rmdir()
