"""Triton backend specifics: the dual-branch op, the GPU tile table, launch counts,
float32 precision settings, grid limits and unsupported GPUs.

The values of the single op are tested by the shared suite (tests/test_backends.py). On
the CPU these run under the Triton interpreter (conftest.py) with the harness's bfloat16
dot (tests/triton_interpreter.py).
"""
from __future__ import annotations

import os
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsa_ops
from dsa_ops import reference
from dsa_ops.ops import registry, triton_common
from dsa_ops.ops.masked_attention import triton as masked_triton
from dsa_ops.ops.partition import triton as partition_triton
from tests.attention_cases import assert_close_by_dtype, hole_masks
from tests.triton_interpreter import install_bfloat16_dot, orientation_sensitive_dot

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(dsa_ops.backend_unavailable_reason("triton", DEVICE) is not None,
                                reason=f"triton unavailable: "
                                       f"{dsa_ops.backend_unavailable_reason('triton', DEVICE)}")
if INTERPRETED:
    assert install_bfloat16_dot() is None


def dual_inputs(batch, height, width, qk_dim, v_dim, dtype, *, seed=0, qk_std=1.0):
    """Both branches as DualSpatialAttention makes them: channel slices of one
    channels-last buffer; grad_outs with unit-stride rows (as autograd hands them over)."""
    generator = torch.Generator().manual_seed(seed)
    length = height * width
    packed = torch.randn(batch, length, 2 * (2 * qk_dim + v_dim), generator=generator)
    for start in (0, 2 * qk_dim + v_dim):
        packed[..., start:start + 2 * qk_dim] *= qk_std
    branches = packed.to(dtype).to(DEVICE).split([qk_dim, qk_dim, v_dim] * 2, dim=2)
    foreground = hole_masks(batch, height, width, generator).to(DEVICE)
    grad_outs = [torch.randn(batch, v_dim, length, generator=generator).to(dtype).to(DEVICE)
                 .transpose(1, 2) for _ in range(2)]
    return branches, foreground, grad_outs


def reference_branches(branches, foreground, grad_outs, scale, *, exact):
    """``[(out, dq, dk, dv) cross, (...) self]`` of the reference, in float64 when ``exact``,
    else entirely in the input dtype (the baseline of the 2× rule)."""
    results = []
    for (q, k, v), grad_out, key_mask in zip((branches[:3], branches[3:]), grad_outs,
                                             (~foreground, foreground)):
        dtype = torch.float64 if exact else q.dtype
        q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
        out, lse = reference.forward(q, k, v, foreground, key_mask, scale, upcast=exact)
        results.append((out, *reference.backward(grad_out, q, k, v, out, lse, foreground,
                                                 key_mask, scale, upcast=exact)))
    return results


def assert_dual_matches_reference(branches, foreground, grad_outs, scale):
    branches = [t.detach().requires_grad_() for t in branches]
    out_cross, _, out_self, *_ = torch.ops.dsa_ops.dual_masked_attention_fwd_triton(
        *branches, foreground, scale)
    torch.autograd.backward((out_cross, out_self), grad_outs)
    exact = reference_branches(branches, foreground, grad_outs, scale, exact=True)
    baseline = reference_branches(branches, foreground, grad_outs, scale, exact=False)
    for name, out, grads, exact_branch, baseline_branch in (
            ("cross", out_cross, [t.grad for t in branches[:3]], exact[0], baseline[0]),
            ("self", out_self, [t.grad for t in branches[3:]], exact[1], baseline[1])):
        for what, actual, expected, base in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                                exact_branch, baseline_branch):
            assert actual.dtype == branches[0].dtype
            assert_close_by_dtype(actual, expected, base, f"{name} {what}")
        assert (out[~foreground] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dual_op_matches_the_reference_on_the_module_layout(dtype):
    branches, foreground, grad_outs = dual_inputs(4, 6, 7, 8, 20, dtype)
    assert_dual_matches_reference(branches, foreground, grad_outs, 0.4)


def test_dual_op_with_branches_of_different_layouts():
    """Branches whose strides differ run as one launch each; same results."""
    branches, foreground, grad_outs = dual_inputs(4, 5, 6, 8, 12, torch.float32, seed=1)
    branches = (*branches[:3], *(t.contiguous() for t in branches[3:]))
    grad_outs = [grad_outs[0], grad_outs[1].contiguous()]
    assert_dual_matches_reference(branches, foreground, grad_outs, 0.7)


def test_dual_op_large_magnitudes_float32():
    branches, foreground, grad_outs = dual_inputs(4, 5, 7, 8, 12, torch.float32, seed=2,
                                                  qk_std=3.0)
    assert_dual_matches_reference(branches, foreground, grad_outs, 10.0)


@pytest.mark.skipif(not INTERPRETED, reason="replaces the interpreter's tl.dot")
def test_backward_recomputes_the_scores_as_the_forward_rounded_them():
    """P = exp(S − lse) is a normalised softmax only if the backward's S rounds exactly as
    the forward's; at |S| ~ 1000 one ulp moves a whole row of P. Under a dot whose rounding
    depends on the operand order, a backward that recomputes S in the other orientation
    (Kᵀ·Qᵀ instead of Q·Kᵀ) gives dV ~25× the float32 reference's error on every machine
    (on OpenBLAS's Haswell kernels the real dot does this; tests/cpu_paths.py)."""
    branches, foreground, grad_outs = dual_inputs(4, 5, 7, 32, 32, torch.float32, seed=2,
                                                  qk_std=3.0)
    with orientation_sensitive_dot():
        assert_dual_matches_reference(branches, foreground, grad_outs, 10.0)


def test_dual_op_passes_opcheck():
    branches, foreground, grad_outs = dual_inputs(2, 4, 5, 8, 12, torch.float32, seed=3)
    utils = ({"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
             if INTERPRETED else {})
    fwd, bwd = (getattr(torch.ops.dsa_ops, name).default for name in registry.op_names("dual_masked_attention", "triton"))
    inputs = [t.detach().requires_grad_() for t in branches]
    torch.library.opcheck(fwd, (*inputs, foreground, 0.5), **utils)
    outputs = fwd(*branches, foreground, 0.5)
    torch.library.opcheck(bwd, (*grad_outs, *branches, *outputs[:4], foreground, *outputs[4:], 0.5),
                          **utils)


# ----------------------------------------------------------------------------- GPU tile table
GPU_TABLE_CASES = [
    # (B, H, W, Dqk, Dv, dtype, form): wide V in several chunks, odd sizes, the paper's
    # layer 14 head sizes; L = 256 holds several 64-/128-row tiles.
    pytest.param(2, 16, 16, 64, 320, torch.float16, "cross", id="fp16-64x320-chunks"),
    pytest.param(2, 16, 16, 16, 128, torch.bfloat16, "self", id="bf16-16x128"),
    pytest.param(2, 13, 11, 24, 72, torch.float32, "cross", id="fp32-24x72-chunks"),
]


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU every test already runs the GPU table")
@pytest.mark.parametrize("batch, height, width, qk_dim, v_dim, dtype, form", GPU_TABLE_CASES)
def test_gpu_tile_table_under_the_interpreter(monkeypatch, batch, height, width, qk_dim, v_dim,
                                              dtype, form):
    monkeypatch.setattr(triton_common, "capability", lambda device: (9, 0))
    branches, foreground, grad_outs = dual_inputs(batch, height, width, qk_dim, v_dim, dtype,
                                                  seed=4)
    if form == "self":
        branches = branches[3:] * 2  # self-attention in both branches' tensors
    assert_dual_matches_reference(branches, foreground, grad_outs, qk_dim ** -0.5)


# ----------------------------------------------------------------------------- launches
class LaunchRecorder:
    """Names the Triton kernels launched (and still runs them)."""

    def __init__(self, monkeypatch):
        self.kernels = []
        wrap = torch.library.wrap_triton

        def recording_wrap(kernel):
            self.kernels.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
            return wrap(kernel)

        monkeypatch.setattr(torch.library, "wrap_triton", recording_wrap)


class TopLevelOps(TorchDispatchMode):
    """The operators a call dispatches at top level that may launch work (views, such as
    autograd's detaches, launch nothing; an op's own body runs unrecorded)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_dsa_layer_is_two_launches_forward_and_reuses_its_partition_backward(monkeypatch):
    """One DSA module call at 16² (the paper's layer 14, channels cut for the interpreter):
    the attention is one partition launch and one forward launch for both branches; the
    backward reuses the forward's partition (three kernels, no partition launch)."""
    torch.manual_seed(0)
    module = dsa_ops.DualSpatialAttention(16, backend="triton").to(DEVICE)
    with torch.no_grad():
        module.alpha.fill_(0.5)
        module.beta.fill_(0.5)
    x = torch.randn(2, 16, 16, 16, device=DEVICE)
    hole = torch.zeros(2, 1, 16, 16, device=DEVICE)
    hole[:, :, 4:12, 3:11] = 1
    recorder = LaunchRecorder(monkeypatch)
    with TopLevelOps() as top_level:
        foreground = dsa_ops.reduce_hole_mask(hole, (16, 16))
        cross, self_ = module._project(x)
        mark = len(top_level.names)
        dsa_ops.dual_masked_attention(*cross, *self_, foreground, backend="triton")
    # Nothing but the fused op between the projection and the fusion: no mask complement,
    # no zero-fill, no copy of the channels-last projections.
    assert top_level.names[mark:] == ["dsa_ops.dual_masked_attention_fwd_triton"]
    assert recorder.kernels == ["_partition_kernel", "_forward_kernel"]
    recorder.kernels.clear()
    y = module(x, hole)
    assert recorder.kernels == ["_partition_kernel", "_forward_kernel"]
    recorder.kernels.clear()
    y.square().sum().backward()
    assert recorder.kernels == ["_delta_kernel", "_grad_kv_kernel", "_grad_q_kernel"]


@pytest.mark.parametrize("length", [1, 31, 1024, 1025, 3000])
def test_partition_kernel_matches_the_reference(length):
    generator = torch.Generator().manual_seed(length)
    mask = torch.rand(6, length, generator=generator) < torch.rand(6, 1, generator=generator)
    mask[0], mask[1] = False, True
    mask = mask.to(DEVICE)
    strided = torch.stack([mask, ~mask], dim=2)[:, :, 0]  # non-unit position stride
    for m in (mask, strided):
        index, count = partition_triton.partition_indices(m)
        expected_index, expected_count = reference.partition_indices(m)
        assert torch.equal(index, expected_index) and torch.equal(count, expected_count)


def test_batch_shares_grid_axis_0_with_the_tiles(monkeypatch):
    """No batch limit from grid axis 1/2 (65 535): the launch for B = 100 000 is recorded,
    not run."""
    grids = []

    class Recorder:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    batch = 100_000
    q = torch.zeros(batch, 4, 8)
    mask = torch.ones(batch, 4, dtype=torch.bool)
    masked_triton.forward(q, q, q, mask, mask, 1.0)
    _, _, grid = grids  # the two partitions, then the attention
    assert grid[0] == batch * 1 and grid[1] == 1 and grid[2] == 1
    with pytest.raises(ValueError, match="exceed the grid limit"):
        triton_common.tiles(2 ** 31, 16, 16)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32x3"),
                                               ("medium", "tf32")])
def test_float32_follows_the_matmul_precision_setting(setting, expected):
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert triton_common.dot_precision(torch.float32) == expected
        assert triton_common.dot_precision(torch.float16) == "ieee"  # ignored for 16-bit
    finally:
        torch.set_float32_matmul_precision(saved)


def test_ieee_float32_gets_its_own_smaller_tiles():
    """IEEE products run on the FMA units: smaller V chunks than the tensor-core paths."""
    def config(pass_name, dtype, precision):
        return triton_common.block_config(pass_name, (9, 0), 64, 512, dtype, precision)

    for pass_name in ("forward", "grad_kv", "grad_q"):
        assert config(pass_name, torch.float32, "tf32") == config(pass_name, torch.float32, "tf32x3")
        assert (config(pass_name, torch.float32, "ieee").block_dv
                < config(pass_name, torch.float16, "ieee").block_dv)


# ----------------------------------------------------------------------------- devices
def test_gpus_without_enough_shared_memory_are_declined_with_the_reason(monkeypatch):
    turing = types.SimpleNamespace(name="Tesla T4", shared_memory_per_block_optin=64 * 1024)
    monkeypatch.setattr(triton_common, "_compute_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: turing)
    reason = registry.triton_unavailable(torch.device("cuda", 0))
    assert "sm_75" in reason and "64 KiB" in reason and "Tesla T4" in reason
    ampere = types.SimpleNamespace(name="A100", shared_memory_per_block_optin=163 * 1024)
    monkeypatch.setattr(triton_common, "_compute_capability", lambda index: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: ampere)
    assert registry.triton_unavailable(torch.device("cuda", 0)) is None
