"""benchmarks.report on a small synthetic pytest-benchmark JSON (timed, OOM and n/a cells),
and ``make bench``'s runner (benchmarks.run) end to end on one cheap CPU case."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report  # importable from the repo root: pyproject sets pythonpath


def _bench(contender: str, median: float, mask: str = "centre", *, family: str = "op",
           baseline: str = "reference", tflops=None, peak=None) -> dict:
    info = {"family": family, "contender": contender, "baseline": baseline, "config": "64x64x128",
            "batch": 16, "mask": mask, "branch": "cross", "dtype": "bf16", "pass": "fwd",
            "status": "ok", "median_s": median}
    if tflops is not None:
        info["tflops"] = tflops
    if peak is not None:
        info["peak_mem_bytes"] = peak
    return {"name": f"test[{contender}-{mask}]", "group": "g", "extra_info": info,
            "stats": {"median": median, "mean": median * 1.1, "rounds": 5}}


def _not_run(contender: str, status: str, reason: str, mask: str = "centre") -> dict:
    return {"family": "op", "contender": contender, "baseline": "reference", "config": "64x64x128",
            "batch": 16, "mask": mask, "branch": "cross", "dtype": "bf16", "pass": "fwd",
            "status": status, "reason": reason}


@pytest.fixture
def results_json(tmp_path):
    data = {
        "machine_info": {"gpu": "Test GPU 80GB", "torch": "2.x", "cuda": "13.0", "triton": "3.x",
                         "dsa_ops_backends": ["reference", "cuda"]},
        "commit_info": {"id": "abc1234", "dirty": True},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            _bench("reference", 0.010, tflops=1.5, peak=3 * 2 ** 30),
            _bench("dsa_ops[cuda]", 0.002, tflops=7.5, peak=2 ** 30),
            _bench("sdpa-mask", 0.004),
            _bench("dsa_ops[cuda]", 0.003, mask="random"),
            {"name": "unrelated", "group": None, "extra_info": {}, "stats": {"median": 1.0}},
        ],
        "not_run": [
            _not_run("flex", "unsupported", "FlexAttention is benchmarked on CUDA only"),
            _not_run("reference", "OOM", "reference O(L²) memory: ~68 GiB", mask="random"),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_tables_place_times_speedups_and_statuses(results_json):
    results = report.load_results(results_json)
    (table,) = report.build_tables(results.results)
    assert table.contenders[0] == "reference"  # the baseline leads
    assert set(table.contenders) == {"reference", "dsa_ops[cuda]", "sdpa-mask", "flex"}
    centre, random = table.rows
    assert report.time_cell(table, centre, "reference") == "10 ms"
    assert report.time_cell(table, centre, "dsa_ops[cuda]") == "2 ms (5×)"
    assert report.time_cell(table, centre, "sdpa-mask") == "4 ms (2.5×)"
    assert report.time_cell(table, centre, "flex") == "n/a"
    assert report.time_cell(table, random, "reference") == "OOM"
    # No baseline time on this row: the time stands alone, without a speed-up.
    assert report.time_cell(table, random, "dsa_ops[cuda]") == "3 ms"
    assert report.time_cell(table, random, "sdpa-mask") == report.MISSING
    assert report.tflops_cell(table, centre, "dsa_ops[cuda]") == "7.5"
    assert report.memory_cell(table, centre, "reference") == "3"


def test_cli_prints_table_and_writes_markdown_and_png(results_json, tmp_path, capsys):
    markdown, png = tmp_path / "summary.md", tmp_path / "chart.png"
    assert report.main([str(results_json), "--markdown", str(markdown), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "2 ms (5×)" in printed and "OOM" in printed and "n/a" in printed
    text = markdown.read_text()
    for expected in ("Test GPU 80GB", "abc1234 (uncommitted changes)", "| 64x64x128 |",
                     "FlexAttention is benchmarked on CUDA only", "Achieved TFLOP/s", "Peak memory"):
        assert expected in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_run_order_sets_columns_and_all_na_rows_are_left_out(tmp_path):
    timed = [_bench("sdpa-mask", 0.004), _bench("reference", 0.010), _bench("dsa_ops[cuda]", 0.002)]
    for sequence, bench in zip((3, 1, 2), timed):
        bench["extra_info"]["sequence"] = sequence
    not_run = [_not_run("flex", "unsupported", "no GPU", mask=mask) for mask in ("centre", "random")]
    not_run += [_not_run("reference", "unsupported", "no GPU", mask="random")]
    for sequence, entry in zip((4, 5, 6), not_run):
        entry["sequence"] = sequence
    results = report.load_results(_write(tmp_path / "r.json", {"benchmarks": timed, "not_run": not_run}))
    (table,) = report.build_tables(results.results)
    assert table.contenders == ["reference", "dsa_ops[cuda]", "sdpa-mask", "flex"]
    assert [row[2] for row in table.rows] == ["centre", "random"]
    assert [row[2] for row in table.shown_rows] == ["centre"]
    text = report.format_text(table)
    assert "random" not in text and "1 cases where every contender is n/a" in text
    lines = report.not_run_lines(results)
    assert lines == ["- `flex` (op), n/a in 2 cases: no GPU", "- `reference` (op), n/a in 1 case: no GPU"]


def test_cli_rejects_a_json_without_cases(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        report.main([str(empty)])
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load_results(_write(tmp_path / "bad.json", {"rows": []}))


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_screen_tables_drop_idle_columns_and_group_missing_reasons(results_json, tmp_path):
    data = json.loads(results_json.read_text())
    data["not_run"] += [_not_run("dsa_ops[triton]", "unsupported", "no GPU here"),
                        _not_run("flex", "unsupported", "no GPU here", mask="random")]
    results = report.load_results(_write(tmp_path / "r.json", data))
    (table,) = report.build_tables(results.results)
    assert table.idle_contenders == ["flex", "dsa_ops[triton]"]
    text = report.format_text(table, drop_idle=True)
    assert "flex" not in text.splitlines()[0] and "not shown: flex, dsa_ops[triton]" in text
    assert "flex" in report.format_text(table).splitlines()[0]
    lines = report.not_run_summary(results)
    assert "- n/a in 2 cases: op: dsa_ops[triton], flex\n    no GPU here" in lines
    assert any(line.startswith("- OOM in 1 case: op: reference") for line in lines)


def test_make_bench_runner_writes_json_summary_and_chart_and_prints_the_report(tmp_path):
    """``python -m benchmarks.run`` (make bench) on one cheap CPU case: the smoke benchmark
    JSON goes through the report, which writes the PNG; pytest-benchmark's own tables stay
    off the screen."""
    out = tmp_path / "bench"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "BENCH_OUT": str(out), "DSA_BENCH_DEVICE": "cpu", "PYTHONPATH": str(root),
           "OMP_NUM_THREADS": "1"}
    selection = "test_masked_attention and 16x16x512 and centre and cross and fp32 and not bwd"
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "-k", selection], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = run.stdout
    assert "masked_attention op (per branch) — speed-up over reference" in printed
    assert "dsa_ops[cpu]" in printed and "×)" in printed  # a speed-up over the reference
    assert "cases that did not run, grouped by reason:" in printed
    assert f"files: {out}/" in printed
    assert "Name (time in" not in printed  # pytest-benchmark's per-group table header
    data = json.loads((out / "results.json").read_text())
    assert {b["extra_info"]["contender"] for b in data["benchmarks"]} >= {"reference", "dsa_ops[cpu]"}
    assert "| 16x16x512 |" in (out / "summary.md").read_text()
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_output_folder_is_dated_under_results(monkeypatch):
    from benchmarks import run

    monkeypatch.delenv("BENCH_OUT", raising=False)
    folder = run.output_dir(datetime.datetime(2026, 11, 26, 15, 4, 5))
    assert folder.parent == run.RESULTS_DIR
    assert folder.name.startswith("2026-11-26_150405_")
    monkeypatch.setenv("BENCH_OUT", "/somewhere/else")
    assert run.output_dir() == Path("/somewhere/else")


def _collect(*args, matrix_variable=None):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DSA_BENCH_DEVICE": "cpu", "PYTHONPATH": str(root)}
    env.pop("DSA_BENCH_MATRIX", None)
    if matrix_variable is not None:
        env["DSA_BENCH_MATRIX"] = matrix_variable
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_headline_matrix_has_the_paper_layers_both_branches_and_every_contender():
    """The default run (CPU mode): every op contender on each paper layer, branch and pass;
    every module contender at layer 14; every training contender; nothing else. The full
    matrix keeps every case, and both print their expected duration."""
    from benchmarks.contenders import MODULE_CONTENDERS, OP_CONTENDERS, TRAINING_CONTENDERS

    headline = _collect()
    assert headline.returncode == 0, headline.stdout + headline.stderr
    ids = [line for line in headline.stdout.splitlines() if "::" in line]
    op = [i for i in ids if "test_masked_attention[" in i]
    for layer in ("16x16x512-b2-cpu", "32x32x256-b2-cpu", "64x64x128-b4-cpu"):
        for branch in ("cross", "self"):
            for pass_ in ("fwd", "fwd+bwd"):
                for contender in OP_CONTENDERS:
                    assert f"[{layer}-centre-{branch}-fp32-{pass_}-{contender}]" in " ".join(op)
    assert len(op) == 3 * 2 * 2 * len(OP_CONTENDERS)
    module = [i for i in ids if "test_attention_module[" in i]
    for pass_ in ("fwd", "fwd+bwd"):
        for contender in MODULE_CONTENDERS:
            assert f"[64x64x128-b4-cpu-centre-fp32-{pass_}-{contender}]" in " ".join(module)
    assert len(module) == 2 * len(MODULE_CONTENDERS)
    assert len([i for i in ids if "test_generator_training_step[" in i]) == len(TRAINING_CONTENDERS)
    assert not [i for i in ids if "random" in i or "bf16" in i or "128x128" in i or "256x256" in i]
    assert re.search(rf"headline matrix: {len(ids)} cases × ~[\d.]+ s per case on cpu ≈ \d+ min \(measured",
                     headline.stdout)

    full = _collect("--matrix=full")
    full_ids = [line for line in full.stdout.splitlines() if "::" in line]
    assert set(ids) < set(full_ids)
    assert any("256x256" in i and "random" in i for i in full_ids)
    assert f"full matrix: {len(full_ids)} cases" in full.stdout
    assert "deselected" not in full.stdout.splitlines()[-1]


def test_matrix_variable_is_checked():
    run = _collect(matrix_variable="everything")
    assert run.returncode != 0
    assert "DSA_BENCH_MATRIX must be one of headline, full; got 'everything'" in run.stderr + run.stdout
    assert "Traceback" not in run.stderr + run.stdout
