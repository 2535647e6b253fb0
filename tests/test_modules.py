"""DualSpatialAttention: shapes, identity at init, gradients, compile, mask reduction."""
import pytest
import torch
import torch.nn.functional as F

import dsa_ops
from dsa_ops import DualSpatialAttention, reduce_hole_mask


def centre_hole(batch, size, hole):
    mask = torch.zeros(batch, 1, size, size)
    start = (size - hole) // 2
    mask[:, :, start:start + hole, start:start + hole] = 1
    return mask


@pytest.fixture
def module():
    torch.manual_seed(0)
    return DualSpatialAttention(16)


def test_shapes_and_attention_maps(module):
    x = torch.randn(3, 16, 6, 5)
    hole = centre_hole(3, 24, 12)[..., :20]  # image 24×20 → features 6×5
    y, maps = module(x, hole, return_attention=True)
    assert y.shape == x.shape
    assert set(maps) == {"cross", "self"}
    for attention in maps.values():
        assert attention.shape == (3, 30, 30)
    assert module.qk_dim == 8  # max(C // 8, 8)
    assert DualSpatialAttention(256).qk_dim == 32


def test_identity_at_initialisation_is_fuse_of_2x(module):
    x = torch.randn(2, 16, 8, 8)
    assert module.alpha.item() == 0 and module.beta.item() == 0
    torch.testing.assert_close(module(x, centre_hole(2, 8, 4)), module.fuse(2 * x))


def test_branches_match_masked_attention(module):
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.4)
    x, hole = torch.randn(2, 16, 4, 6), centre_hole(2, 8, 4)[..., :12]
    foreground = reduce_hole_mask(hole, (4, 6))
    q_c, k_c, v_c, q_s, k_s, v_s = module.projection(x).flatten(2).transpose(1, 2).split(
        [8, 8, 16] * 2, dim=2)
    cross = dsa_ops.masked_attention(q_c, k_c, v_c, foreground, ~foreground)
    self_ = dsa_ops.masked_attention(q_s, k_s, v_s, foreground, foreground)
    attended = (0.7 * cross - 0.4 * self_).transpose(1, 2).reshape(2, 16, 4, 6)
    torch.testing.assert_close(module(x, hole), module.fuse(2 * x + attended))


@pytest.mark.parametrize("fuse_kernel_size", [1, 3])
def test_output_and_gradients_follow_the_papers_formula(fuse_kernel_size):
    """``fuse(2X + α·cross + β·self)`` written out with the unfused projection and conv:
    the module folds α, β and the 2 into weights and runs a 1×1 fuse as a GEMM; outputs and
    the gradients of x, α, β and every weight are the formula's."""
    torch.manual_seed(0)
    module = DualSpatialAttention(16, fuse_kernel_size=fuse_kernel_size, backend="reference")
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.4)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    module = module.double()
    hole = centre_hole(2, 12, 6)
    foreground = reduce_hole_mask(hole, (6, 6))

    def formula():
        q_c, k_c, v_c, q_s, k_s, v_s = module.projection(x).flatten(2).transpose(1, 2).split(
            [8, 8, 16] * 2, dim=2)
        cross = dsa_ops.masked_attention(q_c, k_c, v_c, foreground, ~foreground, backend="reference")
        self_ = dsa_ops.masked_attention(q_s, k_s, v_s, foreground, foreground, backend="reference")
        attended = (module.alpha * cross + module.beta * self_).transpose(1, 2).reshape(x.shape)
        return module.fuse(2 * x + attended)

    leaves = [x, *module.parameters()]
    grad_y = torch.randn_like(x)
    results = []
    for run in (lambda: module(x, hole), formula):
        y = run()
        results.append((y, torch.autograd.grad(y, leaves, grad_y)))
    (y, grads), (expected, expected_grads) = results
    torch.testing.assert_close(y, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_gradient_reaches_alpha_beta_and_projections(module):
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    module(x, centre_hole(2, 8, 4)).square().sum().backward()
    assert module.alpha.grad.abs() > 0 and module.beta.grad.abs() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # α = β = 0 blocks the path to Q/K/V at init; once they move, projections learn.
    with torch.no_grad():
        module.alpha.fill_(0.5)
        module.beta.fill_(0.5)
    module.zero_grad()
    module(x, centre_hole(2, 8, 4)).square().sum().backward()
    assert module.projection.weight.grad.abs().sum() > 0


def test_empty_and_full_holes_are_finite(module):
    with torch.no_grad():
        module.alpha.fill_(1.0)
        module.beta.fill_(1.0)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    hole = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    y = module(x, hole)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_works_under_torch_compile(module):
    with torch.no_grad():
        module.alpha.fill_(0.3)
        module.beta.fill_(0.2)
    x, hole = torch.randn(2, 16, 8, 8), centre_hole(2, 32, 16)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, hole), module(x, hole))


@pytest.mark.parametrize("image, feature", [((256, 256), (16, 16)), ((37, 50), (8, 11)),
                                            ((9, 9), (4, 4))])
def test_mask_reduction_marks_any_covered_missing_pixel(image, feature):
    """A feature pixel is foreground iff some image pixel in its (adaptive) window is missing."""
    generator = torch.Generator().manual_seed(1)
    hole = (torch.rand(2, 1, *image, generator=generator) < 0.02).float()
    reduced = reduce_hole_mask(hole, feature).view(2, *feature)
    height, width = image
    for i in range(feature[0]):
        rows = slice(i * height // feature[0], -(-(i + 1) * height // feature[0]))
        for j in range(feature[1]):
            cols = slice(j * width // feature[1], -(-(j + 1) * width // feature[1]))
            expected = hole[:, 0, rows, cols].flatten(1).amax(dim=1) > 0.5
            assert torch.equal(reduced[:, i, j], expected)


def test_single_missing_pixel_survives_reduction():
    hole = torch.zeros(1, 1, 64, 64)
    hole[0, 0, 37, 5] = 1
    reduced = reduce_hole_mask(hole, (16, 16)).view(16, 16)
    assert reduced.sum() == 1 and reduced[37 // 4, 5 // 4]


def test_lower_resolution_mask_is_upsampled():
    hole = centre_hole(1, 4, 2)
    reduced = reduce_hole_mask(hole, (8, 8)).view(1, 1, 8, 8).float()
    torch.testing.assert_close(reduced, F.interpolate(hole, size=(8, 8), mode="nearest"))


@pytest.mark.parametrize("bad, message", [
    (dict(channels=0), "channels"), (dict(channels=8, fuse_kernel_size=2), "fuse_kernel_size"),
    (dict(channels=8, backend="fast"), "backend")])
def test_bad_constructor_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        DualSpatialAttention(**bad)


def test_bad_forward_arguments(module):
    with pytest.raises(ValueError, match=r"x must have shape \(B, 16, H, W\)"):
        module(torch.randn(2, 8, 4, 4), centre_hole(2, 4, 2))
    with pytest.raises(ValueError, match="hole_mask must have shape"):
        module(torch.randn(2, 16, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="batch size 2"):
        module(torch.randn(2, 16, 4, 4), centre_hole(3, 4, 2))


def test_projection_gives_unit_stride_channels_without_copies(module):
    """q/k/v of both branches are channel slices of one channels-last buffer (what the
    fused kernels gather fastest), equal to the 1×1 convolution, the values gated by α/2
    and β/2 (``_gated_projection``)."""
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.4)
    x = torch.randn(2, 16, 5, 6)
    cross, self_ = module._project(x)
    base = cross[0].untyped_storage().data_ptr()
    for tensor in (*cross, *self_):
        assert tensor.stride(2) == 1
        assert tensor.untyped_storage().data_ptr() == base
    expected = module.projection(x).flatten(2).transpose(1, 2).split([8, 8, 16] * 2, dim=2)
    gates = (1, 1, 0.35, 1, 1, -0.2)
    for actual, reference_value, gate in zip((*cross, *self_), expected, gates):
        torch.testing.assert_close(actual, gate * reference_value)


@pytest.mark.skipif(dsa_ops.backend_unavailable_reason("triton", "cpu") is not None,
                    reason="triton needs CUDA tensors or TRITON_INTERPRET=1")
def test_triton_module_matches_the_reference_module(module):
    """The dual Triton op (both branches, one launch per kernel) inside the module."""
    with torch.no_grad():
        module.alpha.fill_(0.6)
        module.beta.fill_(-0.3)
    x = torch.randn(4, 16, 5, 6)
    hole = torch.zeros(4, 1, 5, 6)
    hole[0, :, 1:3, 2:5] = 1
    hole[1, :, ::2] = 1
    hole[3] = 1  # sample 2 has no hole, sample 3 no background
    results = []
    for backend in ("reference", "triton"):
        module.backend = backend
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        y = module(inputs, hole)
        y.square().sum().backward()
        results.append((y, inputs.grad, module.projection.weight.grad.clone()))
    for actual, expected in zip(*results[::-1]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ API for other people's models
def test_no_hole_mask_means_nothing_missing(module):
    """PEN-Net passes ``mask=None`` when nothing is missing: no queries, output fuse(2·X)."""
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(0.3)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(module(x), module.fuse(2 * x))
    torch.testing.assert_close(module(x, None), module(x, torch.zeros(2, 1, 4, 4)))
    foreground, _ = module.queries_keys(x, None)
    assert foreground.shape == (2, 16) and not foreground.any()


def test_mask_threshold_decides_what_counts_as_missing():
    """A soft mask (0.3 inside the hole): missing for threshold 0 (PEN-Net), known for 0.5."""
    torch.manual_seed(0)
    strict, lenient = DualSpatialAttention(16, mask_threshold=0.0), DualSpatialAttention(16)
    lenient.load_state_dict(strict.state_dict())
    for module in (strict, lenient):
        with torch.no_grad():
            module.alpha.fill_(0.5)
    x, binary = torch.randn(2, 16, 4, 4), centre_hole(2, 4, 2)
    soft = 0.3 * binary
    torch.testing.assert_close(strict(x, soft), strict(x, binary))
    torch.testing.assert_close(lenient(x, soft), lenient(x, None))
    assert not torch.allclose(strict(x, soft), lenient(x, soft))
    assert reduce_hole_mask(soft, (4, 4), threshold=0.0).sum() == 8
    with pytest.raises(ValueError, match=r"mask_threshold must be in \[0, 1\)"):
        DualSpatialAttention(16, mask_threshold=1.0)


def _branches_from(module, queries_keys_source, values_source, hole):
    """The module's output computed by hand: Q/K projected from one tensor, V from another."""
    size = tuple(values_source.shape[-2:])
    foreground = reduce_hole_mask(hole, size)
    qk_rows = [*range(0, 16), *range(32, 48)]  # [q_c, k_c, v_c, q_s, k_s, v_s] = [8, 8, 16] * 2
    value_rows = [*range(16, 32), *range(48, 64)]
    q_c, k_c, q_s, k_s = module.projection(queries_keys_source)[:, qk_rows].flatten(2).transpose(
        1, 2).split(8, dim=2)
    v_c, v_s = module.projection(values_source)[:, value_rows].flatten(2).transpose(1, 2).split(16, dim=2)
    cross = dsa_ops.masked_attention(q_c, k_c, v_c, foreground, ~foreground)
    self_ = dsa_ops.masked_attention(q_s, k_s, v_s, foreground, foreground)
    attended = (module.alpha * cross + module.beta * self_).transpose(1, 2).reshape(values_source.shape)
    return module.fuse(2 * values_source + attended)


def test_guide_gives_queries_and_keys_values_come_from_x(module):
    with torch.no_grad():
        module.alpha.fill_(0.8)
        module.beta.fill_(-0.5)
    x, guide, hole = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 4, 6), centre_hole(2, 8, 4)[..., :12]
    torch.testing.assert_close(module(x, hole, guide=guide), _branches_from(module, guide, x, hole))
    torch.testing.assert_close(module(x, hole, guide=x), module(x, hole))
    foreground, pairs = module.queries_keys(x, hole, guide=guide)
    expected_foreground, expected_pairs = module.queries_keys(guide, hole)
    assert torch.equal(foreground, expected_foreground)
    for branch in ("cross", "self"):
        for actual, expected in zip(pairs[branch], expected_pairs[branch]):
            torch.testing.assert_close(actual, expected)


def test_guide_with_its_own_channels_learns():
    torch.manual_seed(0)
    module = DualSpatialAttention(16, guide_channels=32)
    with torch.no_grad():
        module.alpha.fill_(0.5)
        module.beta.fill_(0.5)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    guide = torch.randn(2, 32, 4, 4, requires_grad=True)
    module(x, centre_hole(2, 4, 2), guide=guide).square().sum().backward()
    assert module.guide_projection.weight.grad.abs().sum() > 0
    assert guide.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert module.projection.weight.shape == (32, 16, 1, 1)  # the values of both branches only
    with pytest.raises(ValueError, match="DualSpatialAttention: guide is required"):
        module(x, centre_hole(2, 4, 2))


@pytest.mark.parametrize("guide, message", [
    (torch.randn(2, 8, 4, 4), r"guide must have shape \(B, 16, 4, 4\)"),
    (torch.randn(2, 16, 2, 2), "guide must have the batch size and spatial size of x"),
    (torch.randn(3, 16, 4, 4), "guide must have the batch size and spatial size of x")])
def test_bad_guide(module, guide, message):
    with pytest.raises(ValueError, match=f"DualSpatialAttention: {message}"):
        module(torch.randn(2, 16, 4, 4), centre_hole(2, 4, 2), guide=guide)


@pytest.mark.parametrize("dtype, name", [(torch.float64, "float64"), (torch.bfloat16, "bfloat16")])
def test_dtype_mismatch_names_module_argument_and_fix(module, dtype, name):
    expected = (f"DualSpatialAttention: x is {name} but the module's weights are float32: "
                f"cast x to float32 or run under autocast")
    with pytest.raises(TypeError) as error:
        module(torch.randn(2, 16, 4, 4, dtype=dtype), centre_hole(2, 4, 2))
    assert str(error.value) == expected
    with pytest.raises(TypeError, match="DualSpatialAttention: guide is float64"):
        module(torch.randn(2, 16, 4, 4), centre_hole(2, 4, 2), guide=torch.randn(2, 16, 4, 4).double())


def test_autocast_input_is_accepted():
    torch.manual_seed(0)
    module = DualSpatialAttention(16, backend="reference")
    x = torch.randn(2, 16, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, centre_hole(2, 4, 2))
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


def test_device_mismatch_names_module_argument_and_fix():
    module = DualSpatialAttention(16).to("meta")
    with pytest.raises(ValueError, match=r"DualSpatialAttention: x is on cpu but the module's weights "
                                         r"are on meta: move x there or call module.to\('cpu'\)"):
        module(torch.randn(2, 16, 4, 4), centre_hole(2, 4, 2))


@pytest.mark.parametrize("guide_kind", [None, "shared", "own"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_values_projected_after_attention_equal_values_projected_before(guide_kind, backend,
                                                                         monkeypatch):
    """The CPU backends attend over x and apply the value weights to the hole rows after
    (``_project_attended_values``); the GPU backends project V at every pixel first
    (``_project``). Outputs, the DeepFill adapter's extra values and every
    gradient agree, over a sample with a hole, one without, and one that is all hole (its
    cross branch has no keys: no value bias may reach it)."""
    torch.manual_seed(3)
    dtype = torch.float64 if backend == "reference" else torch.float32
    module = DualSpatialAttention(16, guide_channels=12 if guide_kind == "own" else None,
                                  backend=backend).to(dtype)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.4)
        module.projection.bias.normal_()
    x = torch.randn(3, 16, 6, 5, dtype=dtype, requires_grad=True)
    guide = {None: None, "shared": torch.randn(3, 16, 6, 5, dtype=dtype),
             "own": torch.randn(3, 12, 6, 5, dtype=dtype)}[guide_kind]
    hole = torch.zeros(3, 1, 6, 5, dtype=dtype)
    hole[0, :, 1:4, 2:4] = 1
    hole[2] = 1
    extra_values = torch.randn(3, 30, 3, dtype=dtype)
    grad_y, grad_extra = torch.randn_like(x), torch.randn(3, 30, 3, dtype=dtype)
    results = []
    for after in (True, False):
        monkeypatch.setattr(DualSpatialAttention, "_values_after_attention", lambda self, x: after)
        y, _, extra = module.attend(x, hole, guide, cross_extra_values=extra_values)
        leaves = [x, *(p for p in module.parameters() if p.requires_grad)]
        grads = torch.autograd.grad((y, extra), leaves, (grad_y, grad_extra), allow_unused=True)
        results.append((y, extra, grads))
    (y, extra, grads), (expected, expected_extra, expected_grads) = results
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, expected, **tolerance)
    torch.testing.assert_close(extra, expected_extra, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_cpu_modules_attend_over_x_and_gpu_backends_over_projected_values():
    module = DualSpatialAttention(16)
    x = torch.randn(1, 16, 4, 4)
    assert module._values_after_attention(x)
    assert DualSpatialAttention(16, backend="reference")._values_after_attention(x)
    assert not DualSpatialAttention(16, backend="triton")._values_after_attention(x)
