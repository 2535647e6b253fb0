"""``make bench``: run the benchmark suite, keep its files in one dated folder, print the report.

    python -m benchmarks.run [PYTEST_ARGS...]        # e.g. -k "64x64x128", --matrix=full

The headline matrix by default (``--matrix=full``: every case; see ``benchmarks/cases.py``);
the expected duration is printed before the first case.

Writes into ``$BENCH_OUT``, or else ``benchmarks/results/<YYYY-MM-DD_HHMMSS>_<device>/``:

- ``results.json``: pytest-benchmark's JSON (every round, each case's ``extra_info``, the
  cases that did not run under ``not_run``, the machine and the git commit);
- ``summary.md`` and ``chart.png``: ``benchmarks.report``'s summary and bar chart.

The screen shows pytest's progress line, then the report's comparison tables (speed-ups
over the reference), why cells are missing (grouped by contender and reason) and where the
files are. pytest-benchmark's own per-group tables stay in the JSON (``--benchmark-quiet``),
and so do the skip reasons of the cases that could not run (``-rN``). Exits with pytest's
status (the report still runs when some cases failed).
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import report

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def device_name() -> str:
    """The benchmarked device as a folder-name part: the GPU's name, or ``cpu``."""
    from benchmarks.cases import DEVICE

    if DEVICE.type != "cuda":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(DEVICE).lower()).strip("-")


def output_dir(now: Optional[datetime.datetime] = None) -> Path:
    """``$BENCH_OUT``, or a new dated folder under ``benchmarks/results/``."""
    if os.environ.get("BENCH_OUT"):
        return Path(os.environ["BENCH_OUT"])
    now = now or datetime.datetime.now()
    return RESULTS_DIR / f"{now:%Y-%m-%d_%H%M%S}_{device_name()}"


def pytest_command(json_path: Path, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark-only", "--benchmark-quiet",
            f"--benchmark-json={json_path}", "-q", "-rN", "--disable-warnings", *extra]


def main(argv: Optional[Sequence[str]] = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "summary.md", "chart.png")}
    print(f"benchmarks → {out}", flush=True)
    status = subprocess.call(pytest_command(paths["results.json"], extra), cwd=REPO_ROOT)
    if not paths["results.json"].is_file():
        print(f"pytest exited with status {status} and wrote no results", file=sys.stderr)
        return status or 1
    report_status = report.main([str(paths["results.json"]), "--markdown", str(paths["summary.md"]),
                                 "--png", str(paths["chart.png"])])
    print(f"\nfiles: {out}/\n  " + "\n  ".join(
        f"{path.name:<13}{description}" for path, description in (
            (paths["results.json"], "pytest-benchmark JSON (every round, per-group tables' data)"),
            (paths["summary.md"], "the tables above + TFLOP/s, peak memory, machine and commit"),
            (paths["chart.png"], "bar chart of the median times"))))
    return status or report_status


if __name__ == "__main__":
    sys.exit(main())
