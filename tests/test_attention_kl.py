"""``dsa_ops.attention_kl``: every backend against the dense float64 KL, gradients, the op contract.

The ground truth is ``dense_kl``: the (B, L, L) maps of both passes in float64 through
plain autograd. Backends are compared with FlashAttention-style tolerances
(``attention_cases.assert_close_by_dtype``: at most 2× the error of the reference run
entirely in the input dtype, plus a floor). Cases come from ``attention_cases.make_case``,
so every batch holds a rectangular, a random, an empty and a full hole; the oracle pass
has the same masks and its own q, k.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

import dsa_ops
from dsa_ops import extension, ops, reference
from dsa_ops.ops import registry
from tests.attention_cases import assert_close_by_dtype, assert_gradients_close_by_dtype, make_case

INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- ground truth
def dense_kl(q, k, q_oracle, k_oracle, query_mask, key_mask, scale):
    """KL(E_oracle‖E) per row from dense log-probabilities (O(L²)); differentiable, never NaN."""
    pairs = query_mask.unsqueeze(2) & key_mask.unsqueeze(1)
    has_pairs = pairs.any(dim=-1, keepdim=True)

    def log_probs(q, k):
        scores = torch.where(pairs, scale * q @ k.transpose(1, 2), float("-inf"))
        scores = torch.where(has_pairs, scores, 0)  # rows without keys: no -inf logsumexp
        return torch.where(pairs, scores - scores.logsumexp(dim=-1, keepdim=True), 0)

    log_p, log_p_oracle = log_probs(q, k), log_probs(q_oracle, k_oracle)
    return torch.where(pairs, log_p_oracle.exp() * (log_p_oracle - log_p), 0).sum(dim=-1)


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    form: str
    qk_dim: int
    height: int
    width: int
    noncontiguous: bool = False
    scale: float | None = None
    logit_gap: float | None = None  # rescale so each pass's scores span about this much


SHAPES = [
    Shape("cross-8", "cross", 8, 5, 7),
    Shape("self-12-strided", "self", 12, 9, 11, noncontiguous=True, scale=0.7),
    Shape("independent-40-strided", "independent", 40, 5, 7, noncontiguous=True, scale=1.3),
    # Probabilities down to e^-20 / e^-40: log(clamp(p, 1e-12)) would be wrong at 40.
    Shape("cross-16-gap20", "cross", 16, 6, 6, logit_gap=20.0),
    Shape("independent-16-gap40-strided", "independent", 16, 6, 6, noncontiguous=True,
          logit_gap=40.0),
]


@dataclasses.dataclass
class KLCase:
    q: torch.Tensor
    k: torch.Tensor
    q_oracle: torch.Tensor
    k_oracle: torch.Tensor
    query_mask: torch.Tensor
    key_mask: torch.Tensor
    grad_kl: torch.Tensor
    scale: float

    @property
    def inputs(self):
        return self.q, self.k, self.q_oracle, self.k_oracle, self.query_mask, self.key_mask

    def to(self, dtype):
        return dataclasses.replace(self, **{name: getattr(self, name).to(dtype) for name in
                                            ("q", "k", "q_oracle", "k_oracle", "grad_kl")})


def kl_case(shape: Shape, dtype=torch.float32, seed: int = 0) -> KLCase:
    """Prediction and oracle q, k (their own draws; the same masks) of ``shape``."""
    options = dict(qk_dim=shape.qk_dim, v_dim=4, form=shape.form, dtype=dtype,
                   noncontiguous=shape.noncontiguous, scale=shape.scale)
    prediction = make_case(4, shape.height, shape.width, seed=seed, **options)
    oracle = make_case(4, shape.height, shape.width, seed=seed + 1000, **options)
    scale = prediction.scale
    if shape.logit_gap is not None:
        # Unit-variance q·k has a range of a few √Dqk: stretch it to the gap.
        scale = shape.logit_gap / (4 * shape.qk_dim ** 0.5)
    generator = torch.Generator().manual_seed(seed + 2000)
    grad_kl = torch.randn(prediction.query_mask.shape, generator=generator).to(dtype)
    return KLCase(prediction.q, prediction.k, oracle.q, oracle.k, prediction.query_mask,
                  prediction.key_mask, grad_kl, scale)


def reference_kl(case: KLCase, *, exact: bool):
    """``(kl, (dq, dk))`` of the reference: float64, or entirely in the input dtype."""
    run = case.to(torch.float64) if exact else case
    kl, lse, lse_oracle = reference.attention_kl_forward(*run.inputs, run.scale, upcast=exact)
    grads = reference.attention_kl_backward(run.grad_kl, *run.inputs[:4], lse, lse_oracle,
                                            run.query_mask, run.key_mask, run.scale, upcast=exact)
    return kl, grads


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _skip_reason(backend: str) -> str | None:
    reason = ops.get_kl_backend(backend).unavailable_reason(torch.device("cpu"))
    return None if reason is None else f"{backend} unavailable: {reason}"


def _matrix():
    params = []
    for backend in ops.KL_BACKENDS:
        reason = _skip_reason(backend)
        for dtype in ops.get_kl_backend(backend).dtypes:
            for shape in SHAPES:
                params.append(pytest.param(backend, dtype, shape,
                                           marks=[pytest.mark.skip(reason=reason)] if reason else [],
                                           id=f"{backend}-{_dtype_name(dtype)}-{shape.name}"))
    return params


MATRIX = _matrix()
BACKENDS = [pytest.param(b, marks=[pytest.mark.skip(reason=r)] if r else [], id=b)
            for b in ops.KL_BACKENDS for r in [_skip_reason(b)]]


@functools.lru_cache(maxsize=None)
def _results(backend: str, dtype: torch.dtype, shape: Shape):
    """The backend through the public API and autograd, once per combination."""
    case = kl_case(shape, dtype)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
    kl = dsa_ops.attention_kl(q, k, case.q_oracle, case.k_oracle, case.query_mask, case.key_mask,
                              scale=case.scale, backend=backend)
    kl.backward(case.grad_kl)
    return dict(case=case, kl=kl.detach(), grads=(q.grad, k.grad),
                exact=reference_kl(case, exact=True), baseline=reference_kl(case, exact=False))


# ----------------------------------------------------------------------------- the reference
def test_reference_matches_the_dense_kl_and_its_autograd_in_float64():
    for shape in SHAPES:
        case = kl_case(shape, torch.float64, seed=1)
        q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
        expected = dense_kl(q, k, *case.inputs[2:], case.scale)
        expected_grads = torch.autograd.grad(expected, (q, k), case.grad_kl)
        # A small tile: several query tiles, the last one partial.
        kl, lse, lse_oracle = reference.attention_kl_forward(*case.inputs, case.scale, tile=16)
        grads = reference.attention_kl_backward(case.grad_kl, *case.inputs[:4], lse, lse_oracle,
                                                case.query_mask, case.key_mask, case.scale, tile=16)
        torch.testing.assert_close(kl, expected.detach(), rtol=1e-10, atol=1e-10, msg=shape.name)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10, msg=shape.name)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    case = kl_case(SHAPES[2], torch.float64, seed=2)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))

    def kl(q, k):
        return dsa_ops.attention_kl(q, k, *case.inputs[2:], scale=case.scale, backend=backend)

    assert torch.autograd.gradcheck(kl, (q, k))
    torch.testing.assert_close(kl(q, k), dense_kl(q, k, *case.inputs[2:], case.scale).detach())


# ----------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_kl_matches_float64_dense(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    assert run["kl"].dtype == reference.accumulation_dtype(dtype)
    assert_close_by_dtype(run["kl"], run["exact"][0], run["baseline"][0], "kl")


@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_gradients_match_float64_dense(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    assert_gradients_close_by_dtype(("dq", "dk"), run["grads"], run["exact"][1], run["baseline"][1],
                                    dtype)


@pytest.mark.parametrize("backend, dtype, shape", MATRIX)
def test_exact_zeros_outside_the_masks(backend, dtype, shape):
    run = _results(backend, dtype, shape)
    case, kl = run["case"], run["kl"]
    grad_q, grad_k = run["grads"]
    for name, tensor in (("kl", kl), ("dq", grad_q), ("dk", grad_k)):
        assert not tensor.isnan().any(), f"{name} has NaN"
    no_keys = ~case.key_mask.any(dim=1)
    assert (kl[~case.query_mask] == 0).all() and (kl[no_keys] == 0).all()
    assert (grad_q[~case.query_mask] == 0).all() and (grad_q[no_keys] == 0).all()
    assert (grad_k[~case.key_mask] == 0).all()
    assert (grad_k[~case.query_mask.any(dim=1)] == 0).all()
    if shape.form in ("cross", "self"):  # the batch holds empty and full holes
        assert (~case.query_mask.any(dim=1)).any()
    if shape.form == "cross":
        assert no_keys.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_is_zero_against_itself_and_positive_otherwise(backend):
    case = kl_case(SHAPES[0], seed=3)
    same = dsa_ops.attention_kl(case.q, case.k, case.q, case.k, case.query_mask, case.key_mask,
                                scale=case.scale, backend=backend)
    assert same.abs().max() < 1e-5
    other = dsa_ops.attention_kl(*case.inputs, scale=case.scale, backend=backend)
    rows = case.query_mask & case.key_mask.any(dim=1, keepdim=True)
    assert (other[rows] > 0).all()


def test_large_logit_gap_stays_exact_where_clamped_logs_fail():
    """At a gap of 40 the prediction's probabilities underflow any 1e-12 clamp; the
    streaming formula works with s − lse and keeps the float64 value."""
    case = kl_case(SHAPES[4], torch.float64, seed=4)
    exact = dense_kl(*case.inputs, case.scale)
    kl = dsa_ops.attention_kl(*case.to(torch.float32).inputs, scale=case.scale, backend="cpu")
    torch.testing.assert_close(kl.double(), exact, rtol=1e-4, atol=1e-4)
    probs = reference.attention_probs(case.q, case.k, case.query_mask, case.key_mask, case.scale)
    oracle = reference.attention_probs(case.q_oracle, case.k_oracle, case.query_mask,
                                       case.key_mask, case.scale)
    clamped = (torch.xlogy(oracle, oracle) - oracle * probs.clamp_min(1e-12).log()).sum(-1)
    assert (clamped - exact).abs().max() > 1e-2, "the case must be one clamping gets wrong"


# ----------------------------------------------------------------------------- the op contract
def _opcheck_options(backend):
    # As in test_backends: under the interpreter the triton_op body cannot run on fake tensors.
    if backend == "triton" and INTERPRETED:
        return {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    return {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward_and_backward_ops(backend):
    case = kl_case(SHAPES[1], seed=5)
    fwd_name, bwd_name = registry.op_names("attention_kl", backend)
    fwd, bwd = getattr(torch.ops.dsa_ops, fwd_name), getattr(torch.ops.dsa_ops, bwd_name)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
    torch.library.opcheck(fwd.default, (q, k, *case.inputs[2:], case.scale),
                          **_opcheck_options(backend))
    _, lse, lse_oracle, *partitions = fwd(*case.inputs, case.scale)
    torch.library.opcheck(bwd.default, (case.grad_kl, *case.inputs[:4], lse, lse_oracle,
                                        case.query_mask, case.key_mask, *partitions, case.scale),
                          **_opcheck_options(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_returns_the_partitions_its_backward_reads(backend):
    """Like masked attention, the KL forward returns its masks' partitions and the fused
    backends' backward works from the partitions it is handed, not from the masks: given
    another mask's partition, it computes that mask's gradients (the reference, which
    works on masks, is the exception)."""
    case, other = kl_case(SHAPES[0], seed=11), kl_case(SHAPES[0], seed=12)
    fwd, bwd = (getattr(torch.ops.dsa_ops, name)
                for name in registry.op_names("attention_kl", backend))
    _, lse, lse_oracle, *partitions = fwd(*case.inputs, case.scale)
    expected = [*reference.partition_indices(case.query_mask), *reference.partition_indices(case.key_mask)]
    assert all(torch.equal(got, want) for got, want in zip(partitions, expected))
    other_partitions = [*ops.partition_indices(other.query_mask),
                        *ops.partition_indices(other.key_mask)]
    saved = (case.grad_kl, *case.inputs[:4], lse, lse_oracle)
    from_partitions = bwd(*saved, case.query_mask, case.key_mask, *other_partitions, case.scale)
    from_masks = bwd(*saved, other.query_mask, other.key_mask, *other_partitions, case.scale)
    reads = from_masks if backend != "reference" else bwd(*saved, case.query_mask, case.key_mask,
                                                          *partitions, case.scale)
    assert all(torch.equal(a, b) for a, b in zip(from_partitions, reads))


@pytest.mark.parametrize("batch, length", [(0, 6), (2, 0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_length_work_forward_and_backward(backend, batch, length):
    q, k = (torch.randn(batch, length, 8, requires_grad=True) for _ in range(2))
    mask = torch.ones(batch, length, dtype=torch.bool)
    kl = dsa_ops.attention_kl(q, k, q.detach(), k.detach(), mask, mask, backend=backend)
    kl.sum().backward()
    assert kl.shape == (batch, length) and q.grad.shape == k.grad.shape == (batch, length, 8)


def test_double_backward_is_exact_on_the_reference():
    """gradgradcheck in float64: the saved lse's are constants to autograd, so the backward
    op's formula alone would give a wrong second derivative."""
    case = kl_case(SHAPES[0], torch.float64, seed=13)
    q, k = (t[:2, :9].detach().requires_grad_() for t in (case.q, case.k))
    fixed = [t[:2, :9] for t in case.inputs[2:]]

    def kl(q, k):
        return dsa_ops.attention_kl(q, k, *fixed, scale=case.scale, backend="reference")

    assert torch.autograd.gradgradcheck(kl, (q, k))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_double_backward_is_refused_naming_the_backend_off_the_reference(backend):
    case = kl_case(SHAPES[0], seed=14)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
    kl = dsa_ops.attention_kl(q, k, *case.inputs[2:], scale=case.scale, backend=backend)
    grads = torch.autograd.grad(kl.sum(), (q, k), create_graph=True)
    with pytest.raises(RuntimeError, match=f"'{backend}' backend computes first derivatives only"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("torch.compile traces the triton_op body, which the Triton interpreter "
                    "cannot run on fake tensors; compiled triton is tested on the GPU")
    case = kl_case(SHAPES[0], seed=7)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))

    def loss_fn(q, k, q_oracle, k_oracle, query_mask, key_mask):
        return dsa_ops.attention_kl(q, k, q_oracle, k_oracle, query_mask, key_mask, scale=0.5,
                                    backend=backend).sum()

    torch._dynamo.reset()
    runs = []  # (loss, dq, dk): compiled, then eager
    for fn in (torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), loss_fn):
        loss = fn(q, k, *case.inputs[2:])
        runs.append((loss, *torch.autograd.grad(loss, (q, k))))
    for compiled, eager in zip(*runs):
        torch.testing.assert_close(compiled, eager)


def test_auto_on_cpu_is_the_cpu_backend():
    case = kl_case(SHAPES[0])
    assert ops.resolve_kl_backend("auto", case.q).name == "cpu"
    torch.testing.assert_close(dsa_ops.attention_kl(*case.inputs),
                               dsa_ops.attention_kl(*case.inputs, backend="reference"))


@pytest.mark.skipif(extension.emulation_requested(),
                    reason="the emulated cuda backend takes CPU tensors")
def test_unavailable_backends_say_why():
    case = kl_case(SHAPES[0])
    with pytest.raises(ValueError, match="backend 'cuda' is not available") as info:
        dsa_ops.attention_kl(*case.inputs, backend="cuda")
    reason = ops.get_kl_backend("cuda").unavailable_reason(case.q.device)
    assert reason and reason in str(info.value)
    meta = case.q.to("meta")
    with pytest.raises(ValueError, match="backend 'cpu' is not available.*CPU tensors"):
        ops.resolve_kl_backend("cpu", meta)
    assert ops.resolve_kl_backend("auto", meta).name == "reference"


def _bad(case, **overrides):
    args = dict(q=case.q, k=case.k, q_oracle=case.q_oracle, k_oracle=case.k_oracle,
                query_mask=case.query_mask, key_mask=case.key_mask)
    options = {name: overrides.pop(name) for name in ("scale", "backend") if name in overrides}
    args.update(overrides)
    return dsa_ops.attention_kl(**args, **options)


BAD_INPUTS = [
    (dict(q_oracle="oracle"), TypeError, ["q_oracle", "torch.Tensor"]),
    (dict(k_oracle=torch.randn(4, 35, 4)), ValueError, ["k_oracle", "(4, 35, 8)"]),
    (dict(q_oracle=torch.randn(4, 35, 8, dtype=torch.float64)), TypeError, ["q_oracle", "dtype"]),
    (dict(k_oracle=torch.randn(4, 35, 8, device="meta")), ValueError, ["k_oracle", "meta"]),
    (dict(q_oracle=torch.randn(4, 35, 8, requires_grad=True)), ValueError,
     ["q_oracle", "requires grad", "detach"]),
    (dict(k=torch.randn(4, 35, 6)), ValueError, ["k", "(B, L, Dqk)"]),
    (dict(query_mask=torch.ones(4, 35)), TypeError, ["query_mask", "bool"]),
    (dict(scale=float("inf")), ValueError, ["scale", "finite"]),
    (dict(backend="flash"), ValueError, ["backend", "'flash'", "'cpu'"]),
    (dict(backend=2), TypeError, ["backend", "int"]),
]


@pytest.mark.parametrize("overrides, exception, words", BAD_INPUTS,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_argument_and_expectation(overrides, exception, words):
    case = kl_case(SHAPES[0])
    with pytest.raises(exception) as info:
        _bad(case, **overrides)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_oracle_requiring_grad_is_accepted_without_grad_mode():
    case = kl_case(SHAPES[0])
    oracle = case.q_oracle.detach().requires_grad_()
    with torch.no_grad():
        kl = dsa_ops.attention_kl(case.q, case.k, oracle, case.k_oracle, case.query_mask,
                                  case.key_mask)
    torch.testing.assert_close(kl, dsa_ops.attention_kl(*case.inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_recast_the_op_bodies(dtype):
    """Under CPU autocast (training with --amp) the KL keeps its float32 statistics and
    gives the result and gradients of the same call without autocast."""
    case = make_case(batch=2, height=6, width=5, qk_dim=8, v_dim=8, form="cross", dtype=dtype)
    q, k = (t.detach().requires_grad_() for t in (case.q, case.k))
    q_oracle, k_oracle = torch.randn_like(case.q), torch.randn_like(case.k)
    args = (q_oracle, k_oracle, case.query_mask, case.key_mask)
    expected = dsa_ops.attention_kl(q, k, *args, backend="cpu")
    expected_grads = torch.autograd.grad(expected.sum(), (q, k))
    with torch.autocast("cpu", dtype=dtype):
        got = dsa_ops.attention_kl(q, k, *args, backend="cpu")
        got_grads = torch.autograd.grad(got.sum(), (q, k))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    for grad, reference_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(grad, reference_grad)
