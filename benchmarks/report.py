"""Summarise a pytest-benchmark JSON of this suite: tables, a markdown summary, a bar chart.

    python -m benchmarks.report RESULTS.json [--png OUT.png] [--markdown OUT.md]

Prints one table per benchmark family (the op, the modules, the training step), then why
cells are missing, grouped by contender and reason. Rows are cases (configuration ×
batch × mask × branch × dtype × pass), columns are contenders,
cells the median time in ms and the speed-up over the family's baseline (the reference),
"OOM" where the contender ran out of memory or its pre-check said it would, "n/a" where it
is unsupported, "–" where the case was not collected. ``--markdown`` writes the same
tables plus achieved TFLOP/s and peak memory, headed by the machine (GPU, torch, CUDA,
Triton, git commit); ``--png`` writes a grouped bar chart of the times (log scale).

Timed cases come from the JSON's ``benchmarks`` (``extra_info`` as ``benchmarks.harness``
fills it); cases that did not run come from its ``not_run`` list.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

FAMILY_TITLES = {
    "op": "masked_attention op (per branch)",
    "module": "attention module: DualSpatialAttention vs contextual attention",
    "training": "generator training step (forward + backward)",
}
ROW_FIELDS = ("config", "batch", "mask", "branch", "dtype", "pass")
STATUS_LABELS = {"OOM": "OOM", "unsupported": "n/a"}
MISSING = "–"


@dataclasses.dataclass(frozen=True)
class Result:
    """One contender on one case: timed (status "ok") or not run ("OOM", "unsupported")."""

    family: str
    contender: str
    baseline: str
    row: tuple  # values of ROW_FIELDS
    status: str
    sequence: int = 0  # order the suite ran the case in: rows and columns follow it
    seconds: Optional[float] = None  # median
    tflops: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    reason: str = ""


@dataclasses.dataclass
class Results:
    results: list[Result]
    machine_info: dict[str, Any]
    commit_info: dict[str, Any]
    datetime: str = ""


def _row(info: dict[str, Any]) -> tuple:
    return tuple(info.get(field) for field in ROW_FIELDS)


def load_results(path: str | Path) -> Results:
    """Parse a ``--benchmark-json`` file written by this suite."""
    with open(path) as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' key)")
    results = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "family" not in info:  # not a case of this suite
            continue
        results.append(Result(info["family"], info["contender"], info["baseline"], _row(info),
                              info.get("status", "ok"), info.get("sequence", 0),
                              bench["stats"]["median"], info.get("tflops"), info.get("peak_mem_bytes")))
    for info in data.get("not_run", []):
        results.append(Result(info["family"], info["contender"], info["baseline"], _row(info),
                              info["status"], info.get("sequence", 0), reason=info.get("reason", "")))
    results.sort(key=lambda result: result.sequence)
    return Results(results, data.get("machine_info", {}), data.get("commit_info", {}),
                   data.get("datetime", ""))


# ----------------------------------------------------------------------------- tables
@dataclasses.dataclass
class Table:
    """Cells of one family: ``cells[row][contender]`` → Result."""

    family: str
    baseline: str
    rows: list[tuple]
    contenders: list[str]
    cells: dict[tuple, dict[str, Result]]

    @property
    def shown_rows(self) -> list[tuple]:
        """Rows where some contender ran or ran out of memory (all-"n/a" rows say nothing)."""
        return [row for row in self.rows
                if any(result.status != "unsupported" for result in self.cells[row].values())]

    @property
    def idle_contenders(self) -> list[str]:
        """Contenders that ran nowhere in this table ("n/a" in every row)."""
        return [c for c in self.contenders
                if all(self.cells[row].get(c) is None or self.cells[row][c].status == "unsupported"
                       for row in self.rows)]

    def baseline_seconds(self, row: tuple) -> Optional[float]:
        result = self.cells[row].get(self.baseline)
        return result.seconds if result is not None and result.status == "ok" else None


def build_tables(results: Iterable[Result]) -> list[Table]:
    """One table per family, rows and columns in the order the suite ran them, baseline first."""
    tables: dict[str, Table] = {}
    for result in results:
        table = tables.setdefault(result.family, Table(result.family, result.baseline, [], [], {}))
        if result.row not in table.cells:
            table.rows.append(result.row)
            table.cells[result.row] = {}
        if result.contender not in table.contenders:
            table.contenders.append(result.contender)
        table.cells[result.row][result.contender] = result
    for table in tables.values():
        if table.baseline in table.contenders:
            table.contenders.remove(table.baseline)
            table.contenders.insert(0, table.baseline)
    order = list(FAMILY_TITLES)
    return sorted(tables.values(), key=lambda t: order.index(t.family) if t.family in order else len(order))


def format_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms:.0f} ms"


def _not_timed_label(result: Optional[Result]) -> Optional[str]:
    """The cell text of a case that has no timing ("n/a", "OOM", …), or None when it has one."""
    if result is None:
        return MISSING
    if result.status != "ok":
        return STATUS_LABELS.get(result.status, result.status)
    return None


def time_cell(table: Table, row: tuple, contender: str) -> str:
    """"1.23 ms (4.5×)", the time alone for the baseline, or the status label."""
    result = table.cells[row].get(contender)
    label = _not_timed_label(result)
    if label is not None:
        return label
    text = format_ms(result.seconds)
    baseline = table.baseline_seconds(row)
    if contender != table.baseline and baseline is not None:
        text += f" ({baseline / result.seconds:.2g}×)" if baseline / result.seconds < 10 else \
            f" ({baseline / result.seconds:.0f}×)"
    return text


def _value_cell(getter: Callable[[Result], Optional[float]], fmt: str):
    def cell(table: Table, row: tuple, contender: str) -> str:
        result = table.cells[row].get(contender)
        label = _not_timed_label(result)
        if label is not None:
            return label
        value = getter(result)
        return MISSING if value is None else fmt.format(value)
    return cell


tflops_cell = _value_cell(lambda r: r.tflops, "{:.3g}")
memory_cell = _value_cell(
    lambda r: None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2 ** 30, "{:.3g}")


def row_label(row: tuple) -> list[str]:
    config, batch, mask, branch, dtype, pass_ = row
    return [str(config), f"b{batch}", str(mask), str(branch), str(dtype), str(pass_)]


def _grid(table: Table, cell, contenders: Optional[list[str]] = None) -> tuple[list[str], list[list[str]]]:
    contenders = table.contenders if contenders is None else contenders
    header = ["config", "batch", "mask", "branch", "dtype", "pass", *contenders]
    body = [row_label(row) + [cell(table, row, c) for c in contenders] for row in table.shown_rows]
    return header, body


def _omitted_note(table: Table) -> str:
    omitted = len(table.rows) - len(table.shown_rows)
    return f"({omitted} cases where every contender is n/a are not shown)" if omitted else ""


def format_text(table: Table, cell=time_cell, *, drop_idle: bool = False) -> str:
    """The table as aligned text; ``drop_idle`` leaves out the columns of contenders that
    ran nowhere (named in a note below the table) to keep the screen narrow."""
    idle = table.idle_contenders if drop_idle else []
    header, body = _grid(table, cell, [c for c in table.contenders if c not in idle])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if _omitted_note(table):
        lines.append(_omitted_note(table))
    if idle:
        lines.append(f"(n/a in every case, not shown: {', '.join(idle)})")
    return "\n".join(lines)


def format_markdown_table(table: Table, cell=time_cell) -> str:
    header, body = _grid(table, cell)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def _has(table: Table, getter: Callable[[Result], Any]) -> bool:
    return any(getter(r) is not None for cells in table.cells.values() for r in cells.values())


def machine_lines(results: Results) -> list[str]:
    machine, commit = results.machine_info, results.commit_info
    dirty = " (uncommitted changes)" if commit.get("dirty") else ""
    lines = [
        f"- date: {results.datetime or 'unknown'}",
        f"- device: {machine.get('gpu') or machine.get('benchmark_device') or 'unknown'}",
        f"- torch {machine.get('torch', '?')}, CUDA {machine.get('cuda', '?')}, "
        f"Triton {machine.get('triton', '?')}, "
        f"Python {machine.get('python', machine.get('python_version', '?'))}",
        f"- dsa_ops backends: {', '.join(machine.get('dsa_ops_backends', [])) or 'unknown'}",
        f"- git commit: {commit.get('id', 'unknown')}{dirty}",
    ]
    cpu = machine.get("cpu", {})
    if isinstance(cpu, dict) and cpu.get("brand_raw"):
        lines.insert(2, f"- host CPU: {cpu['brand_raw']}")
    return lines


def not_run_lines(results: Results) -> list[str]:
    """One line per contender and kind of reason (numbers aside): how many cases, and why."""
    groups: dict[tuple, list[str]] = {}
    for result in results.results:
        if result.status != "ok":
            template = re.sub(r"\d+(\.\d+)?", "#", result.reason)
            groups.setdefault((result.family, result.contender, result.status, template), []).append(
                result.reason)
    lines = []
    for (family, contender, status, _), reasons in groups.items():
        cases = f"{len(reasons)} case{'s' if len(reasons) > 1 else ''}"
        example = ", e.g." if len(set(reasons)) > 1 else ""
        lines.append(f"- `{contender}` ({family}), {STATUS_LABELS.get(status, status)} in {cases}"
                     f"{example}: {reasons[0]}")
    return lines


def not_run_summary(results: Results) -> list[str]:
    """Why cells are missing, for the screen: one line per status and kind of reason
    (numbers aside), naming the contenders and families it applies to."""
    groups: dict[tuple, list[Result]] = {}
    for result in results.results:
        if result.status != "ok":
            template = re.sub(r"\d+(\.\d+)?", "#", result.reason)
            # "dsa_ops backend 'cuda': <why>" and the like: the contender is named anyway.
            template = re.sub(r"^dsa_ops backend '[^']*': ", "", template)
            groups.setdefault((result.status, template), []).append(result)
    lines = []
    for (status, _), members in groups.items():
        by_family: dict[str, dict[str, None]] = {}
        for r in members:
            by_family.setdefault(r.family, {})[r.contender] = None
        names = "; ".join(f"{family}: {', '.join(contenders)}" for family, contenders in by_family.items())
        cases = f"{len(members)} case{'s' if len(members) > 1 else ''}"
        lines.append(f"- {STATUS_LABELS.get(status, status)} in {cases}: {names}\n    {members[0].reason}")
    return lines


def format_markdown(results: Results) -> str:
    parts = ["# Benchmark results", "", *machine_lines(results), "",
             "Cells: median time, speed-up over the family's baseline in brackets; "
             "OOM = out of memory (or the dense-memory pre-check), n/a = unsupported.", ""]
    for table in build_tables(results.results):
        parts += [f"## {FAMILY_TITLES.get(table.family, table.family)}", "",
                  f"Baseline: `{table.baseline}`. {_omitted_note(table)}".rstrip(), "",
                  format_markdown_table(table), ""]
        if _has(table, lambda r: r.tflops):
            parts += ["Achieved TFLOP/s (useful FLOPs):", "", format_markdown_table(table, tflops_cell), ""]
        if _has(table, lambda r: r.peak_mem_bytes):
            parts += ["Peak memory (GiB):", "", format_markdown_table(table, memory_cell), ""]
    reasons = not_run_lines(results)
    if reasons:
        parts += ["## Cases that did not run", "", *reasons, ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- chart
def plot(results: Results, path: str | Path) -> None:
    """Grouped bars of the median time per case (log scale), one panel per family × dtype × pass.

    Cases that did not run show their label ("OOM", "n/a") where the bar would be; panels
    where nothing ran are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = []
    for table in build_tables(results.results):
        for key in dict.fromkeys((row[4], row[5]) for row in table.shown_rows):  # (dtype, pass)
            rows = [row for row in table.shown_rows if (row[4], row[5]) == key]
            if any(result.status == "ok" for row in rows for result in table.cells[row].values()):
                title = f"{FAMILY_TITLES.get(table.family, table.family)} — {key[0]}, {key[1]}"
                panels.append((table, title, rows))
    if not panels:
        raise ValueError("no timed benchmark case to plot")

    widest = max(len(rows) * (len(table.contenders) + 1) for table, _, rows in panels)
    figure, axes = plt.subplots(len(panels), 1, squeeze=False,
                                figsize=(min(max(8.0, 0.13 * widest), 40.0), 3.8 * len(panels)))
    colours = plt.get_cmap("tab10")
    for axis, (table, title, rows) in zip(axes[:, 0], panels):
        width = 0.8 / len(table.contenders)
        times = [r.seconds for row in rows for r in table.cells[row].values() if r.status == "ok"]
        floor = min(times) * 1e3 / 4
        for index, contender in enumerate(table.contenders):
            for position, row in enumerate(rows):
                x = position - 0.4 + width * (index + 0.5)
                result = table.cells[row].get(contender)
                if result is None:
                    continue
                if result.status == "ok":
                    axis.bar(x, result.seconds * 1e3, width, color=colours(index % 10))
                else:
                    axis.text(x, floor * 1.1, STATUS_LABELS.get(result.status, result.status),
                              rotation=90, ha="center", va="bottom", fontsize=6, color=colours(index % 10))
        axis.set_yscale("log")
        axis.set_ylim(bottom=floor, top=max(times) * 1e3 * 3)
        axis.set_xlim(-0.5, len(rows) - 0.5)
        axis.set_ylabel("median time (ms)")
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels([" ".join(row_label(row)[:4]) for row in rows], rotation=25, ha="right",
                             fontsize=7)
        axis.grid(axis="y", which="both", alpha=0.3)
        handles = [Patch(color=colours(index % 10), label=contender)
                   for index, contender in enumerate(table.contenders)]
        axis.legend(handles=handles, fontsize=7, ncol=min(len(handles), 6), loc="upper left")
    device = results.machine_info.get("gpu") or results.machine_info.get("benchmark_device") or ""
    figure.suptitle(f"dsa_ops benchmarks — {device}" if device else "dsa_ops benchmarks", fontsize=12)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))  # room for the title
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="JSON written by pytest --benchmark-json")
    parser.add_argument("--png", type=Path, help="write a bar chart of the times here")
    parser.add_argument("--markdown", type=Path, help="write a markdown summary here")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results} does not exist")
    results = load_results(args.results)
    tables = build_tables(results.results)
    if not tables:
        parser.error(f"{args.results} holds no case of this suite (was it run with --benchmark-disable?)")
    device = results.machine_info.get("gpu") or results.machine_info.get("benchmark_device")
    print(f"\nmedian times, speed-up over the baseline in brackets"
          f"{f' ({device})' if device else ''}; OOM = out of memory, n/a = unsupported")
    for table in tables:
        print(f"\n{FAMILY_TITLES.get(table.family, table.family)} — speed-up over {table.baseline}\n")
        print(format_text(table, drop_idle=True))
    reasons = not_run_summary(results)
    if reasons:
        print("\ncases that did not run, grouped by reason:")
        print("\n".join(reasons))
    if args.markdown:
        args.markdown.write_text(format_markdown(results))
        print(f"\nwrote {args.markdown}")
    if args.png:
        try:
            plot(results, args.png)
        except ValueError as error:  # nothing timed: the tables above say why
            print(f"no chart: {error}")
            return 1
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
