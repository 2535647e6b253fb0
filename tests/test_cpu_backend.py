"""What the shared backend suite does not reach on the ``cpu`` backend: how samples are
grouped into padded calls, the dual op, and the module and ``auto`` choosing it.

Values are checked against the float64 reference with the suite's tolerances
(``tests/attention_cases.py``); the shared suite (tests/test_backends.py) covers the
single-branch op over every dtype, hole kind and layout.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsa_ops
from dsa_ops import ops
from dsa_ops.ops.masked_attention import cpu as cpu_backend
from tests.attention_cases import Case, assert_close_by_dtype, reference_results

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def test_plan_groups_batches_similar_samples_and_leaves_out_empty_ones():
    # Equal holes: one call for the whole batch.
    assert cpu_backend.plan_groups([10, 10, 10], [30, 30, 30]) == [[0, 1, 2]]
    # Samples without queries or keys run nowhere; 1 and 3 are alike, 4 is far larger.
    groups = cpu_backend.plan_groups([0, 10, 5, 11, 40], [30, 30, 0, 29, 80])
    assert groups == [[1, 3], [4]]
    # Padding beyond the allowed waste splits the batch, sorted by work.
    assert cpu_backend.plan_groups([4, 40], [4, 40]) == [[0], [1]]
    assert cpu_backend.plan_groups([], []) == []


def test_partition_slots_pad_with_distinct_rows_of_the_other_side():
    mask = torch.tensor([[True, False, True, False, False],
                         [False, False, False, False, True]])
    index, count = dsa_ops.partition_indices(mask)
    fg = cpu_backend.partition_slots(index, count, True)
    bg = cpu_backend.partition_slots(index, count, False)
    assert fg.counts == [2, 1] and bg.counts == [3, 4]
    assert fg.positions.tolist() == [[0, 2], [4, 0]]
    assert fg.valid.tolist() == [[True, True], [True, False]]
    assert bg.positions.tolist() == [[1, 3, 4, 0], [0, 1, 2, 3]]
    assert bg.valid.tolist() == [[True, True, True, False], [True, True, True, True]]
    for slots in (fg, bg):  # distinct rows per sample: scattering back is deterministic
        assert all(len(set(row)) == len(row) for row in slots.positions.tolist())


def _holes_case(sizes, height=20, width=24, qk_dim=16, v_dim=40, dtype=torch.float32, seed=0):
    """Cross-branch case whose samples have rectangular holes of the given (h, w) sizes."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = len(sizes), height * width
    holes = torch.zeros(batch, height, width, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        holes[b, 2:2 + h, 3:3 + w] = True
    holes = holes.flatten(1)
    packed = torch.randn(batch, 2 * qk_dim + v_dim, length, generator=generator).transpose(1, 2)
    q, k, v = packed.to(dtype).split([qk_dim, qk_dim, v_dim], dim=2)
    grad_out = torch.randn(batch, length, v_dim, generator=generator).to(dtype)
    return Case(q, k, v, holes, ~holes, grad_out, qk_dim ** -0.5)


def _assert_cpu_matches_the_float64_reference(case):
    """Output and gradients of the cpu backend within the suite's tolerances of the float64
    reference; gradients exactly 0 outside the query (dq) and key (dk, dv) positions."""
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    out = dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                                   backend="cpu")
    out.backward(case.grad_out)
    exact, baseline = reference_results(case, exact=True), reference_results(case, exact=False)
    assert_close_by_dtype(out, exact[0], baseline[0], "out")
    for name, grad, exact_grad, baseline_grad in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad),
                                                     exact[1], baseline[1]):
        assert_close_by_dtype(grad, exact_grad, baseline_grad, name)
        assert (grad[~(case.key_mask if name != "dq" else case.query_mask)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("sizes, calls", [
    ([(8, 8)] * 3, 1),                 # equal holes: one call, no padding
    ([(8, 8), (8, 9), (9, 8)], 1),     # nearly equal: one call with padded query and key slots
    ([(2, 3), (12, 15), (8, 9)], 3),   # far apart: one call each
], ids=["equal", "padded", "apart"])
def test_grouped_calls_match_the_float64_reference(sizes, calls, dtype):
    case = _holes_case(sizes, dtype=dtype)
    queries, keys = (cpu_backend.mask_slots(m) for m in (case.query_mask, case.key_mask))
    assert len(cpu_backend.plan_groups(queries.counts, keys.counts)) == calls
    _assert_cpu_matches_the_float64_reference(case)


@pytest.fixture
def four_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sizes", [[(3, 5)], [(8, 8), (7, 9), (2, 3)]], ids=["one", "groups"])
def test_backward_splits_16_bit_queries_across_threads(sizes, dtype, four_threads):
    """With more threads than samples in a call, the 16-bit backward splits each sample's
    queries into chunks (extra heads, here 15 queries in 4 chunks: padded rows too)."""
    case = _holes_case(sizes, dtype=dtype)
    queries, keys = (cpu_backend.mask_slots(m) for m in (case.query_mask, case.key_mask))
    groups = cpu_backend.plan_groups(queries.counts, keys.counts)
    assert cpu_backend.query_chunks(len(groups[0]), queries.counts[groups[0][0]]) > 1
    q, k, v = (t.detach().requires_grad_() for t in case.inputs[:3])
    dsa_ops.masked_attention(q, k, v, case.query_mask, case.key_mask, scale=case.scale,
                             backend="cpu").backward(case.grad_out)
    exact, baseline = reference_results(case, exact=True), reference_results(case, exact=False)
    for name, grad, exact_grad, baseline_grad in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad),
                                                     exact[1], baseline[1]):
        assert_close_by_dtype(grad, exact_grad, baseline_grad, name)


@pytest.mark.parametrize("samples, queries, keys", [
    (3, 100, 50_000),   # wide keys: one sample per tile, MIN_TILE_ROWS rows, a short last tile
    (2, 1024, 3072),    # layer 14's cross branch: row tiles of one sample
    (16, 64, 192),      # a small map: every sample in one tile
    (40, 300, 500),     # several samples per tile, a short last tile
    (1, 0, 10), (2, 5, 0),
])
def test_score_tiles_cover_the_block_once_within_the_cache_budget(samples, queries, keys):
    tiles = cpu_backend.score_tiles(samples, queries, keys)
    covered = torch.zeros(samples, queries, dtype=torch.int64)
    for tile, rows in tiles:
        covered[tile, rows] += 1
        tile_samples = 1 if isinstance(tile, int) else tile.stop - tile.start
        tile_rows = rows.stop - rows.start
        if tile_rows < queries:  # a row tile holds one sample, as a 2-D GEMM
            assert isinstance(tile, int)
        assert (tile_samples * tile_rows * keys * 4 <= cpu_backend.SCORE_TILE_BYTES
                or tile_rows <= cpu_backend.MIN_TILE_ROWS)
    assert (covered == 1).all()


def _large_scores_case(sizes, seed=0):
    """Cross-branch case at score magnitudes near 10³ (scale 10, q/k std 3), where a backward
    that recomputed the scores with another rounding than the forward's would put dV far
    beyond the reference's own error."""
    case = _holes_case(sizes, seed=seed)
    return Case(3 * case.q, 3 * case.k, case.v, case.query_mask, case.key_mask, case.grad_out, 10.0)


@pytest.mark.parametrize("tiling", ["whole", "samples", "rows"])
@pytest.mark.parametrize("sizes", [[(8, 8), (8, 9), (9, 8)], [(12, 15)] * 3], ids=["padded", "equal"])
def test_float32_tiles_match_the_float64_reference(sizes, tiling, monkeypatch):
    """Every tiling of the float32 path — the whole group in one tile, several samples per
    tile with a short last one, row tiles of one sample with a short last one — on padded and
    unpadded groups, forward and backward."""
    case = _large_scores_case(sizes)
    queries, keys = (cpu_backend.mask_slots(m) for m in (case.query_mask, case.key_mask))
    (group,) = cpu_backend.plan_groups(queries.counts, keys.counts)
    nq, nk = max(queries.counts), max(keys.counts)
    tile_floats = {"whole": 3 * nq * nk, "samples": 2 * nq * nk, "rows": nk * (nq // 3 + 1)}[tiling]
    monkeypatch.setattr(cpu_backend, "SCORE_TILE_BYTES", 4 * tile_floats)
    monkeypatch.setattr(cpu_backend, "MIN_TILE_ROWS", 8)
    tiles = cpu_backend.score_tiles(len(group), nq, nk)
    expected = {"whole": [(slice(0, 3), slice(0, nq))],
                "samples": [(slice(0, 2), slice(0, nq)), (slice(2, 3), slice(0, nq))],
                "rows": [(b, slice(r, min(r + nq // 3 + 1, nq))) for b in range(3)
                         for r in range(0, nq, nq // 3 + 1)]}[tiling]
    assert tiles == expected and len(group) == 3
    _assert_cpu_matches_the_float64_reference(case)


@pytest.mark.parametrize("layout", ["channels-first", "length-major"])
def test_any_strides_give_the_contiguous_result(layout):
    """Channel slices of a (B, C, L) map (the module's layout) and (L, B, D) buffers seen
    as (B, L, D) take other gather paths than contiguous rows; the results are the same."""
    case = _holes_case([(8, 8), (3, 4), (8, 9)])
    if layout == "length-major":
        q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in case.inputs[:3])
    else:
        q, k, v = case.inputs[:3]  # _holes_case slices a (B, C, L) map
    assert q.stride(1) != q.shape[2] and not q.is_contiguous()
    contiguous = [t.contiguous().requires_grad_() for t in (q, k, v)]
    strided = [t.detach().requires_grad_() for t in (q, k, v)]
    for leaves in (contiguous, strided):
        dsa_ops.masked_attention(*leaves, case.query_mask, case.key_mask, scale=case.scale,
                                 backend="cpu").backward(case.grad_out)
    for a, b in zip(contiguous, strided):
        assert torch.equal(a.grad, b.grad)


def _dual_inputs(dtype=torch.float32, seed=0):
    cross = _holes_case([(8, 8), (8, 9), (0, 0), (20, 24)], dtype=dtype, seed=seed)
    self_ = _holes_case([(8, 8), (8, 9), (0, 0), (20, 24)], dtype=dtype, seed=seed + 1)
    return cross, self_, cross.query_mask


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_dual_op_equals_two_single_ops(dtype):
    cross, self_, foreground = _dual_inputs(dtype)
    branches = {"cross": (cross, ~foreground), "self": (self_, foreground)}
    dual_leaves = {name: [t.detach().requires_grad_() for t in case.inputs[:3]]
                   for name, (case, _) in branches.items()}
    outputs = torch.ops.dsa_ops.dual_masked_attention_fwd_cpu(
        *dual_leaves["cross"], *dual_leaves["self"], foreground, cross.scale)
    dual = {"cross": outputs[:2], "self": outputs[2:4]}
    torch.autograd.backward((dual["cross"][0], dual["self"][0]), (cross.grad_out, self_.grad_out))
    for name, (case, key_mask) in branches.items():
        leaves = [t.detach().requires_grad_() for t in case.inputs[:3]]
        single = torch.ops.dsa_ops.masked_attention_fwd_cpu(*leaves, foreground, key_mask, case.scale)
        single[0].backward(case.grad_out)
        # The same slots and kernel calls as the single op: (out, lse) and grads bitwise equal.
        assert all(torch.equal(a, b) for a, b in zip(dual[name], single)), name
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(dual_leaves[name], leaves)), name


def test_dual_ops_pass_opcheck():
    cross, self_, foreground = _dual_inputs()
    inputs = [t.detach().requires_grad_() for c in (cross, self_) for t in (c.q, c.k, c.v)]
    torch.library.opcheck(torch.ops.dsa_ops.dual_masked_attention_fwd_cpu.default,
                          (*inputs, foreground, cross.scale))
    outputs = torch.ops.dsa_ops.dual_masked_attention_fwd_cpu(*inputs, foreground, cross.scale)
    torch.library.opcheck(torch.ops.dsa_ops.dual_masked_attention_bwd_cpu.default,
                          (cross.grad_out, self_.grad_out, *(t.detach() for t in inputs),
                           *(t.detach() for t in outputs[:4]), foreground, *outputs[4:],
                           cross.scale))


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_module_on_cpu_tensors_runs_the_cpu_dual_op_by_default():
    module = dsa_ops.DualSpatialAttention(16)
    reference_module = dsa_ops.DualSpatialAttention(16, backend="reference")
    reference_module.load_state_dict(module.state_dict())
    for m in (module, reference_module):
        with torch.no_grad():
            m.alpha.fill_(0.7)
            m.beta.fill_(-0.3)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    hole = torch.zeros(2, 1, 12, 12)
    hole[0, :, 3:9, 2:7] = 1
    hole[1, :, 1:4, 5:11] = 1
    with _OpRecorder() as recorder:
        y = module(x, hole)
        y.square().sum().backward()
    assert "dsa_ops::dual_masked_attention_fwd_cpu" in recorder.names
    assert "dsa_ops::dual_masked_attention_bwd_cpu" in recorder.names
    grad = x.grad.clone()
    x.grad = None
    expected = reference_module(x, hole)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, x.grad, atol=1e-4, rtol=1e-4)


def test_dual_op_compiles_fullgraph():
    cross, self_, foreground = _dual_inputs()
    leaves = [t.detach().requires_grad_() for c in (cross, self_) for t in (c.q, c.k, c.v)]

    def loss_fn(*qkv):
        out_cross, out_self = dsa_ops.dual_masked_attention(*qkv, foreground, scale=0.5,
                                                            backend="cpu")
        return out_cross.square().sum() + out_self.square().sum()

    torch._dynamo.reset()
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    expected = loss_fn(*leaves)
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(grad, expected_grad)


def test_cpu_backend_rejects_float64_and_other_devices():
    case = _holes_case([(4, 4)], dtype=torch.float64)
    with pytest.raises(ValueError, match="backend 'cpu'.*float64"):
        dsa_ops.masked_attention(*case.inputs, backend="cpu")
    reason = ops.backend_unavailable_reason("cpu", "meta")
    assert reason is not None and "CPU tensors" in reason
