"""The shared backend suite: every backend against the float64 reference, on the same cases.

Parametrised over ``backend`` in ``dsa_ops.BACKENDS`` on the default device
(CUDA when present, else the CPU). A backend that cannot run here skips with
``dsa_ops.backend_unavailable_reason``. On the CPU, "triton" runs under the Triton
interpreter (``TRITON_INTERPRET=1``, set by conftest.py), which is slow: the CPU shapes
are small (B = 4, L ≤ 99) and each case runs once per session (``_results`` caches it);
the paper's shapes run only on a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

import dsa_ops
from dsa_ops import ops, reference
from dsa_ops.ops import registry
from tests.attention_cases import (assert_close_by_dtype, assert_gradients_close_by_dtype, make_case,
                                   reference_results)
from tests.triton_interpreter import install_bfloat16_dot

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Shape:
    """One input configuration; ``gpu_only`` for sizes beyond the CPU time budget."""
    name: str
    form: str
    qk_dim: int
    v_dim: int
    height: int
    width: int
    batch: int = 4  # make_case cycles rectangle, random, empty, full holes
    noncontiguous: bool = False
    scale: float | None = None
    qk_std: float = 1.0
    gpu_only: bool = False
    too_slow_to_emulate: bool = False  # beyond the Triton interpreter's / CUDA emulation's budget


SHAPES = [
    # L = 35 and 99 are not multiples of any block size; non-powers-of-two head sizes.
    Shape("cross-8x12", "cross", 8, 12, 5, 7),
    Shape("self-12x20-strided", "self", 12, 20, 9, 11, noncontiguous=True, scale=0.7),
    Shape("independent-16x40-strided", "independent", 16, 40, 5, 7, noncontiguous=True, scale=1.3),
    # Dv = 100 is two V chunks under the interpreter (64-wide chunks): the split-V paths.
    Shape("cross-40x100-strided", "cross", 40, 100, 5, 7, noncontiguous=True, scale=0.3),
    # Large score magnitudes (|scale·q·k| up to ~1000): the softmax statistics must keep
    # float32 precision through forward and backward to stay within 2× the reference.
    # (A log2 ↔ ln round trip of the saved lse fails dv here in float32.)
    Shape("large-magnitude-32x32", "self", 32, 32, 5, 7, scale=10.0, qk_std=3.0),
    # A negative scale (the op allows any finite one) turns the order of the scores around:
    # masked columns must still get no weight, and the row maximum is scale·min(q·k).
    Shape("negative-scale-12x20", "cross", 12, 20, 9, 11, scale=-0.6),
    # The paper's DSA layers 12 and 14 (docs/design.md §2), lightly: one batch of every hole kind.
    # More than one query block and key block of PyTorch's CPU flash kernels (cpu backend).
    Shape("cross-24x32-16x128-strided", "cross", 16, 128, 24, 32, noncontiguous=True,
          too_slow_to_emulate=True),
    Shape("paper-16x16-64x512", "cross", 64, 512, 16, 16, gpu_only=True),
    Shape("paper-64x64-16x128", "self", 16, 128, 64, 64, noncontiguous=True, gpu_only=True),
]
def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _skip_reason(backend: str, dtype: torch.dtype, shape: Shape | None = None) -> str | None:
    """Why this (backend, dtype, shape) cannot run on this machine, or None."""
    reason = dsa_ops.backend_unavailable_reason(backend, DEVICE)
    if reason is not None:
        return f"{backend} unavailable: {reason}"
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        # The interpreter's own bfloat16 tl.dot multiplies raw bits; the harness widens
        # bfloat16 operands to float32 inside it (tests/triton_interpreter.py).
        reason = install_bfloat16_dot()
        if reason is not None:
            return f"bfloat16 under the Triton interpreter: {reason}"
    if shape is not None and shape.gpu_only and DEVICE.type != "cuda":
        return "paper-sized shape: too slow for the CPU, runs on a GPU"
    if (shape is not None and shape.too_slow_to_emulate and backend in ("triton", "cuda")
            and DEVICE.type == "cpu"):
        return "too large for the Triton interpreter and the CUDA emulation; runs on a GPU"
    return None


def _skip_unless_runnable(backend, dtype, shape=None):
    reason = _skip_reason(backend, dtype, shape)
    if reason is not None:
        pytest.skip(reason)


def _on_device(case):
    """Move a case to DEVICE keeping the non-contiguous layout of q, k, v (``Tensor.to``
    would make channel slices of a transposed buffer contiguous)."""
    if DEVICE.type == "cpu":
        return case
    if not case.q.is_contiguous():
        packed = torch.cat((case.q, case.k, case.v), dim=2)
        packed = packed.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2)
        case.q, case.k, case.v = packed.split([case.q.shape[2], case.k.shape[2], case.v.shape[2]], 2)
    else:
        case.q, case.k, case.v = (t.to(DEVICE) for t in (case.q, case.k, case.v))
    case.query_mask, case.key_mask, case.grad_out = (
        t.to(DEVICE) for t in (case.query_mask, case.key_mask, case.grad_out))
    return case


def _case(shape: Shape, dtype: torch.dtype, seed: int = 0):
    case = make_case(shape.batch, shape.height, shape.width, shape.qk_dim, shape.v_dim,
                     form=shape.form, dtype=dtype, noncontiguous=shape.noncontiguous,
                     scale=shape.scale, qk_std=shape.qk_std, seed=seed)
    case = _on_device(case)
    assert case.q.is_contiguous() != shape.noncontiguous
    return case


@functools.lru_cache(maxsize=None)
def _results(backend: str, dtype: torch.dtype, shape: Shape):
    """Run the backend's forward op and its registered backward once per combination."""
    case = _case(shape, dtype)
    q, k, v = (t.detach().requires_grad_() for t in (case.q, case.k, case.v))
    out, lse, *_ = ops.get_backend(backend).forward(q, k, v, case.query_mask, case.key_mask,
                                                    case.scale)
    out.backward(case.grad_out)
    exact = reference_results(case, exact=True)
    baseline = reference_results(case, exact=False)
    return dict(case=case, out=out.detach(), lse=lse, grads=(q.grad, k.grad, v.grad),
                exact=exact, baseline=baseline)


def _matrix():
    """(backend, dtype, shape) for every dtype the backend supports; combinations this
    machine cannot run carry their skip reason as a mark."""
    params = []
    for backend in ops.BACKENDS:
        for dtype in ops.get_backend(backend).dtypes:
            for shape in SHAPES:
                reason = _skip_reason(backend, dtype, shape)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                params.append(pytest.param(backend, dtype, shape, marks=marks,
                                           id=f"{backend}-{_dtype_name(dtype)}-{shape.name}"))
    return params


MATRIX = _matrix()


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_forward_matches_float64_reference(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    assert run["out"].dtype == dtype
    assert_close_by_dtype(run["out"], run["exact"][0], run["baseline"][0], "out")


@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_gradients_match_float64_reference(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    assert_gradients_close_by_dtype(("dq", "dk", "dv"), run["grads"], run["exact"][1], run["baseline"][1],
                                    dtype)


@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_lse_is_the_row_log_sum_exp_and_infinite_without_keys(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    case, lse = run["case"], run["lse"]
    assert lse.dtype == reference.accumulation_dtype(dtype)
    has_keys = case.query_mask & case.key_mask.any(dim=1, keepdim=True)
    assert torch.equal(torch.isfinite(lse), has_keys)
    assert (lse[~has_keys] == float("inf")).all()
    exact_lse = reference.forward(*(t.double() for t in case.inputs[:3]), case.query_mask,
                                  case.key_mask, case.scale)[1]
    baseline_lse = reference.forward(*case.inputs, case.scale, upcast=False)[1]
    assert_close_by_dtype(lse[has_keys], exact_lse[has_keys], baseline_lse[has_keys].to(dtype),
                          "lse")


@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_exact_zeros_outside_the_masks(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    case, out = run["case"], run["out"]
    grad_q, grad_k, grad_v = run["grads"]
    for name, tensor in (("out", out), ("dq", grad_q), ("dk", grad_k), ("dv", grad_v)):
        assert not tensor.isnan().any(), f"{name} has NaN"
    assert (out[~case.query_mask] == 0).all()
    no_keys = ~case.key_mask.any(dim=1)
    assert (out[no_keys] == 0).all(), "queries of samples without keys must give 0"
    assert (grad_q[~case.query_mask] == 0).all()
    assert (grad_q[no_keys] == 0).all()
    assert (grad_k[~case.key_mask] == 0).all()
    assert (grad_v[~case.key_mask] == 0).all()
    no_queries = ~case.query_mask.any(dim=1)
    assert (grad_k[no_queries] == 0).all() and (grad_v[no_queries] == 0).all()
    # The cases must exercise what they claim: empty and full holes in every batch.
    if shape.form in ("cross", "self"):
        assert no_queries.any()
    if shape.form == "cross":
        assert no_keys.any()


# ----------------------------------------------------------------------------- API paths
BACKEND_FLOAT32 = [pytest.param(b, marks=[pytest.mark.skip(reason=r)] if r else [], id=b)
                   for b in ops.BACKENDS for r in [_skip_reason(b, torch.float32)]]


@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_return_attention_gives_the_reference_map(backend):
    case = _case(SHAPES[1], torch.float32, seed=3)
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    out, attn = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask,
                                         scale=case.scale, return_attention=True, backend=backend)
    plain = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                                     backend=backend)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    expected = reference.attention_probs(q.double(), k.double(), case.query_mask, case.key_mask,
                                         case.scale)
    batch, length = case.query_mask.shape
    assert attn.shape == (batch, length, length)
    torch.testing.assert_close(attn, expected.float(), rtol=1e-5, atol=1e-6)
    # The map is differentiable with respect to q and k (the oracle KL loss needs it).
    grad_q, grad_k = torch.autograd.grad(attn.square().sum(), (q, k))
    assert grad_q.abs().sum() > 0 and grad_k.abs().sum() > 0


def _opcheck_utils():
    # Under the interpreter torch.library.wrap_triton hands back the plain interpreted
    # kernel (it has no JIT metadata to trace), so test_aot_dispatch_dynamic, which traces
    # the triton_op body with fake tensors, would run the interpreter on data-less
    # tensors. The other checks exercise the real kernel and the fake impl.
    if INTERPRETED:
        return ("test_schema", "test_autograd_registration", "test_faketensor")
    return None  # all


@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_opcheck_forward_and_backward_ops(backend):
    case = _case(SHAPES[2], torch.float32, seed=5)
    fwd_name, bwd_name = registry.op_names("masked_attention", backend)
    test_utils = _opcheck_utils() if backend == "triton" else None
    options = {} if test_utils is None else {"test_utils": test_utils}
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    torch.library.opcheck(getattr(torch.ops.dsa_ops, fwd_name).default,
                          (q, k, v, case.query_mask, case.key_mask, case.scale), **options)
    out, lse, *partitions = getattr(torch.ops.dsa_ops, fwd_name)(*case.inputs, case.scale)
    torch.library.opcheck(getattr(torch.ops.dsa_ops, bwd_name).default,
                          (case.grad_out, *case.inputs[:3], out, lse, case.query_mask,
                           case.key_mask, *partitions, case.scale), **options)


@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_forward_returns_the_partitions_its_backward_reads(backend):
    """The forward's partitions are the masks' (``partition_indices``), and the fused
    backends' backward works from the partitions it is handed, not from the masks: given
    another mask's partition, it computes that mask's gradients (the reference, which
    works on masks, is the exception)."""
    _skip_unless_runnable(backend, torch.float32)
    case, other = _case(SHAPES[2], torch.float32, seed=5), _case(SHAPES[2], torch.float32, seed=6)
    fwd, bwd = (getattr(torch.ops.dsa_ops, name) for name in registry.op_names("masked_attention", backend))
    out, lse, *partitions = fwd(*case.inputs, case.scale)
    expected = [*reference.partition_indices(case.query_mask.cpu()),
                *reference.partition_indices(case.key_mask.cpu())]
    assert all(torch.equal(got.cpu(), want) for got, want in zip(partitions, expected))
    other_partitions = [*ops.partition_indices(other.query_mask), *ops.partition_indices(other.key_mask)]
    saved = (case.grad_out, *case.inputs[:3], out, lse)
    from_partitions = bwd(*saved, case.query_mask, case.key_mask, *other_partitions, case.scale)
    from_masks = bwd(*saved, other.query_mask, other.key_mask, *other_partitions, case.scale)
    reads = from_masks if backend != "reference" else bwd(*saved, *case.inputs[3:], *partitions,
                                                          case.scale)
    assert all(torch.equal(a, b) for a, b in zip(from_partitions, reads))


@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_torch_compile_fullgraph_smoke(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("torch.compile traces the triton_op body, which the Triton interpreter "
                    "cannot run on fake tensors; compiled triton is tested on the GPU")
    case = _case(SHAPES[0], torch.float32, seed=7)
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])

    def loss_fn(q, k, v, query_mask, key_mask):
        out, attn = dsa_ops.masked_attention(q, k, v, query_mask, key_mask, scale=0.5,
                                             return_attention=True, backend=backend)
        return out.square().sum() + attn.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True,
                             backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    loss = compiled(q, k, v, case.query_mask, case.key_mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = loss_fn(q, k, v, case.query_mask, case.key_mask)
    expected_grads = torch.autograd.grad(expected_loss, (q, k, v))
    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected)


# ----------------------------------------------------------------------------- triton only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backward_is_deterministic(dtype):
    _skip_unless_runnable("triton", dtype)
    case = _case(SHAPES[3], dtype, seed=9)
    runs = []
    for _ in range(2):
        q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
        out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask,
                                       scale=case.scale, backend="triton")
        out.backward(case.grad_out)
        runs.append((q.grad, k.grad, v.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_auto_picks_triton_on_cuda_without_the_cuda_backend():
    if DEVICE.type != "cuda":
        pytest.skip("needs CUDA tensors: 'auto' only picks fused backends on CUDA")
    _skip_unless_runnable("triton", torch.float16)
    case = _case(SHAPES[0], torch.float16)
    expected = "cuda" if dsa_ops.backend_unavailable_reason("cuda", DEVICE) is None else "triton"
    assert ops.resolve_backend("auto", case.q, case.v).name == expected


# ----------------------------------------------------------------------------- non-finite and edges
# One rule for every backend (the op's docstring, "Non-finite values and edge cases"):
# a non-finite value in a query's row or in one of its keys' rows gives non-finite output
# for that query only; rows that are neither query nor key affect nothing; B = 0 and
# L = 0 work; a second derivative is exact on the reference and refused elsewhere.
def _edge_case():
    """B = 2, L = 12, float32 on DEVICE. Sample 0: queries 0..3, keys 4..8; sample 1:
    queries 0..4, keys 5..9. Rows 9..11 / 10..11 are neither. The counts differ a little,
    so the cpu backend runs both samples as one padded call (padding slots read rows that
    are neither)."""
    generator = torch.Generator().manual_seed(8)
    q, k, v, grad_out = (torch.randn(2, 12, 8, generator=generator) for _ in range(4))
    query_mask = torch.zeros(2, 12, dtype=torch.bool)
    key_mask = torch.zeros(2, 12, dtype=torch.bool)
    query_mask[0, :4], key_mask[0, 4:9] = True, True
    query_mask[1, :5], key_mask[1, 5:10] = True, True
    return [t.to(DEVICE) for t in (q, k, v, query_mask, key_mask, grad_out)]


def _run(backend, q, k, v, query_mask, key_mask, grad_out):
    """``(out, (dq, dk, dv))`` of ``dsa_ops.masked_attention`` on ``backend``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = dsa_ops.masked_attention(q, k, v, query_mask, key_mask, scale=0.5, backend=backend)
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def _rows_nonfinite(t):
    return ~torch.isfinite(t).all(dim=-1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["query-q", "key-k", "key-v"])
@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_a_nonfinite_query_or_key_row_makes_only_its_queries_nonfinite(backend, where, value):
    q, k, v, query_mask, key_mask, grad_out = _edge_case()
    clean, _ = _run(backend, q, k, v, query_mask, key_mask, grad_out)
    poisoned = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    row = 1 if where == "query-q" else 6  # a query row, or a key row, of sample 0
    poisoned[where[-1]][0, row, 3] = value
    out, _ = _run(backend, poisoned["q"], poisoned["k"], poisoned["v"], query_mask, key_mask,
                  grad_out)
    affected = torch.zeros_like(query_mask)
    if where == "query-q":
        affected[0, row] = True
    else:
        affected[0] = query_mask[0]  # every query of the sample attends to that key
    nonfinite = _rows_nonfinite(out)
    if where == "key-k" and value == float("inf"):
        # The one latitude: where the infinity makes a score -inf (q₃ < 0), softmax may give
        # that key weight 0 and the query stays finite (the reference and triton do; the
        # cpu kernel gives NaN). Where it makes the score +inf (q₃ > 0), the output is
        # non-finite everywhere.
        must = affected & (q[:, :, 3] > 0)
        assert must.any() and (affected & ~must).any()
        assert torch.equal(nonfinite & must, must) and torch.equal(nonfinite & ~affected,
                                                                   torch.zeros_like(affected))
    else:
        assert torch.equal(nonfinite, affected)
    torch.testing.assert_close(out[~affected], clean[~affected], rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_values_at_positions_that_are_neither_query_nor_key_affect_nothing(backend, value):
    q, k, v, query_mask, key_mask, grad_out = _edge_case()
    clean_out, clean_grads = _run(backend, q, k, v, query_mask, key_mask, grad_out)
    neither = ~(query_mask | key_mask)
    poisoned = [t.masked_fill(neither.unsqueeze(-1), value) for t in (q, k, v, grad_out)]
    # grad_out is also ignored on key-only rows (they are no query).
    poisoned[3] = grad_out.masked_fill((~query_mask).unsqueeze(-1), value)
    out, grads = _run(backend, *poisoned[:3], query_mask, key_mask, poisoned[3])
    torch.testing.assert_close(out, clean_out, rtol=0, atol=0)
    for grad, clean in zip(grads, clean_grads):
        torch.testing.assert_close(grad, clean, rtol=0, atol=0)


@pytest.mark.parametrize("batch, length", [(0, 12), (2, 0), (0, 0)])
@pytest.mark.parametrize("backend", BACKEND_FLOAT32)
def test_empty_batch_and_length_work_forward_and_backward(backend, batch, length):
    q, k, v, grad_out = (torch.randn(batch, length, 8, device=DEVICE) for _ in range(4))
    masks = [torch.ones(batch, length, dtype=torch.bool, device=DEVICE)] * 2
    out, grads = _run(backend, q, k, v, *masks, grad_out)
    assert out.shape == (batch, length, 8)
    assert all(grad.shape == (batch, length, 8) for grad in grads)
    out_cross, out_self = dsa_ops.dual_masked_attention(q, k, v, q, k, v, masks[0], backend=backend)
    assert out_cross.shape == out_self.shape == (batch, length, 8)


def _double_backward_case(dtype):
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 6, 8, generator=generator, dtype=dtype).to(DEVICE) for _ in range(3))
    query_mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    key_mask = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    return q, k, v, query_mask.to(DEVICE), key_mask.to(DEVICE)


def test_double_backward_is_exact_on_the_reference():
    """gradgradcheck in float64 (the backward op's formula treats the saved lse as a
    constant, so a second derivative through it would be about 40 % off)."""
    q, k, v, query_mask, key_mask = _double_backward_case(torch.float64)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def attention(q, k, v):
        return dsa_ops.masked_attention(q, k, v, query_mask, key_mask, scale=0.7,
                                        backend="reference")

    def both_branches(q, k, v):
        return dsa_ops.dual_masked_attention(q, k, v, k, q, v, query_mask, scale=0.7,
                                             backend="reference")

    assert torch.autograd.gradgradcheck(attention, inputs)
    assert torch.autograd.gradgradcheck(both_branches, inputs)


@pytest.mark.parametrize("backend", [b for b in BACKEND_FLOAT32 if b.values[0] != "reference"])
def test_double_backward_is_refused_naming_the_backend_off_the_reference(backend):
    q, k, v, query_mask, key_mask = _double_backward_case(torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = dsa_ops.masked_attention(*inputs, query_mask, key_mask, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    # The first derivatives themselves are the backend's usual ones.
    plain = [t.detach().requires_grad_() for t in inputs]
    out = dsa_ops.masked_attention(*plain, query_mask, key_mask, backend=backend)
    for grad, expected in zip(grads, torch.autograd.grad(out.square().sum(), plain)):
        torch.testing.assert_close(grad.detach(), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"'{backend}' backend computes first derivatives only"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
