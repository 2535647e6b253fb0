"""The oracle loss of one DSA layer (Eq. 5, both branches, forward + backward): streamed
through ``dsa_ops.attention_kl`` vs the dense ``(B, L, L)`` maps of both passes.

Cases: the paper's three DSA layers (16², 32², 64²; batch 16 on the GPU, ``cases.py``'s
reduced batch on the CPU) and the 128² map, where the dense maps do not fit (recorded as
"OOM" by the memory pre-check). Inputs are what the generator hands the loss: per branch
the prediction's q, k (leaves that require grad) and the oracle's (constants), the
foreground of the centre or random holes, ``scale = 1/√Dqk`` (as in the op benchmarks: it
keeps the softmax away from one-hot, where the dense loss's 1e-12 clamp of ln E would make
it disagree with the exact streamed value; timing does not depend on it). Contenders:

- ``dense-maps`` (the baseline): ``reference.attention_probs`` for both passes and both
  branches, then ``oracleface.losses.attention_kl_loss``; O(B·L²) memory.
- ``streaming[<backend>]``: ``oracleface.losses.streaming_oracle_kl_loss`` with that
  ``dsa_ops.attention_kl`` backend; O(B·L·Dqk) memory besides the backend's tiles.

Each streaming contender's loss is checked against the dense loss on the first sample
(maps up to 64²). Peak memory is recorded on the GPU (``harness.measure``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from benchmarks.cases import (BRANCHES, CONFIGS, DATA_SEED, DEVICE, MASK_KINDS, LayerConfig,
                              branch_masks, foreground, hole_masks, pair_count)
from benchmarks.contenders import Unsupported, require_dense_memory, synchronize
from benchmarks.harness import Case, measure
from dsa_ops import ops, reference
from oracleface.losses import attention_kl_loss, streaming_oracle_kl_loss

Tensor = torch.Tensor

KL_CONFIGS = CONFIGS[:4]  # 16², 32², 64² (the paper's layers) and 128²
# Bytes per query×key pair of the dense path, float32: four maps (2 passes × 2 branches),
# each with scores, masked scores, exponentials and probabilities, plus the loss's
# log/xlogy temporaries and, in the backward, their gradients.
DENSE_BYTES_PER_PAIR = 4 * 25
CHECK_MAX_LENGTH = 64 * 64
CPU_REFERENCE_MAX_LENGTH = 64 * 64
BASELINE = "dense-maps"


@dataclasses.dataclass
class OracleLossProblem:
    """One DSA layer's loss inputs: ``predicted``/``oracle`` as ``streaming_oracle_kl_loss``
    takes them (q, k ``(B, L, Dqk)``), the holes ``(B, 1, 256, 256)``, the map's side."""

    predicted: dict
    oracle: dict
    holes: Tensor
    side: int

    @property
    def leaves(self) -> list[Tensor]:
        return [t for branch in BRANCHES for t in self.predicted[0][branch]]


def oracle_loss_problem(config: LayerConfig, mask_kind: str) -> OracleLossProblem:
    holes = hole_masks(mask_kind, config.batch, DEVICE)
    fg = foreground(config, holes)
    generator = torch.Generator(DEVICE).manual_seed(DATA_SEED)

    def draw(requires_grad: bool) -> Tensor:
        shape = (config.batch, config.length, config.qk_dim)
        tensor = torch.randn(shape, generator=generator, device=DEVICE)
        return tensor.requires_grad_(requires_grad)

    def layer(requires_grad: bool) -> dict:
        branches = {branch: (draw(requires_grad), draw(requires_grad)) for branch in BRANCHES}
        return {0: {"foreground": fg, "scale": config.qk_dim ** -0.5, **branches}}

    return OracleLossProblem(layer(True), layer(False), holes, config.height)


def dense_loss(problem: OracleLossProblem) -> Tensor:
    fg = problem.predicted[0]["foreground"]

    def maps(side: dict) -> dict:
        return {0: {branch: reference.attention_probs(*side[branch], *branch_masks(fg, branch),
                                                      side["scale"]) for branch in BRANCHES}}

    with torch.no_grad():
        oracle = maps(problem.oracle[0])
    return attention_kl_loss(maps(problem.predicted[0]), oracle, problem.holes)


def _first_sample(problem: OracleLossProblem) -> OracleLossProblem:
    def cut(side: dict) -> dict:
        return {0: {key: (value[:1] if isinstance(value, Tensor) else
                          tuple(t[:1].detach() for t in value) if isinstance(value, tuple) else value)
                    for key, value in side[0].items()}}
    return OracleLossProblem(cut(problem.predicted), cut(problem.oracle), problem.holes[:1],
                             problem.side)


def _timed(problem: OracleLossProblem, loss_fn):
    def run() -> Tensor:
        loss = loss_fn(problem)
        torch.autograd.grad(loss, problem.leaves)
        synchronize(loss.device)
        return loss.detach()
    return run


def streaming(backend: str):
    def contender(problem: OracleLossProblem):
        q = problem.leaves[0]
        if backend == "triton" and q.device.type == "cpu":
            raise Unsupported("triton on the CPU only runs under TRITON_INTERPRET=1, in the Python "
                              "interpreter: correct but far too slow to benchmark")
        reason = ops.get_kl_backend(backend).unsupported_reason(q, q)
        if reason is not None:
            raise Unsupported(f"attention_kl backend {backend!r}: {reason}")
        if backend == "reference" and q.device.type == "cpu" and q.shape[1] > CPU_REFERENCE_MAX_LENGTH:
            raise Unsupported("the reference visits every row against every position: minutes "
                              "per call on a CPU beyond 64×64 (the cpu backend is the CPU contender)")
        return _timed(problem, lambda p: streaming_oracle_kl_loss(p.predicted, p.oracle,
                                                                  backend=backend))
    return contender


def dense(problem: OracleLossProblem):
    batch, length, _ = problem.leaves[0].shape
    require_dense_memory("dense oracle maps", batch, length, DENSE_BYTES_PER_PAIR, DEVICE)
    return _timed(problem, dense_loss)


CONTENDERS = {BASELINE: dense, **{f"streaming[{b}]": streaming(b) for b in ops.KL_BACKENDS}}


def check(problem: OracleLossProblem, backend: str, loss: Tensor) -> Optional[float]:
    """|streamed − dense| of the first sample's loss (None where its maps are too big)."""
    if problem.side ** 2 > CHECK_MAX_LENGTH:
        return None
    first = _first_sample(problem)
    streamed = streaming_oracle_kl_loss(first.predicted, first.oracle, backend=backend)
    with torch.no_grad():
        return (streamed.detach() - dense_loss(first)).abs().item()


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("config", KL_CONFIGS, ids=lambda config: config.id)
def test_oracle_loss(benchmark, config, mask_kind, contender):
    problem = oracle_loss_problem(config, mask_kind)
    fg = problem.predicted[0]["foreground"]
    # Useful FLOPs: per pair, both passes' q·k (2·2·Dqk) in the forward, recomputed in the
    # backward plus dq and dk (2·2·Dqk more).
    flops = sum(pair_count(*branch_masks(fg, branch)) for branch in BRANCHES) * 12 * config.qk_dim
    case = Case.of("oracle-kl", contender, BASELINE, config, mask_kind, "both", "fp32",
                   "fwd+bwd", flops)
    backend = contender.removeprefix("streaming[").removesuffix("]")
    measure(benchmark, case, lambda: CONTENDERS[contender](problem),
            check=None if contender == BASELINE else (lambda loss: check(problem, backend, loss)))
