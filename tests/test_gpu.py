"""The GPU tests of every backend in about a minute (``pytest -m gpu``, gpu-check's test stage):
the op, the dual op and the oracle KL per backend against float64, the module, one
generator training step under CUDA autocast, and ``torch.compile`` with inductor.

Tolerances follow FlashAttention's rule: the error against float64 is at most twice the
error of the reference computed in the input dtype (``attention_cases``). Without CUDA
every test skips with the reason; the full CUDA and Triton suites (test_cuda_backend.py,
test_triton.py, …) run on a GPU too and go deeper.
"""
from __future__ import annotations

import pytest
import torch

import dsa_ops
from dsa_ops import reference
from attention_cases import assert_close_by_dtype, assert_gradients_close_by_dtype, make_case, reference_results

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = torch.device("cuda")
GPU_BACKENDS = ("cuda", "triton", "reference")
DTYPES = (torch.float32, torch.bfloat16)
# A 20×20 map (L = 400, several key tiles), Dqk 16 and Dv 72 (a partial value chunk).
SHAPE = dict(batch=3, height=20, width=20, qk_dim=16, v_dim=72)


@pytest.fixture
def full_float32():
    """cuDNN convolutions in full float32 (TF32 is their default on Ampere and later): the
    module tests compare attention backends, not TF32 roundings of slightly different inputs."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


def _require(backend: str) -> None:
    reason = dsa_ops.backend_unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.fail(f"backend {backend!r} unavailable on this GPU: {reason}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["cross", "self"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_op_forward_and_backward_match_float64(backend, form, dtype):
    _require(backend)
    case = make_case(**SHAPE, form=form, dtype=dtype, device=DEVICE, seed=3)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                                   backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), case.grad_out)
    exact_out, exact_grads = reference_results(case, exact=True)
    baseline_out, baseline_grads = reference_results(case, exact=False)
    assert out.dtype == dtype
    assert_close_by_dtype(out, exact_out, baseline_out, "out")
    assert_gradients_close_by_dtype(("dq", "dk", "dv"), grads, exact_grads, baseline_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dual_op_equals_two_single_branches(backend, dtype):
    _require(backend)
    cross = make_case(**SHAPE, form="cross", dtype=dtype, device=DEVICE, seed=5)
    own = make_case(**SHAPE, form="self", dtype=dtype, device=DEVICE, seed=6)
    foreground = cross.query_mask
    leaves = [t.detach().requires_grad_() for t in (cross.q, cross.k, cross.v, own.q, own.k, own.v)]
    out_cross, out_self = dsa_ops.ops.dual_masked_attention(*leaves, foreground, scale=cross.scale,
                                                            backend=backend)
    grads = torch.autograd.grad((out_cross, out_self), leaves, (cross.grad_out, own.grad_out))
    single_leaves = [t.detach().requires_grad_() for t in leaves]
    single_cross = dsa_ops.masked_attention(*single_leaves[:3], foreground, ~foreground,
                                            scale=cross.scale, backend=backend)
    single_self = dsa_ops.masked_attention(*single_leaves[3:], foreground, foreground,
                                           scale=cross.scale, backend=backend)
    single_grads = torch.autograd.grad((single_cross, single_self), single_leaves,
                                       (cross.grad_out, own.grad_out))
    # The fused dual kernel runs the same tiles in the same order as the single op.
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_cross, single_cross, **tolerance)
    torch.testing.assert_close(out_self, single_self, **tolerance)
    for grad, single in zip(grads, single_grads):
        torch.testing.assert_close(grad, single, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_kl_matches_float64(backend, dtype):
    _require(backend)
    reason = dsa_ops.ops.get_kl_backend(backend).unsupported_reason(
        torch.empty(1, 1, SHAPE["qk_dim"], device=DEVICE, dtype=dtype),
        torch.empty(1, 1, SHAPE["qk_dim"], device=DEVICE, dtype=dtype))
    if reason is not None:
        pytest.fail(f"attention_kl backend {backend!r} unavailable on this GPU: {reason}")
    case = make_case(**SHAPE, form="cross", dtype=dtype, device=DEVICE, seed=8)
    oracle = make_case(**SHAPE, form="cross", dtype=dtype, device=DEVICE, seed=9)
    grad_kl = case.grad_out[..., 0].contiguous()  # (B, L), random
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
    kl = dsa_ops.attention_kl(q, k, oracle.q, oracle.k, case.query_mask, case.key_mask,
                              scale=case.scale, backend=backend)
    grads = torch.autograd.grad(kl, (q, k), grad_kl)

    def run_reference(exact: bool):
        """The reference in float64, or entirely in the input dtype (the baseline)."""
        inputs = [t.to(torch.float64) if exact else t for t in (case.q, case.k, oracle.q, oracle.k)]
        masks = (case.query_mask, case.key_mask)
        value, lse, oracle_lse = reference.attention_kl_forward(*inputs, *masks, case.scale, upcast=exact)
        grads = reference.attention_kl_backward(grad_kl.to(inputs[0].dtype), *inputs, lse, oracle_lse,
                                                *masks, case.scale, upcast=exact)
        return value, grads

    exact, exact_grads = run_reference(True)
    baseline, baseline_grads = run_reference(False)
    assert_close_by_dtype(kl, exact, baseline, "kl")
    assert_gradients_close_by_dtype(("dq", "dk"), grads, exact_grads, baseline_grads, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_module_forward_and_backward_agree_across_backends(backend, full_float32):
    _require(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, 32, device=DEVICE)
    holes = torch.zeros(2, 1, 256, 256, device=DEVICE)
    holes[:, :, 64:192, 64:192] = 1
    modules = {}
    for name in (backend, "reference"):
        torch.manual_seed(1)
        module = dsa_ops.DualSpatialAttention(64, backend=name).to(DEVICE)
        with torch.no_grad():  # α = β = 0 at initialisation would hide the attention
            module.alpha.fill_(0.7)
            module.beta.fill_(0.4)
        modules[name] = module
    results = {}
    for name, module in modules.items():
        leaf = x.clone().requires_grad_()
        y = module(leaf, holes)
        results[name] = (y, torch.autograd.grad(y.square().sum(), leaf)[0])
    torch.testing.assert_close(results[backend][0], results["reference"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[backend][1], results["reference"][1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_generator_training_step_under_cuda_autocast(amp_dtype):
    from oracleface.models import Generator

    torch.manual_seed(0)
    generator = Generator(256, attention="dsa").to(DEVICE).train()
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    images = torch.rand(2, 3, 256, 256, device=DEVICE)
    holes = torch.zeros(2, 1, 256, 256, device=DEVICE)
    holes[:, :, 64:192, 64:192] = 1
    before = [p.detach().clone() for p in generator.parameters()]
    with torch.autocast("cuda", dtype=amp_dtype):
        out = generator(images, holes)
        loss = (out.float() - images).abs().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(loss)
    grads = [p.grad for p in generator.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(generator.parameters(), before))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_module_under_torch_compile_inductor(backend, full_float32):
    _require(backend)
    torch.manual_seed(0)
    module = dsa_ops.DualSpatialAttention(64, backend=backend).to(DEVICE)
    with torch.no_grad():
        module.alpha.fill_(0.5)
        module.beta.fill_(0.5)
    x = torch.randn(2, 64, 16, 16, device=DEVICE, requires_grad=True)
    holes = torch.zeros(2, 1, 256, 256, device=DEVICE)
    holes[:, :, 32:160, 96:224] = 1
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    y = compiled(x, holes)
    grad = torch.autograd.grad(y.square().sum(), x)[0]
    expected = module(x, holes)
    expected_grad = torch.autograd.grad(expected.square().sum(), x)[0]
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-3, rtol=1e-3)
