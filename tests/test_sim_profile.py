"""benchmarks.sim.profile: the instruction mix and issue slots of a simulated run, read from a
run folder's PTX, per-line statistics and log (a small synthetic folder: CI has no simulator)."""
from __future__ import annotations

import json

import pytest

from benchmarks.sim import profile

PTX = """\
.version 8.0
.visible .entry kernel(
)
{
mov.u32 %r1, %tid.x;
$L__BB0_1:
ld.global.s32 %r2, [%rd1];
cp.async.cg.shared.global [%r3], [%rd2], 16;
@%p1 bra $L__BB0_1;
mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
fma.rn.f32 %f5, %f1, %f2, %f3;
ex2.approx.ftz.f32 %f6, %f5;
{ .reg .b16 lo; cvt.rn.f16.f32 lo, %f6; }
ret;
}
"""

LOG = """\
GPGPU-Sim uArch: Stall:10	W0_Idle:5	W0_Scoreboard:700	W1:0	W32:96
Stall:30	W0_Idle:6	W0_Scoreboard:900	W1:0	W8:4	W32:128
"""


def _stats_line(line: int, count: int, latency: int) -> str:
    return f"kernel.1.sm_90.ptx {line} : {count} {latency} 0 0 0 0 0 0 0"


@pytest.fixture
def run_folder(tmp_path):
    (tmp_path / "kernel.1.sm_90.ptx").write_text(PTX)
    lines = ["kernel line : count latency dram_traffic smem_bk_conflicts smem_warp "
             "gmem_access_generated gmem_warp exposed_latency warp_divergence",
             _stats_line(5, 64, 64),       # mov, once per warp of 2 warps
             _stats_line(7, 640, 6400),    # ld.global, in the loop (10 iterations)
             _stats_line(8, 640, 3200),    # cp.async
             _stats_line(9, 640, 640),     # predicated bra
             _stats_line(10, 64, 2048),    # mma
             _stats_line(11, 128, 512),    # fma.f32
             _stats_line(12, 64, 1024),    # ex2
             _stats_line(13, 64, 64),      # inline asm block
             _stats_line(14, 64, 64)]      # ret
    (tmp_path / profile.STATS_FILE).write_text("\n".join(lines) + "\n")
    (tmp_path / profile.LOG_FILE).write_text(LOG)
    return tmp_path


@pytest.mark.parametrize("line, kind", [
    ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};", "mma"),
    ("@%p3 bra $L__BB1_7;", "bra"),
    ("@!%p3 ld.shared.v4.u32 {%r1, %r2, %r3, %r4}, [%r5];", "ld.shared"),
    ("st.global.v4.u32 [%rd1], {%r1, %r2, %r3, %r4};", "st.global"),
    ("cp.async.cg.shared.global [%r1], [%rd1], 16;", "cp.async"),
    ("cp.async.wait_group 0;", "cp.async"),
    ("fma.rn.f32 %f1, %f2, %f3, %f4;", "fp32 arith"),
    ("mad.lo.s32 %r1, %r2, %r3, %r4;", "int arith"),
    ("add.s64 %rd1, %rd2, %rd3;", "int arith"),
    ("fma.rn.f16x2 %r1, %r2, %r3, %r4;", "f16 arith"),
    ("bar.sync 0;", "barrier"),
    ("{ .reg .b64 %tmp;", "inline asm"),
])
def test_instruction_class(line, kind):
    assert profile.instruction_class(line) == kind


def test_profile_counts_warp_instructions_per_class(run_folder):
    result = profile.profile(run_folder, blocks=2)
    mix = {kind: entry["warp_instructions"] for kind, entry in result["mix"].items()}
    assert mix == {"ld.global": 20, "cp.async": 20, "bra": 20, "fp32 arith": 4, "mov": 2,
                   "mma": 2, "ex2": 2, "inline asm": 2, "ret": 2}
    assert result["warp_instructions"] == sum(mix.values())
    assert result["mix"]["ld.global"]["latency"] == 6400
    # The log's last (cumulative) histogram line.
    assert result["issue_slots"] == {"W32": 128, "W0_Scoreboard": 900, "W0_Idle": 6, "Stall": 30}
    # The loop block executed most; the block after it second.
    assert [b["block"] for b in result["blocks"]] == ["kernel.1.sm_90.ptx:$L__BB0_1",
                                                      "kernel.1.sm_90.ptx:kernel"]
    assert result["blocks"][0]["warp_instructions"] == 60 + 2 + 4 + 2 + 2 + 2


def test_render_and_json(run_folder, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile.main([str(run_folder), "--blocks", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "W0_Scoreboard" in printed and "hottest blocks" in printed
    assert json.loads(out.read_text())[0]["mix"]["mma"]["warp_instructions"] == 2


def test_missing_statistics_is_one_line(tmp_path, capsys):
    assert profile.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "-enable_ptx_file_line_stats" in err
