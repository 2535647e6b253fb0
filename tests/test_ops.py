"""The op's contract: validation, registration (opcheck), torch.compile, dispatch."""
import os
import subprocess
import sys

import pytest
import torch

import dsa_ops
from dsa_ops import extension, ops
from tests.attention_cases import make_case


@pytest.fixture
def case():
    return make_case(batch=2, height=4, width=4, qk_dim=8, v_dim=6, form="cross", seed=0)


def call(case, **overrides):
    args = dict(q=case.q, k=case.k, v=case.v, query_mask=case.query_mask, key_mask=case.key_mask)
    options = {name: overrides.pop(name) for name in ("scale", "backend") if name in overrides}
    args.update(overrides)
    return dsa_ops.masked_attention(**args, **options)


BAD_INPUTS = [
    # (overrides, exception, words the message must contain)
    (dict(q="not a tensor"), TypeError, ["q", "torch.Tensor"]),
    (dict(q=torch.randn(2, 16)), ValueError, ["q", "(B, L, Dqk)", "2-D"]),
    (dict(v=torch.randn(2, 16, 6, 1)), ValueError, ["v", "(B, L, Dv)"]),
    (dict(k=torch.randn(3, 16, 8)), ValueError, ["k", "(2, 16, 8)"]),
    (dict(k=torch.randn(2, 15, 8)), ValueError, ["k", "(B, L, Dqk)"]),
    (dict(k=torch.randn(2, 16, 4)), ValueError, ["k", "Dqk"]),
    (dict(v=torch.randn(2, 15, 6)), ValueError, ["v", "(B, L, Dv)"]),
    (dict(q=torch.randn(2, 16, 0), k=torch.randn(2, 16, 0)), ValueError, ["Dqk", "positive"]),
    (dict(q=torch.randint(0, 3, (2, 16, 8))), TypeError, ["q", "float16"]),
    (dict(k=torch.randn(2, 16, 8, dtype=torch.float64)), TypeError, ["k", "dtype"]),
    (dict(v=torch.randn(2, 16, 6, dtype=torch.float16)), TypeError, ["v", "dtype"]),
    (dict(query_mask=torch.ones(2, 16)), TypeError, ["query_mask", "bool"]),
    (dict(key_mask=torch.ones(2, 16, dtype=torch.uint8)), TypeError, ["key_mask", "bool"]),
    (dict(query_mask=torch.ones(2, 4, 4, dtype=torch.bool)), ValueError, ["query_mask", "(B, L)"]),
    (dict(key_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError, ["key_mask", "(2, 16)"]),
    (dict(key_mask=torch.ones(2, 16, dtype=torch.bool, device="meta")), ValueError,
     ["key_mask", "meta", "one device"]),
    (dict(v=torch.randn(2, 16, 6, device="meta")), ValueError, ["v", "meta"]),
    (dict(scale="1"), TypeError, ["scale"]),
    (dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    (dict(backend="flash"), ValueError, ["backend", "'flash'", "'reference'"]),
    (dict(backend=3), TypeError, ["backend"]),
]


@pytest.mark.parametrize("overrides, exception, words", BAD_INPUTS,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_argument_and_expectation(case, overrides, exception, words):
    with pytest.raises(exception) as info:
        call(case, **overrides)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_unavailable_backend_says_why(case):
    with pytest.raises(ValueError, match="backend 'cuda' is not available") as info:
        call(case, backend="cuda")
    # The message carries the machine's own reason (no extension, disabled, CPU tensors, ...).
    reason = dsa_ops.backend_unavailable_reason("cuda", case.q.device)
    assert reason and reason in str(info.value)


def test_fused_backends_reject_float64_with_supported_dtypes(case):
    backend = ops.get_backend("triton")
    q = case.q.double()
    reason = backend.unsupported_reason(q, case.v.double())
    if backend.unavailable_reason(q.device) is None:
        assert "float64" in reason and "float32" in reason
    else:
        assert reason == backend.unavailable_reason(q.device)


def test_head_size_limits_are_reported(case):
    backend = ops.Backend("limited", None, None, lambda device: None, ops.FUSED_DTYPES,
                          ops.FUSED_QK_DIMS, ops.FUSED_V_DIMS)
    assert "Dqk in 8..64" in backend.unsupported_reason(torch.randn(1, 4, 4), torch.randn(1, 4, 8))
    assert "Dv in 8..512" in backend.unsupported_reason(torch.randn(1, 4, 8), torch.randn(1, 4, 600))
    assert backend.unsupported_reason(torch.randn(1, 4, 24), torch.randn(1, 4, 40)) is None


def test_auto_on_cpu_is_the_cpu_backend_and_float64_the_reference(case):
    assert ops.resolve_backend("auto", case.q, case.v).name == "cpu"
    torch.testing.assert_close(call(case), call(case, backend="reference"))
    assert ops.resolve_backend("auto", case.q.double(), case.v.double()).name == "reference"


def test_available_backends_always_has_the_reference():
    assert "reference" in dsa_ops.available_backends("cpu")
    assert set(dsa_ops.available_backends()) <= set(dsa_ops.BACKENDS)


def _dual_case():
    """Two branches' q, k, v (non-contiguous, as the module slices them) and a foreground."""
    cross = make_case(batch=4, height=3, width=5, qk_dim=4, v_dim=6, form="cross",
                      noncontiguous=True, seed=11)
    self_ = make_case(batch=4, height=3, width=5, qk_dim=4, v_dim=6, form="cross",
                      noncontiguous=True, seed=12)
    return cross, self_, cross.query_mask


def test_dual_reference_op_equals_two_single_ops_and_passes_opcheck():
    """The reference dual op defines the fused dual op's semantics; its fake impl and
    autograd registration are the ones the CUDA dual op uses."""
    cross, self_, foreground = _dual_case()
    qkv = [t.detach().requires_grad_() for t in (*cross.inputs[:3], *self_.inputs[:3])]
    fwd = torch.ops.dsa_ops.dual_masked_attention_fwd_reference
    torch.library.opcheck(fwd.default, (*qkv, foreground, 0.5))
    out_cross, _, out_self, *_ = fwd(*qkv, foreground, 0.5)
    (out_cross * cross.grad_out).sum().add((out_self * self_.grad_out).sum()).backward()
    singles = [t.detach().requires_grad_() for t in qkv]
    expected_cross = dsa_ops.masked_attention(*singles[:3], foreground, ~foreground, scale=0.5)
    expected_self = dsa_ops.masked_attention(*singles[3:], foreground, foreground, scale=0.5)
    (expected_cross * cross.grad_out).sum().add((expected_self * self_.grad_out).sum()).backward()
    torch.testing.assert_close(out_cross, expected_cross)
    torch.testing.assert_close(out_self, expected_self)
    for fused, single in zip(qkv, singles):
        torch.testing.assert_close(fused.grad, single.grad)


def test_dual_masked_attention_validates_foreground():
    cross, self_, foreground = _dual_case()
    with pytest.raises(TypeError, match="foreground must be a bool tensor"):
        dsa_ops.dual_masked_attention(*cross.inputs[:3], *self_.inputs[:3], foreground.float())


def test_opcheck_partition_indices():
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    torch.library.opcheck(torch.ops.dsa_ops.partition_indices.default, (mask,))


def test_masked_attention_function_matches_op(case):
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    out = dsa_ops.MaskedAttentionFunction.apply(q, k, v, case.query_mask, case.key_mask, 0.5,
                                                "reference")
    out.backward(case.grad_out)
    q2, k2, v2 = (t.detach().requires_grad_() for t in case.inputs[:3])
    expected = dsa_ops.masked_attention(q2, k2, v2, case.query_mask, case.key_mask, scale=0.5)
    expected.backward(case.grad_out)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(grad, expected_grad)


def test_extension_loads_and_registers_cuda_kernels_when_built():
    """CI builds the extension (CUDA torch + nvcc, no GPU) and sets DSA_OPS_EXPECT_EXTENSION=1,
    so a build that silently fell back to pure Python fails here instead of skipping."""
    if extension._library_path() is None and os.environ.get("DSA_OPS_EXPECT_EXTENSION") != "1":
        pytest.skip(f"extension not built here: {extension.load_error()}")
    assert extension.is_loaded(), extension.load_error()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dsa_ops::partition_indices", "CUDA")


def test_public_functions_stay_callable_after_every_submodule_is_imported():
    """The op packages (dsa_ops.ops.masked_attention, .attention_kl) share their names with
    the public functions; importing any submodule, in any order, must not replace
    ``dsa_ops.masked_attention`` or ``dsa_ops.attention_kl`` with a package."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(dsa_ops.__path__, "dsa_ops."):
        if "triton" in module.name and ops.registry.TRITON_IMPORT_ERROR is not None:
            continue
        if module.name == "dsa_ops._C":  # the kernels' library: torch.ops.load_library loads it
            continue
        importlib.import_module(module.name)
    for name in ("masked_attention", "attention_kl", "dual_masked_attention", "partition_indices"):
        assert callable(getattr(dsa_ops, name)), name
    # A fresh interpreter that imports an op package before the top-level package.
    code = ("import dsa_ops.ops.masked_attention.op, dsa_ops.ops.attention_kl.cpu, dsa_ops; "
            "assert callable(dsa_ops.masked_attention) and callable(dsa_ops.attention_kl)")
    root = os.path.dirname(os.path.dirname(dsa_ops.__file__))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
