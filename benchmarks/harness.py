"""How one benchmark case is measured and recorded.

``measure`` builds the contender's callable, runs it once untimed (compilation, autotuning,
the correctness check), then times it with pytest-benchmark's pedantic mode: rounds are
sized from the warm-up time so that cheap GPU kernels get many rounds. On the CPU, maps
larger than 32×32 (and the generator) get one timed call instead, as in the
``--benchmark-disable`` smoke run. Every callable synchronises CUDA before it returns, so a round is the
kernel time, not the launch time. Peak memory is ``torch.cuda.max_memory_allocated`` over
the timed rounds (reset before them).

What lands in ``benchmark.extra_info`` (and so in ``--benchmark-json``): family, contender,
baseline, config, batch, mask, branch, dtype, pass, device, flops, status ("ok"),
peak_mem_bytes, median_s, tflops (useful TFLOP/s at the median time) and max_abs_err (against the
reference on the first sample) where it applies.

A case that cannot run — ``Unsupported``, ``WouldRunOutOfMemory`` (the dense-memory
pre-check), a real ``torch.cuda.OutOfMemoryError`` — is appended to ``NOT_RUN`` with status
"unsupported" or "OOM" and the reason, and the test is skipped with that reason. pytest-
benchmark keeps no entry for skipped tests, so ``conftest.py`` writes ``NOT_RUN`` into the
JSON under ``"not_run"`` for ``benchmarks.report``.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from typing import Any, Callable, Optional

import pytest
import torch

from benchmarks.cases import DEVICE, LayerConfig, excluded_on_this_device
from benchmarks.contenders import Timed, Unsupported, WouldRunOutOfMemory

NOT_RUN: list[dict[str, Any]] = []
_sequence = itertools.count()

# Rounds are sized so that the timed rounds of a case take about this long. On the GPU 0.3 s
# is still at least 5 rounds even for the slowest dense contenders and up to 200 for the
# fused kernels: enough for a stable median, and the headline run fits one borrowed GPU call.
TARGET_SECONDS = {"cuda": 0.3, "cpu": 0.3}
ROUNDS = {"cuda": (5, 200), "cpu": (1, 10)}  # (min, max)
WARMUP_ROUNDS = {"cuda": 2, "cpu": 0}  # besides the first, untimed call
# On the CPU, larger maps get a single timed call: one call of the 64×64 layer takes about a
# second on 2 cores, and the CPU run (indicative numbers only; the GPU run is the
# measurement) has to stay within a few minutes.
CPU_REPEAT_MAX_LENGTH = 32 * 32
# Max |out − reference| on the first sample; bfloat16 keeps 8 mantissa bits.
CHECK_TOLERANCE = {"fp32": 2e-3, "bf16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One cell of the results table: which contender, on what, doing which pass."""

    family: str  # "op", "module" or "training"
    contender: str
    baseline: str  # the contender of this family that speed-ups are relative to
    config: str
    batch: int
    mask: str
    branch: str  # "cross", "self", or "both" for the modules
    dtype: str
    pass_: str
    flops: Optional[int] = None
    paper_layer: Optional[int] = None
    length: Optional[int] = None  # pixels of the feature map, L

    @classmethod
    def of(cls, family: str, contender: str, baseline: str, config: LayerConfig, mask: str,
           branch: str, dtype: str, pass_: str, flops: Optional[int] = None) -> "Case":
        return cls(family, contender, baseline, config.name, config.batch, mask, branch, dtype,
                   pass_, flops, config.paper_layer, config.length)

    @property
    def group(self) -> str:
        """pytest-benchmark group: the contenders of one case side by side."""
        return (f"{self.family} {self.config} b{self.batch} {self.mask} {self.branch} "
                f"{self.dtype} {self.pass_}")

    def info(self) -> dict[str, Any]:
        info = dataclasses.asdict(self)
        info["pass"] = info.pop("pass_")
        info["device"] = str(DEVICE)
        return info


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _release_memory(collect: bool = False) -> None:
    """Hand cached CUDA blocks back, so the next case's memory pre-check sees them as free."""
    if collect:  # only after a failure: a full collection costs ~0.2 s per case
        gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def skip_case(case: Case, status: str, reason: str) -> None:
    """Record a case that did not run (status "OOM" or "unsupported") and skip its test."""
    NOT_RUN.append({**case.info(), "sequence": next(_sequence), "status": status, "reason": reason})
    pytest.skip(f"{status}: {reason}")


def _guarded(case: Case, third_party: bool, action: Callable[[], Any]) -> Any:
    """Run ``action``; an OOM (or a third-party failure) becomes a recorded skip."""
    try:
        return action()
    except (Unsupported, WouldRunOutOfMemory) as error:
        failure = ("OOM" if isinstance(error, WouldRunOutOfMemory) else "unsupported", str(error))
        ran_out = False
    except Exception as error:  # noqa: BLE001 — sorted below; our own failures re-raise
        ran_out = _is_out_of_memory(error)
        if not (ran_out or third_party):
            raise
        failure = ("OOM" if ran_out else "unsupported", _first_line(error))
    # Outside the except block, so the traceback's frames (and their tensors) are gone.
    _release_memory(collect=ran_out)
    skip_case(case, *failure)


def _reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)


def _peak_memory() -> Optional[int]:
    return torch.cuda.max_memory_allocated(DEVICE) if DEVICE.type == "cuda" else None


def _worth_repeating(case: Case) -> bool:
    """On the CPU only maps up to 32×32 (calls of milliseconds) get a warm-up and rounds."""
    return DEVICE.type == "cuda" or (case.length is not None and case.length <= CPU_REPEAT_MAX_LENGTH)


def _rounds(seconds_per_call: float) -> int:
    low, high = ROUNDS[DEVICE.type]
    return int(min(max(math.ceil(TARGET_SECONDS[DEVICE.type] / max(seconds_per_call, 1e-9)), low), high))


def measure(benchmark, case: Case, build: Callable[[], Timed], *,
            check: Optional[Callable[[Any], Optional[float]]] = None, third_party: bool = False) -> None:
    """Build, warm up, check and time one case; fill ``benchmark.extra_info``.

    ``build()`` returns the timed callable (or raises ``Unsupported``/``WouldRunOutOfMemory``);
    ``check(output)`` returns the max abs error against the reference (None where the
    reference does not fit), which must stay within ``CHECK_TOLERANCE`` — a contender that
    computes something else is no contender.
    """
    benchmark.group = case.group
    benchmark.extra_info.update(case.info())
    benchmark.extra_info["sequence"] = next(_sequence)  # lets the report restore the run order
    excluded = excluded_on_this_device(case.dtype)
    if excluded is not None:
        skip_case(case, "unsupported", excluded)
    _release_memory()
    call = _guarded(case, third_party, build)

    # The smoke run (--benchmark-disable: pedantic calls the target once) and the expensive
    # CPU cases get one timed call; everything else an untimed first call, then the rounds.
    single_call = benchmark.disabled or not _worth_repeating(case)
    if single_call:
        first = lambda: benchmark.pedantic(call, rounds=1, iterations=1)  # noqa: E731
    else:
        first = call
    _reset_peak_memory()
    started = time.perf_counter()
    output = _guarded(case, third_party, first)
    seconds = time.perf_counter() - started
    peak = _peak_memory()  # before the check, which allocates its own reference

    error = _guarded(case, third_party, lambda: check(output)) if check is not None else None
    if error is not None:
        benchmark.extra_info["max_abs_err"] = error
        assert error <= CHECK_TOLERANCE[case.dtype], (
            f"{case.contender} disagrees with the reference on {case.group}: "
            f"max |error| {error:.3g} > {CHECK_TOLERANCE[case.dtype]}")
    del output

    if not single_call:
        _reset_peak_memory()
        _guarded(case, third_party, lambda: benchmark.pedantic(
            call, rounds=_rounds(seconds), warmup_rounds=WARMUP_ROUNDS[DEVICE.type], iterations=1))
        peak = _peak_memory()
    benchmark.extra_info["status"] = "ok"
    if peak is not None:
        benchmark.extra_info["peak_mem_bytes"] = peak
    # The median resists the odd slow round (a shared host, a clock change); the report uses it too.
    median = benchmark.stats.stats.median if benchmark.stats is not None else seconds
    benchmark.extra_info["median_s"] = median
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / median / 1e12
