"""The whole ``DualSpatialAttention`` module per backend against contextual attention (CA).

Cases: ``cases.CONFIGS`` × centre/random holes × float32/bfloat16 × forward and
forward+backward. The DSA module runs both branches, the projection GEMM and the fusion
conv. ``extra_info["ms_per_image"]`` is the median time divided by the batch; at layer 14
``extra_info["paper_ms_per_image"]`` holds the paper's figure (Table 3: DSA 6.4 ms,
CA 12.9 ms per image).
"""
from __future__ import annotations

import pytest

from benchmarks.cases import (CONFIGS, DTYPES, MASK_KINDS, PAPER_MS_PER_IMAGE_LAYER_14, PASSES,
                              foreground, module_flops, module_problem)
from benchmarks.contenders import MODULE_BASELINE, MODULE_CONTENDERS
from benchmarks.harness import Case, measure


@pytest.mark.parametrize("contender", list(MODULE_CONTENDERS))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.id)
def test_attention_module(benchmark, config, mask_kind, dtype, pass_, contender):
    backward = pass_ == "fwd+bwd"
    problem = module_problem(config, mask_kind, DTYPES[dtype], backward)
    is_dsa = contender.startswith("dsa")
    flops = module_flops(config, foreground(config, problem.holes), backward) if is_dsa else None
    case = Case.of("module", contender, MODULE_BASELINE, config, mask_kind, "both", dtype, pass_, flops)
    if config.paper_layer == 14 and pass_ == "fwd":
        benchmark.extra_info["paper_ms_per_image"] = PAPER_MS_PER_IMAGE_LAYER_14["dsa" if is_dsa else "ca"]
    measure(benchmark, case, lambda: MODULE_CONTENDERS[contender](problem))
    benchmark.extra_info["ms_per_image"] = 1e3 * benchmark.extra_info["median_s"] / problem.batch
