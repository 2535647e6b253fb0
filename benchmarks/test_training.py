"""Training throughput: one generator forward + backward (L1 loss) per attention kind/backend.

The hook point for end-to-end numbers: batch 16 on the GPU (the paper's), 4 on the CPU
(where the ``cpu`` backend is compared with the reference), 256×256, float32,
random-rectangle holes (the training distribution).
``extra_info["images_per_s"]`` is the batch over the median step time. The generator comes
from ``oracleface.models``; while it is not importable the cases record "unsupported".
"""
from __future__ import annotations

import pytest

from benchmarks.cases import TRAINING_RESOLUTION, training_problem
from benchmarks.contenders import TRAINING_BASELINE, TRAINING_CONTENDERS
from benchmarks.harness import Case, measure


@pytest.mark.parametrize("contender", list(TRAINING_CONTENDERS))
def test_generator_training_step(benchmark, contender):
    mask_kind = "random"
    problem = training_problem(mask_kind)
    case = Case("training", contender, TRAINING_BASELINE, f"generator{TRAINING_RESOLUTION}",
                problem.batch, mask_kind, "-", "fp32", "fwd+bwd")
    measure(benchmark, case, lambda: TRAINING_CONTENDERS[contender](problem))
    benchmark.extra_info["images_per_s"] = problem.batch / benchmark.extra_info["median_s"]
