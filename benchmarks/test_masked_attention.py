"""The masked-attention op, one DSA branch per case, every contender side by side.

Cases: the five configurations of ``cases.CONFIGS`` × centre/random holes × the cross
(fg → bg) and self (fg → fg) branch × float32/bfloat16 × forward and forward+backward.
Each contender's output is checked against the reference on the first sample.
"""
from __future__ import annotations

import pytest

from benchmarks.cases import (BRANCHES, CONFIGS, DTYPES, MASK_KINDS, PASSES, attention_flops,
                              attention_problem)
from benchmarks.contenders import OP_BASELINE, OP_CONTENDERS, THIRD_PARTY, reference_check
from benchmarks.harness import Case, measure


@pytest.mark.parametrize("contender", list(OP_CONTENDERS))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.id)
def test_masked_attention(benchmark, config, mask_kind, branch, dtype, pass_, contender):
    backward = pass_ == "fwd+bwd"
    problem = attention_problem(config, mask_kind, branch, DTYPES[dtype], backward)
    flops = attention_flops(problem.query_mask, problem.key_mask, config.qk_dim, config.v_dim, backward)
    case = Case.of("op", contender, OP_BASELINE, config, mask_kind, branch, dtype, pass_, flops)
    check = None if contender == OP_BASELINE else (lambda out: reference_check(problem, out))
    measure(benchmark, case, lambda: OP_CONTENDERS[contender](problem), check=check,
            third_party=contender in THIRD_PARTY)
