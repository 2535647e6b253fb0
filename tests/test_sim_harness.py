"""The simulated-GPU harness (benchmarks/sim/) without a simulator or a GPU:

- the drivers' host side (inputs, partitions, float64 references, error model, checks)
  built against the host emulation of the kernels and run for every family in float16,
  bfloat16 and float32 at the odd shape (partial tiles, a sample without keys, one without queries);
- run.py's reading of a simulator log (per-kernel statistics, running totals turned into
  each kernel's share), of the driver's lines, its ratios to FA2, table, plan and errors.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest

from benchmarks.sim import run
from dsa_ops import extension
from tests.emulation import harness

needs_host_build = pytest.mark.skipif(
    shutil.which("g++") is None or extension.cuda_include_dir() is None,
    reason="needs g++ and the CUDA headers (cuda_fp16.h)")


@pytest.fixture(scope="module")
def emulated_driver():
    return harness.build("sim_driver", optimize="-O0")


@needs_host_build
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("family", [f for f in run.FAMILIES if f != "partition"])
def test_every_family_passes_its_check_on_the_emulated_kernels(emulated_driver, family, dtype):
    result = harness.run(emulated_driver, family, dtype, "--preset", "odd", timeout=300)
    output = run.parse_driver(result.stdout)
    assert result.returncode == 0 and output.result == "PASS", result.stdout + result.stderr
    assert output.checks and all(c["bad"] == 0 and c["of"] > 0 for c in output.checks)
    assert all(flops >= 0 and exps >= 0 for flops, exps in output.counts.values())
    assert any(flops > 0 for flops, _ in output.counts.values())


@needs_host_build
def test_partition_and_the_counts_of_the_odd_shape(emulated_driver):
    result = harness.run(emulated_driver, "partition", "float16", "--preset", "odd", timeout=60)
    assert result.returncode == 0 and "result PASS" in result.stdout, result.stdout
    # Odd shape: sample 0 has 70 queries × 80 keys, sample 1 150 queries and no keys, sample 2
    # nothing: 5,600 pairs, each 2·(Dqk + Dv) = 2·(24 + 72) FLOPs and one exponential.
    forward = run.parse_driver(harness.run(emulated_driver, "forward", "float16", "--preset",
                                           "odd", timeout=60).stdout)
    assert forward.counts["forward_kernel"] == (5600 * 2 * (24 + 72), 5600)


@needs_host_build
@pytest.mark.parametrize("args, message", [
    (["forward", "float64"], "dtype must be float32, float16 or bfloat16, got 'float64'"),
    (["sideways", "float16"], "FAMILY must be one of"),
    (["forward", "float16", "--length", "-3"], "--length expects an integer >= 1, got '-3'"),
    (["forward", "float16", "--length", "100"], "--hole needs --length a square"),
    (["forward", "float16", "--qk-dim", "80", "--queries", "4", "--length", "8"], "--qk-dim must be in [8, 64], got 80"),
    (["forward", "float16", "--batch"], "--batch needs a value"),
])
def test_bad_arguments_get_one_line(emulated_driver, args, message):
    result = harness.run(emulated_driver, *args, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


# Two kernels of one run, in the simulator's format (abridged), then the driver's lines. The
# shader counters are running totals: the second kernel's own share is the difference.
LOG = """\
-gpgpu_clock_domains 1755.0:1755.0:1755.0:850.0 # Clock Domain Frequencies in MhZ
count delta_kernel flops=1000 exp=10
count key_kernel flops=3000 exp=10
count reduce_kernel flops=0 exp=0
kernel_name = _ZN7dsa_ops16masked_attention57_GLOBAL__N__21ac546c_18_backward_float16_cu_37112delta_kernelI6__halfEEvNS0_14BackwardLaunchE 
kernel_launch_uid = 1 
gpu_sim_cycle = 1000
gpu_sim_insn = 64000
gpu_ipc =      64.0000
gpu_tot_sim_cycle = 1000
gpu_tot_sim_insn = 64000
gpgpu_n_tot_thrd_icount = 64000
gpgpu_n_tot_w_icount = 2000
gpgpu_n_shmem_bkconflict = 5
Stall:100	W0_Idle:40	W0_Scoreboard:300	W1:0	W32:900
kernel_name = _ZN7dsa_ops16masked_attention57_GLOBAL__N__21ac546c_18_backward_float16_cu_3710key_kernelI6__halfLi32ELi128EEEvNS0_14BackwardLaunchE 
kernel_launch_uid = 2 
gpu_sim_cycle = 3000
gpu_sim_insn = 96000
gpu_ipc =      32.0000
gpu_tot_sim_cycle = 4000
gpu_tot_sim_insn = 160000
gpgpu_n_tot_thrd_icount = 160000
gpgpu_n_tot_w_icount = 5000
gpgpu_n_shmem_bkconflict = 12
Stall:250	W0_Idle:90	W0_Scoreboard:1000	W1:3	W32:1900
check dq max_err=0.0005 worst=0.04 bad=0 of=10800
check dk max_err=0.0004 worst=0.04 bad=0 of=10800
result PASS
"""


def test_log_parsing_gives_each_kernel_its_own_statistics():
    kernels = run.parse_kernels(LOG)
    assert [k.cycles for k in kernels] == [1000, 3000]
    assert [k.instructions for k in kernels] == [64000, 96000]
    assert [k.warp_instructions for k in kernels] == [2000, 3000]
    assert kernels[1].stalls["W0_Scoreboard"] == 700 and kernels[1].stalls["W1"] == 3
    assert kernels[1].stalls["gpgpu_n_shmem_bkconflict"] == 7
    driver = run.parse_driver(LOG)
    assert [run.kernel_label(k.name, driver.counts) for k in kernels] == ["delta_kernel", "key_kernel"]
    # kl_forward_kernel is not forward_kernel: the identifier is matched with its length prefix.
    assert run.kernel_label("_ZN7dsa_ops12attention_kl12_GLOBAL__N_117kl_forward_kernelI6__halfLi16EEEvNS0_15KlForwardLaunchE",
                            {"forward_kernel": (0, 0)}) is None
    assert run.core_clock_mhz(LOG) == 1755.0


def test_records_ratios_and_table(tmp_path):
    case = run.driver_case("backward", "float16", "--preset odd", "odd")
    record = run.case_record(case, LOG, 12.0, 0, 1755.0, tmp_path)
    assert record["result"] == "PASS" and record["cycles"] == 4000
    assert record["kernels"][1]["flops"] == 3000 and record["kernels"][1]["us"] == pytest.approx(3000 / 1755)
    fa2_log = "count fa2_forward_kernel flops=5 exp=1\nkernel_name = _Z18fa2_forward_kernelN5flash16Flash_fwd_paramsE \ngpu_sim_cycle = 2000\ngpu_sim_insn = 1\ngpu_tot_sim_insn = 1\nresult PASS\n"
    fa2 = run.case_record(run.fa2_case(1, 128, 64), fa2_log, 1.0, 0, 1755.0, tmp_path)
    run.attach_fa2_ratios([record, fa2], {case.name: (128, 64)})
    assert record["ratio_to_fa2"] == 2.0 and record["kernels"][0]["ratio_to_fa2"] == 0.5
    table = run.markdown_table([record, fa2], "h100-8sm", 1755.0)
    assert "not measurements" in table
    assert re.search(r"\| backward-float16-odd \| total \| float16 \| PASS \| 4,000 \| 2\.3 \| 4k \| 20 \| 2\.00 \|", table), table
    json.dumps(record)  # what results.json holds


def test_a_failed_check_or_a_broken_run_is_not_a_pass(tmp_path):
    case = run.driver_case("forward", "float16", "--preset odd", "odd")
    assert run.case_record(case, LOG.replace("result PASS", "result FAIL"), 1, 1, 1755.0, tmp_path)["result"] == "FAIL"
    assert run.case_record(case, LOG.replace("result PASS", ""), 1, -11, 1755.0, tmp_path)["result"] == "ERROR"
    assert run.case_record(case, LOG, 1, None, 1755.0, tmp_path)["result"] == "TIMEOUT"


def test_plans_cover_every_family_and_dtype(capsys, monkeypatch):
    monkeypatch.delenv("DSA_FA2_SRC", raising=False)
    assert run.main(["--preset", "correctness", "--plan"]) == 0
    runs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    expected = {(f, d) for f in run.FAMILIES if f != "partition" for d in ("float16", "bfloat16")}
    seen = {tuple(line.split()[3:5]) for line in runs if "partition" not in line}
    assert seen == expected and len(runs) == len(expected) + 1
    assert all("--preset odd" in line for line in runs)
    assert run.main(["--preset", "layer14", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "note: FA2's forward needs DSA_FA2_SRC" in plan
    assert "--queries 1024 --keys 3072" in plan and "--keys complement" in plan and "--keys queries" in plan


def test_missing_simulator_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DSA_GPUSIM", raising=False)
    assert run.main(["--preset", "correctness"]) == 2
    assert capsys.readouterr().err.startswith("error: DSA_GPUSIM is not set")
    monkeypatch.setenv("DSA_GPUSIM", str(tmp_path))
    assert run.main(["--preset", "correctness"]) == 2
    assert "has no src/setup_environment" in capsys.readouterr().err


def _fake_simulator(tmp_path, monkeypatch) -> None:
    """A $DSA_GPUSIM folder with what the harness looks for (no simulator: --collect only)."""
    sim = tmp_path / "sim"
    (sim / "src").mkdir(parents=True)
    (sim / "src" / "setup_environment").write_text("")
    (sim / "cuda" / "bin").mkdir(parents=True)
    (sim / "configs" / "h100-8sm").mkdir(parents=True)
    (sim / "configs" / "h100-8sm" / "gpgpusim.config").write_text(LOG.splitlines()[0] + "\n")
    monkeypatch.setenv("DSA_GPUSIM", str(sim))


def test_collect_reads_finished_runs_without_simulating(capsys, monkeypatch, tmp_path):
    _fake_simulator(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    args = ["--family", "backward", "--shape", "--batch 1", "--runs", str(runs), "--collect"]
    assert run.main(args) == 2  # nothing there yet: one line naming the case
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backward-float16-custom" in err
    # One of two cases run: the other is listed as NOT RUN, and the call is not a pass.
    (runs / "forward-float16-custom").mkdir(parents=True)
    (runs / "forward-float16-custom" / "sim.log").write_text(LOG)
    assert run.main(["--family", "forward", "--family", "backward", "--shape", "--batch 1",
                     "--runs", str(runs), "--collect"]) == 1
    results = {r["case"]: r["result"] for r in json.loads((runs / "results.json").read_text())["cases"]}
    assert results == {"forward-float16-custom": "PASS", "backward-float16-custom": "NOT RUN"}
    assert "| backward-float16-custom | – | float16 | NOT RUN |" in (runs / "results.md").read_text()
    (runs / "backward-float16-custom").mkdir(parents=True)
    (runs / "backward-float16-custom" / "sim.log").write_text(
        LOG + "gpgpu_simulation_time = 0 days, 0 hrs, 1 min, 5 sec (65 sec)\n")
    assert run.main(args) == 0
    results = json.loads((runs / "results.json").read_text())
    (record,) = results["cases"]
    assert record["result"] == "PASS" and record["cycles"] == 4000 and record["wall_s"] == 65
    (runs / "backward-float16-custom" / "sim.log").write_text(LOG.replace("result PASS", ""))
    assert run.main(args) == 1  # a run that broke before its result is not a pass
    assert json.loads((runs / "results.json").read_text())["cases"][0]["result"] == "ERROR"


def test_collect_takes_missing_cases_from_previous_results(capsys, monkeypatch, tmp_path):
    """Runs of one case made later merge with an earlier results.json: the new run wins, a
    case without a run keeps its earlier record and commit, and a NOT RUN stays NOT RUN."""
    _fake_simulator(tmp_path, monkeypatch)
    earlier, runs = tmp_path / "earlier", tmp_path / "runs"
    (earlier / "forward-float16-custom").mkdir(parents=True)
    (earlier / "forward-float16-custom" / "sim.log").write_text(LOG)
    both = ["--family", "forward", "--family", "backward", "--shape", "--batch 1", "--collect"]
    assert run.main(both + ["--runs", str(earlier)]) == 1  # backward NOT RUN
    previous = json.loads((earlier / "results.json").read_text())
    previous["commit"] = "0123456789abcdef"  # as files written before records had their own
    for record in previous["cases"]:
        record.pop("commit", None)
    (earlier / "results.json").write_text(json.dumps(previous))
    (runs / "backward-float16-custom").mkdir(parents=True)
    (runs / "backward-float16-custom" / "sim.log").write_text(LOG)
    (runs / "backward-float16-custom" / "commit").write_text("fedcba9876543210\n")  # its build
    assert run.main(both + ["--runs", str(runs), "--previous", str(earlier / "results.json")]) == 0
    records = {r["case"]: r for r in json.loads((runs / "results.json").read_text())["cases"]}
    assert records["forward-float16-custom"]["result"] == "PASS"
    assert records["forward-float16-custom"]["commit"] == "0123456789abcdef"
    assert records["backward-float16-custom"]["result"] == "PASS"
    assert records["backward-float16-custom"]["commit"] == "fedcba9876543210"
    assert "from " in capsys.readouterr().out
    # A previous file of another config is refused in one line; --previous needs --collect.
    previous["config"] = "h100"
    (earlier / "results.json").write_text(json.dumps(previous))
    assert run.main(both + ["--runs", str(runs), "--previous", str(earlier / "results.json")]) == 2
    assert "is of config 'h100'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--family", "forward", "--previous", str(earlier / "results.json")])


def test_a_built_binary_is_never_replaced_under_a_running_simulation(tmp_path, monkeypatch):
    """Each binary lives under build/sim/<hash of command and sources>/: a second call (a
    changed tree, or one building at the same time) gets its own file, and the first one's
    binary, which GPGPU-Sim reads its PTX back from, stays as it was."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\nfor arg; do out="$arg"; done\necho built > "$out"\n')
    nvcc.chmod(0o755)
    source = tmp_path / "driver.cu"
    source.write_text("version 1")
    monkeypatch.setattr(run, "BUILD", tmp_path / "build")
    monkeypatch.setattr(run, "build_commands",
                        lambda fa2: {"dsa_sim": [str(nvcc), str(source), "-o", "unused"]})
    monkeypatch.setattr(run, "sources", lambda name: [source])

    first = run.build(False)["dsa_sim"]
    assert first.name == "dsa_sim" and first.parent.parent == tmp_path / "build"
    assert first.read_text() == "built\n"
    first.write_text("a simulation runs this")
    assert run.build(False)["dsa_sim"] == first  # up to date: not rebuilt
    source.write_text("version 2")
    second = run.build(False)["dsa_sim"]
    assert second != first and second.read_text() == "built\n"
    assert first.read_text() == "a simulation runs this"
    assert not list((tmp_path / "build").glob("*/*.partial"))
    # Two calls on one tree at once: both see no binary and build; the one that publishes
    # second keeps the first one's file (which may already be running) and drops its own.
    source.write_text("version 3")
    racing = run.build(False)["dsa_sim"]
    racing.write_text("the first call's simulation runs this")
    monkeypatch.setattr(pathlib.Path, "is_file", lambda path: False)
    assert run.build(False)["dsa_sim"] == racing
    assert racing.read_text() == "the first call's simulation runs this"
    assert not list((tmp_path / "build").glob("*/*.partial"))
