"""The compiled CUDA backend (csrc/masked_attention/, its bindings.cpp).

The numerical tests run on a GPU, or on CPU tensors through the host emulation of the same
kernels when ``DSA_OPS_CUDA_EMULATE=1`` was set before the import (``make test`` runs this
file that way too, on smaller shapes: the emulation runs every CUDA thread). With
neither they skip with the reason. Cases come from ``attention_cases``: per-sample masks
cycle through a rectangle, random pixels, an empty and a full hole, so every batch has
samples without queries and without keys.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import dsa_ops
from dsa_ops import extension, ops, reference
from attention_cases import assert_close_by_dtype, make_case, reference_results

CUDA_OPS = ("partition_indices", "masked_attention_fwd_cuda", "masked_attention_bwd_cuda",
            "dual_masked_attention_fwd_cuda", "dual_masked_attention_bwd_cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
# Where the kernels' head-size limits are written: Dqk for every op, Dv for masked attention.
LIMIT_HEADERS = (CSRC / "device" / "kernel_args.h", CSRC / "masked_attention" / "launch.cuh")

needs_extension = pytest.mark.skipif(extension.load_error() is not None,
                                     reason=f"{extension.load_error()}")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or extension.load_error() is not None,
    reason="needs a CUDA device" if not torch.cuda.is_available() else f"{extension.load_error()}")
# Where the numerical tests run the kernels: a GPU, else their host emulation.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EMULATED = DEVICE.type == "cpu"
needs_kernels = pytest.mark.skipif(ops.backend_unavailable_reason("cuda", DEVICE) is not None,
                                   reason=f"{ops.backend_unavailable_reason('cuda', DEVICE)}")


# ----------------------------------------------------------------------------- no GPU needed
@needs_extension
@pytest.mark.parametrize("name", CUDA_OPS)
def test_extension_registers_a_cuda_kernel_for_every_cuda_op(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{name}", "CUDA")


def test_python_head_size_limits_mirror_the_kernels():
    header = "\n".join(path.read_text() for path in LIMIT_HEADERS)
    value = lambda name: int(re.search(rf"constexpr int {name} = (\d+);", header).group(1))  # noqa: E731
    assert ops.FUSED_QK_DIMS == (value("kMinQkDim"), value("kMaxQkDim"))
    assert ops.FUSED_V_DIMS == (value("kMinVDim"), value("kMaxVDim"))


# ----------------------------------------------------------------------------- helpers
def _poison_allocator(device: torch.device) -> None:
    """Leave NaNs in the caching allocator's free blocks, so an output element the
    kernels never write shows up as NaN instead of as a lucky zero (the emulated bindings
    fill their outputs with NaN themselves)."""
    if device.type == "cuda":
        poison = torch.full((1 << 22,), float("nan"), device=device)
        del poison


def _cuda_case(**kwargs):
    return make_case(device=DEVICE, **kwargs)


def _run_cuda(case):
    """(out, (dq, dk, dv)) through the public API and autograd on the cuda backend."""
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    _poison_allocator(q.device)
    out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                                   backend="cuda")
    _poison_allocator(q.device)
    out.backward(case.grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


# (Dqk, Dv): every padded Dqk bucket, Dv below, inside and at the ends of the chunking.
HEAD_SIZES = [(8, 8), (16, 40), (24, 128), (64, 512), (64, 8), (8, 512)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("qk_dim,v_dim", HEAD_SIZES)
@pytest.mark.parametrize("form", ("cross", "self", "independent"))
def test_forward_and_gradients_match_float64_reference(dtype, qk_dim, v_dim, form):
    # 9×11 = 99, 13×13 = 169, 9×9 = 81: L is never a multiple of the 64-row tile.
    if EMULATED:
        height, width = (9, 9) if v_dim < 512 else (7, 10)
    else:
        height, width = (9, 11) if v_dim >= 128 else (13, 13)
    case = _cuda_case(batch=4, height=height, width=width, qk_dim=qk_dim, v_dim=v_dim, form=form,
                      dtype=dtype, noncontiguous=(qk_dim + v_dim) % 2 == 0, seed=qk_dim + v_dim)
    out, grads = _run_cuda(case)
    exact_out, exact_grads = reference_results(case, exact=True)
    base_out, base_grads = reference_results(case, exact=False)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_by_dtype(out, exact_out, base_out, "out")
    for name, grad, exact, base in zip(("dq", "dk", "dv"), grads, exact_grads, base_grads):
        assert_close_by_dtype(grad, exact, base, name)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_lse_matches_reference_and_is_infinite_off_the_query_rows(dtype):
    case = _cuda_case(batch=8, height=10, width=10, qk_dim=16, v_dim=32, form="independent",
                      dtype=dtype)
    _poison_allocator(case.q.device)
    out, lse, *_ = torch.ops.dsa_ops.masked_attention_fwd_cuda(*case.inputs, case.scale)
    _, exact_lse = reference.forward(*(t.double() for t in (case.q, case.k, case.v)),
                                     case.query_mask, case.key_mask, case.scale)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse))
    finite = torch.isfinite(exact_lse)
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], atol=tolerance, rtol=0)
    no_pairs = ~(case.query_mask & case.key_mask.any(dim=1, keepdim=True))
    assert (out[no_pairs] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_exact_zeros_outside_the_masks_and_no_nan_for_empty_sets(dtype):
    case = _cuda_case(batch=8, height=9, width=9, qk_dim=8, v_dim=24, form="independent",
                      dtype=dtype)
    case.query_mask[1] = False  # no queries
    case.key_mask[2] = False    # no keys
    case.query_mask[3] = True   # everything on both sides
    case.key_mask[3] = True
    out, (dq, dk, dv) = _run_cuda(case)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    has_keys = case.key_mask.any(dim=1, keepdim=True)
    has_queries = case.query_mask.any(dim=1, keepdim=True)
    assert (out[~(case.query_mask & has_keys)] == 0).all()
    assert (dq[~(case.query_mask & has_keys)] == 0).all()
    assert (dk[~(case.key_mask & has_queries)] == 0).all()
    assert (dv[~(case.key_mask & has_queries)] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_backward_is_deterministic(dtype):
    side = 9 if EMULATED else 16
    case = _cuda_case(batch=2, height=side, width=side, qk_dim=32, v_dim=96, form="cross",
                      dtype=dtype)
    first = _run_cuda(case)[1]
    second = _run_cuda(case)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_opcheck_cuda_forward_and_backward_ops(dtype):
    case = _cuda_case(batch=4, height=6, width=7, qk_dim=8, v_dim=16, form="cross", dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    fwd, bwd = torch.ops.dsa_ops.masked_attention_fwd_cuda, torch.ops.dsa_ops.masked_attention_bwd_cuda
    torch.library.opcheck(fwd, (q, k, v, case.query_mask, case.key_mask, case.scale))
    out, lse, *partitions = fwd(*case.inputs, case.scale)
    torch.library.opcheck(bwd, (case.grad_out, *case.inputs[:3], out, lse, case.query_mask,
                                case.key_mask, *partitions, case.scale))


@needs_kernels
def test_partition_kernel_matches_reference():
    generator = torch.Generator().manual_seed(3)
    for length in (1, 31, 32, 33, 1000, 4099):
        mask = torch.rand(5, length, generator=generator) < torch.rand(5, 1, generator=generator)
        mask[0] = False
        mask[1] = True
        index, count = torch.ops.dsa_ops.partition_indices(mask.to(DEVICE))
        expected_index, expected_count = reference.partition_indices(mask)
        assert torch.equal(index.cpu(), expected_index)
        assert torch.equal(count.cpu(), expected_count)


def _dual_inputs(dtype, qk_dim=16, v_dim=72, seed=0):
    cross = _cuda_case(batch=4, height=11, width=9, qk_dim=qk_dim, v_dim=v_dim, form="cross",
                       dtype=dtype, noncontiguous=True, seed=seed)
    self_ = _cuda_case(batch=4, height=11, width=9, qk_dim=qk_dim, v_dim=v_dim, form="self",
                       dtype=dtype, seed=seed + 1)
    # Same foreground for both branches (the seeds only differ in q, k, v, grad_out).
    return cross, self_, cross.query_mask


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_dual_op_equals_two_single_ops(dtype):
    cross, self_, foreground = _dual_inputs(dtype)
    leaves = [t.detach().requires_grad_() for c in (cross, self_) for t in (c.q, c.k, c.v)]
    _poison_allocator(foreground.device)
    out_cross, lse_cross, out_self, lse_self, *_ = torch.ops.dsa_ops.dual_masked_attention_fwd_cuda(
        *leaves, foreground, cross.scale)
    _poison_allocator(foreground.device)
    torch.autograd.backward((out_cross, out_self), (cross.grad_out, self_.grad_out))
    for case, out, lse, (q, k, v), key_mask in ((cross, out_cross, lse_cross, leaves[:3], ~foreground),
                                                (self_, out_self, lse_self, leaves[3:], foreground)):
        single = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
        single_out, single_lse, *_ = torch.ops.dsa_ops.masked_attention_fwd_cuda(
            *single, foreground, key_mask, cross.scale)
        single_out.backward(case.grad_out)
        # Same kernels, same order of summation: bitwise equal.
        assert torch.equal(out, single_out) and torch.equal(lse, single_lse)
        for dual_leaf, single_leaf in zip((q, k, v), single):
            assert torch.equal(dual_leaf.grad, single_leaf.grad)


@needs_kernels
def test_dual_ops_pass_opcheck_and_module_uses_them():
    cross, self_, foreground = _dual_inputs(torch.float32, qk_dim=8, v_dim=16)
    inputs = [t.detach().requires_grad_() for c in (cross, self_) for t in (c.q, c.k, c.v)]
    torch.library.opcheck(torch.ops.dsa_ops.dual_masked_attention_fwd_cuda,
                          (*inputs, foreground, cross.scale))
    outputs = torch.ops.dsa_ops.dual_masked_attention_fwd_cuda(*inputs, foreground, cross.scale)
    torch.library.opcheck(torch.ops.dsa_ops.dual_masked_attention_bwd_cuda,
                          (cross.grad_out, self_.grad_out, *(t.detach() for t in inputs),
                           *(t.detach() for t in outputs[:4]), foreground, *outputs[4:],
                           cross.scale))
    module = dsa_ops.DualSpatialAttention(16, backend="cuda").to(DEVICE)
    reference_module = dsa_ops.DualSpatialAttention(16, backend="reference").to(DEVICE)
    reference_module.load_state_dict(module.state_dict())
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.3)
        reference_module.alpha.fill_(0.7)
        reference_module.beta.fill_(-0.3)
    x = torch.randn(2, 16, 12, 12, device=DEVICE)
    hole = torch.zeros(2, 1, 12, 12, device=DEVICE)
    hole[:, :, 3:9, 2:7] = 1
    torch.testing.assert_close(module(x, hole), reference_module(x, hole), atol=1e-4, rtol=1e-4)


@needs_kernels
def test_unsupported_head_sizes_raise_naming_the_limits():
    for qk_dim, v_dim, expected in ((4, 16, "Dqk"), (72, 16, "Dqk"), (16, 520, "Dv")):
        case = _cuda_case(batch=1, height=4, width=4, qk_dim=qk_dim, v_dim=v_dim)
        with pytest.raises(RuntimeError, match=rf"support {expected} .* in \d+\.\.\d+"):
            torch.ops.dsa_ops.masked_attention_fwd_cuda(*case.inputs, 1.0)


@needs_gpu
def test_large_map_runs_in_bounded_memory():
    """256×256 map, 16 384 hole pixels per sample, batch 8, C = 64 (Dqk 8): fwd + bwd."""
    batch, side, channels, qk_dim = 8, 256, 64, 8
    length = side * side
    hole = torch.zeros(batch, side, side, dtype=torch.bool, device="cuda")
    hole[:, 64:192, 64:192] = True
    foreground = hole.flatten(1)
    generator = torch.Generator(device="cuda").manual_seed(0)
    make = lambda d: torch.randn(batch, length, d, device="cuda", dtype=torch.float16,  # noqa: E731
                                 generator=generator).requires_grad_()
    q, k, v = make(qk_dim), make(qk_dim), make(channels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = dsa_ops.masked_attention(q, k, v, foreground, ~foreground, scale=qk_dim ** -0.5,
                                   backend="cuda")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    dense_scores = batch * length * length * 4
    assert peak < dense_scores / 100, (f"peak {peak / 2**20:.0f} MiB; the dense scores would "
                                       f"take {dense_scores / 2**30:.0f} GiB")
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[~foreground] == 0).all() and (out[foreground].abs().sum(dim=-1) > 0).all()
