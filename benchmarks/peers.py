"""The CPU against the peers' attention: DSA vs the public DeepFill v1 port and PEN-Net-style
dense attention, the op against the machine's matmul rate, at 1, 2 and all threads (issue 28).

    DSA_BENCH_DEEPFILL_PORT=/path/to/generative-inpainting-pytorch \\
    DSA_BENCH_PENNET_PORT=/path/to/PEN-Net-for-Inpainting \\
        python -m benchmarks.peers [--threads 1,2,all] [--rounds 5]

Every contender of a case is timed interleaved with the others, round after round, in one
process (medians), so a shared machine's load falls on all of them alike; read the
ratios, not the milliseconds. float32, centre hole (the 128² centre of a 256² image).

Cases and the goals they check (``GOALS``):

- ``module 64x64x128 b2``, forward and forward+backward: ``DualSpatialAttention(128)``
  (cpu backend) against the public DeepFill v1 port's ``ContextualAttention`` with its
  defaults (3×3 patches, rate 2, fuse 3, softmax scale 10, fuse=True; called as DeepFill
  calls it, ``(x, x, mask)``, its flow included) and against ``oracleface``'s contextual
  attention (the main benchmark's ``ca``), and ``DeepFillV1ContextualAttention`` (the
  one-line swap, its flow included). The port is imported from the checkout named
  by ``DSA_BENCH_DEEPFILL_PORT`` (never vendored); unset, its cells say so.
- ``op layer 14 b2``: both branches of the dual op on the module's shapes (Dqk 16,
  Dv 128) against ``torch.mm`` on 2048² matrices: the op's useful FLOPs
  ``2·Nq·Nk·(Dqk+Dv)`` per second as a share of the matmul rate.
- ``module outside the op``: the module's forward against its dual op alone on the same
  q/k/v: the share of the module's time spent outside the op (projections, fusion, mask
  pooling, gathers and scatters).
- ``op 16x16x512 b16`` and ``op 8x8x512 b16`` (the paper's layer 12 and PEN-Net's deepest
  attention map), forward and forward+backward, both branches: the cpu backend against
  the dense reference and ``pennet-dense``, PEN-Net's attention written densely (all
  L×L scores, hole keys zeroed by multiplication before and after the softmax, P·V for
  every pixel, as ``AtnConv`` with 1×1 patches; timing only, its masking differs).
- ``pennet at_conv05`` / ``at_conv04`` (batch 16), forward and forward+backward,
  informational: ``PENNetAtnConv`` (the one-line swap) against PEN-Net's own ``AtnConv``
  at its two deepest levels, imported from the checkout named by ``DSA_BENCH_PENNET_PORT``
  (its imports need torchvision; unset, its cells say so).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

import dsa_ops
from benchmarks.cases import DATA_SEED, CONFIGS, LayerConfig, foreground, hole_masks

Tensor = torch.Tensor

DEEPFILL_PORT_VARIABLE = "DSA_BENCH_DEEPFILL_PORT"
DEEPFILL_PORT_MISSING = (f"n/a: set {DEEPFILL_PORT_VARIABLE} to a checkout of "
                         "daa233/generative-inpainting-pytorch")
PENNET_PORT_VARIABLE = "DSA_BENCH_PENNET_PORT"
PENNET_PORT_MISSING = (f"n/a: set {PENNET_PORT_VARIABLE} to a checkout of "
                       "researchmm/PEN-Net-for-Inpainting")
MATMUL_SIZE = 2048
LAYER_14 = next(config for config in CONFIGS if config.paper_layer == 14)
SMALL_MAPS = (LayerConfig(16, 16, 512, gpu_batch=16, cpu_batch=16, paper_layer=12),
              LayerConfig(8, 8, 512, gpu_batch=16, cpu_batch=16))
MODULE_BATCH = 2


class NotAvailable(Exception):
    """A contender that cannot run here; its message fills the table cell."""


@dataclasses.dataclass
class Contender:
    name: str
    build: Callable[[], Callable[[], object]]  # returns the timed call; may raise NotAvailable


@dataclasses.dataclass
class Case:
    """Contenders timed side by side; ``baseline`` is the one the others are compared with."""

    name: str
    contenders: list[Contender]
    baseline: str


@dataclasses.dataclass(frozen=True)
class Goal:
    """``value(times) ≥ target`` (``>`` when ``strictly``; ``≤`` with ``at_most``) at every
    thread count."""

    text: str
    case: str
    measure: Callable[[dict[str, float]], float]
    target: float
    at_most: bool = False
    unit: str = "×"
    strictly: bool = False

    def holds(self, value: float) -> bool:
        if self.at_most:
            return value <= self.target
        return value > self.target if self.strictly else value >= self.target


# ----------------------------------------------------------------------------- contenders
def _load_peer_class(variable: str, missing: str, module: str, name: str, repository: str):
    """Class ``name`` of ``module`` (e.g. ``model.networks``) from the checkout ``$variable``."""
    checkout = os.environ.get(variable)
    if not checkout:
        raise NotAvailable(missing)
    path = os.path.join(*module.split(".")) + ".py"
    if not os.path.isfile(os.path.join(checkout, path)):
        raise NotAvailable(f"n/a: {variable}={checkout} has no {path} (expected a checkout of "
                           f"{repository})")
    # Loaded from its file under a private name: both peers call their package ``model``.
    spec = importlib.util.spec_from_file_location(f"_peer_{module.replace('.', '_')}",
                                                  os.path.join(checkout, path))
    sys.path.insert(0, checkout)  # for the peer's own imports (utils.tools, core.spectral_norm)
    try:
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return getattr(loaded, name)
    except Exception as error:  # noqa: BLE001 — third-party code: report, don't crash
        raise NotAvailable(f"n/a: importing {repository} failed: "
                           f"{type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(checkout)


def load_deepfill_port():
    """The port's ``ContextualAttention`` class from ``$DSA_BENCH_DEEPFILL_PORT``."""
    return _load_peer_class(DEEPFILL_PORT_VARIABLE, DEEPFILL_PORT_MISSING, "model.networks",
                            "ContextualAttention", "daa233/generative-inpainting-pytorch")


def load_pennet():
    """PEN-Net's ``AtnConv`` class from ``$DSA_BENCH_PENNET_PORT``."""
    return _load_peer_class(PENNET_PORT_VARIABLE, PENNET_PORT_MISSING, "model.pennet", "AtnConv",
                            "researchmm/PEN-Net-for-Inpainting")


def _module_inputs(config: LayerConfig, batch: int, backward: bool):
    generator = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(batch, config.channels, config.height, config.width, generator=generator)
    grad_y = torch.randn(x.shape, generator=generator) if backward else None
    return x.requires_grad_(backward), hole_masks("centre", batch, torch.device("cpu")), grad_y


def _timed_module(module: torch.nn.Module, call: Callable, x: Tensor, grad_y: Optional[Tensor]):
    inputs = [x, *(p for p in module.parameters() if p.requires_grad)]

    def run():
        with torch.set_grad_enabled(grad_y is not None):
            y = call()
            y = y[0] if isinstance(y, tuple) else y  # the port returns (y, flow)
        if grad_y is not None:
            torch.autograd.grad(y, inputs, grad_y)
        return y

    return run


def module_contenders(config: LayerConfig, batch: int, backward: bool) -> list[Contender]:
    def dsa():
        x, holes, grad_y = _module_inputs(config, batch, backward)
        torch.manual_seed(DATA_SEED)
        module = dsa_ops.DualSpatialAttention(config.channels, backend="cpu")
        return _timed_module(module, lambda: module(x, holes), x, grad_y)

    def port():
        port_class = load_deepfill_port()
        x, holes, grad_y = _module_inputs(config, batch, backward)
        module = port_class(ksize=3, stride=1, rate=2, fuse_k=3, softmax_scale=10, fuse=True)
        return _timed_module(module, lambda: module(x, x, holes), x, grad_y)

    def adapter():
        from dsa_ops.adapters import DeepFillV1ContextualAttention

        x, holes, grad_y = _module_inputs(config, batch, backward)
        torch.manual_seed(DATA_SEED)
        module = DeepFillV1ContextualAttention(config.channels, ksize=3, stride=1, rate=2, fuse_k=3,
                                               softmax_scale=10, fuse=True, backend="cpu")
        return _timed_module(module, lambda: module(x, x, holes), x, grad_y)

    def oracleface_ca():
        from oracleface.models.contextual_attention import ContextualAttention

        x, holes, grad_y = _module_inputs(config, batch, backward)
        module = ContextualAttention(config.channels)
        return _timed_module(module, lambda: module(x, holes), x, grad_y)

    return [Contender("dsa[cpu]", dsa), Contender("deepfill-port", port),
            Contender("dsa adapter (DeepFill v1, flow)", adapter),
            Contender("oracleface-ca", oracleface_ca)]


# PEN-Net's two deepest attention levels at a 256² image (cnum 32): (x1, x2) maps and the
# AtnConv arguments of InpaintGenerator.__init__ (at_conv05 matches 1×1 patches, unfused).
PENNET_LEVELS = {
    "at_conv05": ((512, 8, 8), (512, 4, 4), dict(ksize=1, fuse=False)),
    "at_conv04": ((256, 16, 16), (512, 8, 8), dict()),
}


def pennet_level_contenders(level: str, batch: int, backward: bool) -> list[Contender]:
    """``PENNetAtnConv`` (the one-line swap, cpu backend) against PEN-Net's own ``AtnConv``,
    called as PEN-Net calls it: ``(x1, x2, mask)`` with the image-resolution mask."""
    (channels, height, width), (guide_channels, guide_height, guide_width), options = PENNET_LEVELS[level]

    def inputs():
        generator = torch.Generator().manual_seed(DATA_SEED)
        x1 = torch.randn(batch, channels, height, width, generator=generator)
        x2 = torch.randn(batch, guide_channels, guide_height, guide_width, generator=generator)
        grad_y = torch.randn(x1.shape, generator=generator) if backward else None
        return x1.requires_grad_(backward), x2, hole_masks("centre", batch, torch.device("cpu")), grad_y

    def dsa():
        from dsa_ops.adapters import PENNetAtnConv

        x1, x2, holes, grad_y = inputs()
        torch.manual_seed(DATA_SEED)
        module = PENNetAtnConv(channels, channels, guide_channels=guide_channels, backend="cpu",
                               **options)
        return _timed_module(module, lambda: module(x1, x2, holes), x1, grad_y)

    def port():
        atn_conv = load_pennet()
        x1, x2, holes, grad_y = inputs()
        torch.manual_seed(DATA_SEED)
        module = atn_conv(channels, channels, **options)
        return _timed_module(module, lambda: module(x1, x2, holes), x1, grad_y)

    return [Contender("dsa adapter (PENNetAtnConv)", dsa), Contender("pennet AtnConv", port)]


def _op_inputs(config: LayerConfig, batch: int, backward: bool):
    """q, k, v of both branches (one draw, as the module's one projection), the foreground."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    widths = [config.qk_dim, config.qk_dim, config.v_dim] * 2
    qkv = [torch.randn(batch, config.length, width, generator=generator).requires_grad_(backward)
           for width in widths]
    fg = foreground(config, hole_masks("centre", batch, torch.device("cpu")))
    grads = [torch.randn(batch, config.length, config.v_dim, generator=generator)
             for _ in range(2)] if backward else None
    return qkv, fg, grads


def pennet_dense_attention(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
                           scale: float) -> Tensor:
    """PEN-Net's ``AtnConv`` attention core, dense (1×1 patches): scores of every pixel pair,
    hole keys zeroed by multiplication before and after the softmax, P·V for every pixel
    ``(B, L, D)`` → ``(B, L, Dv)``; rows outside ``query_mask`` zeroed at the end."""
    keys = key_mask.to(q.dtype)[:, None, :]
    scores = torch.bmm(q, k.transpose(1, 2)) * keys
    probs = torch.softmax(scores * scale, dim=2) * keys
    return torch.bmm(probs, v) * query_mask.to(v.dtype)[:, :, None]


def op_contenders(config: LayerConfig, batch: int, backward: bool, names: Sequence[str]
                  ) -> list[Contender]:
    scale = config.qk_dim ** -0.5

    def timed(both_branches: Callable) -> Callable[[], Callable[[], object]]:
        def build():
            qkv, fg, grads = _op_inputs(config, batch, backward)

            def run():
                with torch.set_grad_enabled(backward):
                    outs = both_branches(qkv, fg)
                if backward:
                    torch.autograd.grad(outs, qkv, grads)
                return outs

            return run
        return build

    def backend(name: str):
        return timed(lambda qkv, fg: dsa_ops.dual_masked_attention(*qkv, fg, scale=scale,
                                                                   backend=name))

    def pennet(qkv, fg):
        return (pennet_dense_attention(*qkv[:3], fg, ~fg, scale),
                pennet_dense_attention(*qkv[3:], fg, fg, scale))

    builders = {"dsa_ops[cpu]": backend("cpu"), "reference": backend("reference"),
                "pennet-dense": timed(pennet)}
    return [Contender(name, builders[name]) for name in names]


def matmul_contender(size: int = MATMUL_SIZE) -> Contender:
    def build():
        generator = torch.Generator().manual_seed(DATA_SEED)
        a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
        return lambda: torch.mm(a, b)
    return Contender(f"torch.mm {size}²", build)


def op_flops(config: LayerConfig, batch: int) -> int:
    """Useful forward FLOPs of both branches: ``2·Nq·Nk·(Dqk+Dv)`` summed over samples."""
    fg = foreground(config, hole_masks("centre", batch, torch.device("cpu")))
    queries = fg.sum(1, dtype=torch.int64)
    pairs = int((queries * (config.length - queries) + queries * queries).sum())
    return 2 * pairs * (config.qk_dim + config.v_dim)


def module_op_contenders(config: LayerConfig, batch: int) -> list[Contender]:
    """The module's forward and its dual op alone on the module's own projections."""
    def module_call():
        x, holes, _ = _module_inputs(config, batch, False)
        torch.manual_seed(DATA_SEED)
        module = dsa_ops.DualSpatialAttention(config.channels, backend="cpu")
        return torch.no_grad()(lambda: module(x, holes))

    def op_call():
        x, holes, _ = _module_inputs(config, batch, False)
        torch.manual_seed(DATA_SEED)
        module = dsa_ops.DualSpatialAttention(config.channels, backend="cpu")
        with torch.no_grad():
            fg, _ = module.queries_keys(x, holes)
            cross, self_ = module._op_inputs(x, None)  # what the module's call hands the op
        return lambda: dsa_ops.dual_masked_attention(*cross, *self_, fg, scale=module.scale,
                                                     backend="cpu")

    return [Contender("module", module_call), Contender("its dual op", op_call)]


# ----------------------------------------------------------------------------- the matrix
def default_cases() -> tuple[list[Case], list[Goal]]:
    module = f"module {LAYER_14.name} b{MODULE_BATCH}"
    op14 = f"op {LAYER_14.name} b{MODULE_BATCH} fwd"
    flops14 = op_flops(LAYER_14, MODULE_BATCH)
    cases = [
        Case(f"{module} fwd", module_contenders(LAYER_14, MODULE_BATCH, False), "dsa[cpu]"),
        Case(f"{module} fwd+bwd", module_contenders(LAYER_14, MODULE_BATCH, True), "dsa[cpu]"),
        Case(op14, op_contenders(LAYER_14, MODULE_BATCH, False, ["dsa_ops[cpu]"])
             + [matmul_contender()], "dsa_ops[cpu]"),
        Case(f"{module} fwd, outside the op", module_op_contenders(LAYER_14, MODULE_BATCH), "module"),
    ]
    goals = [
        Goal("DSA module ≥ 5× faster than the DeepFill port, forward", f"{module} fwd",
             lambda t: t["deepfill-port"] / t["dsa[cpu]"], 5.0),
        Goal("DSA module ≥ 3× faster than the DeepFill port, forward+backward", f"{module} fwd+bwd",
             lambda t: t["deepfill-port"] / t["dsa[cpu]"], 3.0),
    ]
    # The main benchmark's contextual-attention contender must not flatter DSA: at most
    # 1.25× slower than the port (port time / its time ≥ 0.8). Faster only understates DSA's
    # lead, so there is no upper bound.
    goals += [
        Goal(f"oracleface-ca (the benchmark's ca) at most 1.25× slower than the port, {pass_}",
             f"{module} {pass_}", lambda t: t["deepfill-port"] / t["oracleface-ca"], 0.8)
        for pass_ in ("fwd", "fwd+bwd")
    ]
    goals += [
        Goal("op at layer 14 ≥ 70 % of torch.mm's FLOP rate", op14,
             lambda t: (flops14 / t["dsa_ops[cpu]"]) / (2 * MATMUL_SIZE ** 3 / t[f"torch.mm {MATMUL_SIZE}²"]),
             0.70, unit="%"),
        Goal("module time outside the op ≤ 30 %", f"{module} fwd, outside the op",
             lambda t: 1 - t["its dual op"] / t["module"], 0.30, at_most=True, unit="%"),
    ]
    for config in SMALL_MAPS:
        for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
            name = f"op {config.name} b{config.cpu_batch} {pass_}"
            cases.append(Case(name, op_contenders(config, config.cpu_batch, backward,
                                                  ["dsa_ops[cpu]", "reference", "pennet-dense"]),
                              "dsa_ops[cpu]"))
            goals.append(Goal(f"cpu backend faster than the reference and pennet-dense, {name}", name,
                              lambda t: min(t["reference"], t["pennet-dense"]) / t["dsa_ops[cpu]"],
                              1.0, strictly=True))
    for level in PENNET_LEVELS:  # informational: the module swap on PEN-Net's small maps
        for pass_, backward in (("fwd", False), ("fwd+bwd", True)):
            cases.append(Case(f"pennet {level} b{SMALL_MAPS[0].cpu_batch} {pass_}",
                              pennet_level_contenders(level, SMALL_MAPS[0].cpu_batch, backward),
                              "dsa adapter (PENNetAtnConv)"))
    return cases, goals


# ----------------------------------------------------------------------------- timing
def time_case(case: Case, rounds: int) -> dict[str, float | str]:
    """Median seconds per contender (or the reason it did not run), rounds interleaved."""
    calls: dict[str, Callable[[], object]] = {}
    results: dict[str, float | str] = {}
    for contender in case.contenders:
        try:
            calls[contender.name] = contender.build()
            calls[contender.name]()  # warm-up, untimed
        except NotAvailable as error:
            results[contender.name] = str(error)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    results.update({name: statistics.median(times) for name, times in samples.items()})
    return {contender.name: results[contender.name] for contender in case.contenders}


def thread_counts(spec: str) -> list[int]:
    """``"1,2,all"`` → distinct thread counts in order (``all`` = the machine's cores)."""
    counts: list[int] = []
    for part in spec.split(","):
        count = (os.cpu_count() or 1) if part.strip() == "all" else int(part)
        if count < 1:
            raise ValueError(f"--threads: thread counts must be positive; got {part!r}")
        if count not in counts:
            counts.append(count)
    return counts


def run(cases: Sequence[Case], goals: Sequence[Goal], threads: Sequence[int], rounds: int,
        out=sys.stdout) -> dict:
    """Time every case at every thread count; print the comparison table and the goals."""
    before = torch.get_num_threads()
    timings: dict[int, dict[str, dict[str, float | str]]] = {}
    try:
        for count in threads:
            torch.set_num_threads(count)
            timings[count] = {case.name: time_case(case, rounds) for case in cases}
    finally:
        torch.set_num_threads(before)
    print(render(cases, goals, threads, timings), file=out)
    return timings


def _cell(seconds: float | str, baseline: float | str) -> str:
    if isinstance(seconds, str):
        return seconds
    ratio = "" if isinstance(baseline, str) else f" ({seconds / baseline:.2f}×)"
    return f"{seconds * 1e3:.1f} ms{ratio}"


def render(cases: Sequence[Case], goals: Sequence[Goal], threads: Sequence[int],
           timings: dict[int, dict[str, dict[str, float | str]]]) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [f"CPU, float32, median of interleaved rounds; load average {load}; "
             f"(×) = time / the case's first contender", "",
             "| case | contender | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in threads) + " |",
             "|---|---|" + "---|" * len(threads)]
    for case in cases:
        for contender in case.contenders:
            cells = [_cell(timings[n][case.name][contender.name], timings[n][case.name][case.baseline])
                     for n in threads]
            lines.append(f"| {case.name} | {contender.name} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | " + " | ".join(f"{n} thr." for n in threads) + " |",
              "|---|" + "---|" * len(threads)]
    for goal in goals:
        cells = []
        for n in threads:
            try:
                value = goal.measure(timings[n][goal.case])
            except TypeError:  # a contender did not run: its cell holds the reason
                cells.append("n/a")
                continue
            shown = f"{value:.0%}" if goal.unit == "%" else f"{value:.3g}×"
            cells.append(f"{shown} {'met' if goal.holds(value) else 'NOT met'}")
        lines.append(f"| {goal.text} | " + " | ".join(cells) + " |")
    lines += ["", "thread scaling (slower with more threads marked ▲):"]
    for case in cases:
        for contender in case.contenders:
            series = [timings[n][case.name][contender.name] for n in threads]
            if any(isinstance(s, str) for s in series):
                continue
            marks = ["▲" if later > earlier else "" for earlier, later in zip(series, series[1:])]
            if any(marks):
                lines.append(f"  {case.name} / {contender.name}: " + " → ".join(
                    f"{s * 1e3:.1f}" for s in series) + " ms")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2,all",
                        help="thread counts, comma-separated; 'all' = every core (default 1,2,all)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    args = parser.parse_args(argv)
    try:
        threads = thread_counts(args.threads)
    except ValueError as error:
        parser.error(str(error))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    cases, goals = default_cases()
    run(cases, goals, threads, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
