"""Where a simulated kernel's time goes: instruction mix and issue stalls of GPGPU-Sim runs.

    python -m benchmarks.sim.profile RUN_DIR [RUN_DIR ...] [--blocks N] [--json OUT]

A run folder (``benchmarks.sim.run`` makes one per case) holds the PTX the simulator parsed
(``*.ptx``), its per-PTX-line statistics (``gpgpu_inst_stats.txt``: executions, latency,
shared-memory bank conflicts per line; the H100 config turns them on with
``-enable_ptx_file_line_stats 1``) and its log (``sim.log``). This reads the three and prints,
per run, side by side:

* the instruction mix: warp instructions per class (mma, ldmatrix, cp.async, ex2, float32
  arithmetic, integer/address arithmetic, compares and selects, branches, moves, ...), and
  the summed latency of each class (issue to completion: where a class's results were waited
  for, not how long the warp stalled);
* the scheduler's issue-slot breakdown from the log: cycles a scheduler issued
  (``W32``: full warps), found every warp waiting on a dependency (``W0_Scoreboard``), had no
  warp at all (``W0_Idle``) or was blocked by the pipeline (``Stall``);
* with ``--blocks N``, the N PTX basic blocks that executed most, with their mix: that names
  the loop a cost comes from (a gather, the softmax, the products).

Counts are the simulator's executions of each PTX line; a thread-level count divided by 32
is a warp-level count, exact for kernels whose warps run converged (ours and FA2's do:
the log's ``W32`` dominates).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

STATS_FILE = "gpgpu_inst_stats.txt"
LOG_FILE = "sim.log"
# Column order of gpgpu_inst_stats.txt after "file line :".
STAT_COLUMNS = ("count", "latency", "dram_traffic", "smem_bank_conflicts", "smem_warps",
                "gmem_accesses", "gmem_warps", "exposed_latency", "warp_divergence")
ISSUE_SLOTS = ("W32", "W0_Scoreboard", "W0_Idle", "Stall")

_PREDICATE = re.compile(r"^@!?%\w+\s+")
_FP32_OPS = {"fma", "mul", "add", "sub", "max", "min", "neg", "abs"}
_INTEGER_OPS = {"and", "or", "xor", "not", "shl", "shr", "mad", "div", "rem", "cvta", "popc",
                "clz", "bfe", "bfi", "prmt", "lop3"}


def instruction_class(ptx_line: str) -> str:
    """The class of one PTX instruction line (predicate stripped), e.g. ``mma``, ``ld.global``."""
    text = _PREDICATE.sub("", ptx_line.strip())
    if text.startswith("{"):
        return "inline asm"  # a scoped block of nvcc's inline PTX (cvta, packing)
    opcode = text.split()[0].rstrip(";") if text else "?"
    base = opcode.split(".")[0]
    if base in ("mma", "wgmma", "ldmatrix", "ex2", "lg2", "rcp", "shfl", "cvt", "bra", "mov",
                "setp", "selp"):
        return base
    if base.startswith("cp") and "async" in opcode:
        return "cp.async"
    if base in ("ld", "st"):
        for space in ("shared", "global", "param", "local"):
            if f".{space}" in opcode:
                return f"{base}.{space}"
        return base
    if base in ("bar", "barrier"):
        return "barrier"
    if base in _FP32_OPS:
        if ".f32" in opcode:
            return "fp32 arith"
        return "int arith" if re.search(r"\.[usb](16|32|64)", opcode) else "f16 arith"
    if base in _INTEGER_OPS:
        return "int arith"
    return base


def _ptx_lines(run: Path) -> dict[str, list[str]]:
    return {path.name: path.read_text(errors="replace").splitlines() for path in run.glob("*.ptx")}


def _block_labels(lines: Sequence[str]) -> list[str]:
    """The basic-block label (``$L__BB1_7``) or entry each PTX line belongs to (0-based)."""
    labels, current = [], "?"
    for line in lines:
        text = line.strip()
        if text.startswith(".entry") or ".entry " in text:
            current = text.split("(")[0].split()[-1][:60]
        elif re.match(r"^\$?\w+:$", text):
            current = text[:-1]
        labels.append(current)
    return labels


def line_statistics(run: Path) -> list[tuple[str, str, dict[str, int]]]:
    """(block label, instruction class, statistics) per PTX line the simulator executed."""
    stats_path = run / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} is missing: the run needs "
                                "-enable_ptx_file_line_stats 1 in its gpgpusim.config")
    ptx = _ptx_lines(run)
    labels = {name: _block_labels(lines) for name, lines in ptx.items()}
    rows = []
    for line in stats_path.read_text().splitlines()[1:]:
        match = re.match(r"(\S+) (\d+) : (.*)", line)
        if not match:
            continue
        name, number = match.group(1), int(match.group(2))
        values = dict(zip(STAT_COLUMNS, map(int, match.group(3).split())))
        lines = ptx.get(name)
        if lines is None or number > len(lines):
            rows.append(("?", "?", values))
            continue
        rows.append((f"{name}:{labels[name][number - 1]}", instruction_class(lines[number - 1]),
                     values))
    return rows


def issue_slots(log_text: str) -> dict[str, int]:
    """The scheduler's issue-slot counts (last ``Stall:...W32:...`` line of the log)."""
    lines = [line for line in log_text.splitlines() if line.startswith("Stall:")]
    if not lines:
        return {}
    fields = dict(re.findall(r"(\w+):(\d+)", lines[-1]))
    return {slot: int(fields.get(slot, 0)) for slot in ISSUE_SLOTS}


def profile(run: Path, blocks: int = 0) -> dict:
    """A run's instruction mix (warp instructions, latency per class), issue slots and
    hottest blocks, as a JSON-ready dict."""
    rows = line_statistics(run)
    mix: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    per_block: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for block, kind, values in rows:
        mix[kind][0] += values["count"]
        mix[kind][1] += values["latency"]
        per_block[block][kind] += values["count"]
    log = run / LOG_FILE
    total = sum(count for count, _ in mix.values())
    hottest = sorted(per_block.items(), key=lambda item: -sum(item[1].values()))[:blocks]
    return {
        "run": str(run),
        "warp_instructions": total / 32,
        "mix": {kind: {"warp_instructions": count / 32, "latency": latency}
                for kind, (count, latency) in sorted(mix.items(), key=lambda kv: -kv[1][0])},
        "issue_slots": issue_slots(log.read_text(errors="replace")) if log.is_file() else {},
        "blocks": [{"block": block, "warp_instructions": sum(kinds.values()) / 32,
                    "mix": {k: v / 32 for k, v in kinds.most_common(6)}}
                   for block, kinds in hottest],
    }


def _millions(value: float) -> str:
    return f"{value / 1e6:.2f}M"


def render(profiles: Sequence[dict]) -> str:
    """One table of the runs side by side: warp instructions per class, then issue slots."""
    names = [Path(p["run"]).name for p in profiles]
    kinds = list(dict.fromkeys(kind for p in profiles for kind in p["mix"]))
    width = max(12, *(len(name) for name in names))
    out = [f"{'warp instructions':18s}" + "".join(f" {name:>{width}s}" for name in names)]
    for kind in kinds:
        cells = [p["mix"].get(kind, {}).get("warp_instructions", 0) for p in profiles]
        out.append(f"{kind:18s}" + "".join(f" {_millions(c):>{width}s}" for c in cells))
    out.append(f"{'total':18s}" + "".join(f" {_millions(p['warp_instructions']):>{width}s}"
                                         for p in profiles))
    if any(p["issue_slots"] for p in profiles):
        out.append("")
        out.append(f"{'issue slots':18s}" + "".join(f" {name:>{width}s}" for name in names))
        for slot in ISSUE_SLOTS:
            cells = [p["issue_slots"].get(slot, 0) for p in profiles]
            out.append(f"{slot:18s}" + "".join(f" {_millions(c):>{width}s}" for c in cells))
    for p, name in zip(profiles, names):
        if p["blocks"]:
            out.append("")
            out.append(f"hottest blocks of {name}:")
            for block in p["blocks"]:
                mix = ", ".join(f"{k} {_millions(v)}" for k, v in block["mix"].items())
                out.append(f"  {block['block']:48s} {_millions(block['warp_instructions']):>8s}  {mix}")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of benchmarks.sim.run")
    parser.add_argument("--blocks", type=int, default=0, help="list the N hottest basic blocks")
    parser.add_argument("--json", type=Path, help="also write the profiles as JSON")
    args = parser.parse_args(argv)
    try:
        profiles = [profile(run, args.blocks) for run in args.runs]
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(profiles))
    if args.json:
        args.json.write_text(json.dumps(profiles, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
