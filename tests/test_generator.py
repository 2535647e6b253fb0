"""Generator (Tables 6/8), oracle pass and contextual attention."""

import pytest
import torch
from torch import nn

import dsa_ops
from oracleface.models import ContextualAttention, Generator, generator_layer_table
from oracleface.models.generator import NoAttention

# Table 6 transcribed from the paper, one row per layer:
# (layer, kernel, stride, out channels, BN, activation, concatenated layer, DSA after it)
TABLE_6 = [
    (1, 7, 2, 64, False, "relu", None, False),
    (2, 5, 2, 128, True, "relu", None, False),
    (3, 3, 2, 256, True, "relu", None, False),
    (4, 3, 2, 512, True, "relu", None, False),
    (5, 3, 2, 512, True, "relu", None, False),
    (6, 3, 2, 512, True, "relu", None, False),
    (7, 3, 2, 512, True, "relu", None, False),
    (8, 3, 2, 512, True, "relu", None, False),
    (9, 3, 1, 512, True, "lrelu", 7, False),
    (10, 3, 1, 512, True, "lrelu", 6, False),
    (11, 3, 1, 512, True, "lrelu", 5, False),
    (12, 3, 1, 512, True, "lrelu", 4, True),
    (13, 3, 1, 256, True, "lrelu", 3, True),
    (14, 3, 1, 128, True, "lrelu", 2, True),
    (15, 3, 1, 64, True, "lrelu", 1, False),
    (16, 3, 1, 3, False, "sigmoid", 0, False),
]
# Table 8 (1024×1024).
TABLE_8 = [
    (1, 7, 2, 64, False, "relu", None, False),
    (2, 5, 2, 128, True, "relu", None, False),
    (3, 3, 2, 256, True, "relu", None, False),
    *[(i, 3, 2, 512, True, "relu", None, False) for i in range(4, 11)],
    (11, 3, 1, 512, True, "lrelu", 9, False),
    (12, 3, 1, 512, True, "lrelu", 8, False),
    (13, 3, 1, 512, True, "lrelu", 7, False),
    (14, 3, 1, 512, True, "lrelu", 6, True),
    (15, 3, 1, 512, True, "lrelu", 5, True),
    (16, 3, 1, 512, True, "lrelu", 4, True),
    (17, 3, 1, 256, True, "lrelu", 3, False),
    (18, 3, 1, 128, True, "lrelu", 2, False),
    (19, 3, 1, 64, True, "lrelu", 1, False),
    (20, 3, 1, 3, False, "sigmoid", 0, False),
]
ACTIVATIONS = {"relu": nn.ReLU, "lrelu": nn.LeakyReLU, "sigmoid": nn.Sigmoid}


def _spec_rows(resolution):
    return [(s.index, s.kernel, s.stride, s.out_channels, s.batch_norm, s.activation, s.skip,
             s.attention) for s in generator_layer_table(resolution)]


def _check_built_layers(generator, paper_table):
    """The built modules follow the paper's rows: conv geometry, BN, activation, DSA, widths."""
    widths = {0: 4}
    for index, kernel, stride, out, bn, act, skip, dsa in paper_table:
        block = generator.layers[str(index)]
        conv = block[0]
        expected_in = widths[index - 1] + (widths[skip] if skip is not None else 0)
        assert (conv.kernel_size, conv.stride, conv.out_channels, conv.in_channels) == \
            ((kernel, kernel), (stride, stride), out, expected_in), f"layer {index}"
        assert any(isinstance(m, nn.BatchNorm2d) for m in block) == bn, f"layer {index}"
        assert isinstance(block[-1], ACTIVATIONS[act]), f"layer {index}"
        if act == "lrelu":
            assert block[-1].negative_slope == 0.2
        assert (str(index) in generator.attention) == dsa, f"layer {index}"
        if dsa:
            assert isinstance(generator.attention[str(index)], dsa_ops.DualSpatialAttention)
            assert generator.attention[str(index)].channels == out
        widths[index] = out


def _center_mask(batch, size, hole):
    mask = torch.zeros(batch, 1, size, size)
    start = (size - hole) // 2
    mask[:, :, start:start + hole, start:start + hole] = 1
    return mask


def test_layer_table_matches_table_6_and_8():
    assert _spec_rows(256) == TABLE_6
    assert _spec_rows(1024) == TABLE_8
    # DSA maps are 16², 32², 64² at both resolutions.
    for resolution in (256, 1024):
        assert [s.resolution for s in generator_layer_table(resolution) if s.attention] == [16, 32, 64]


def test_built_generator_follows_table_6():
    _check_built_layers(Generator(256), TABLE_6)


def test_shapes_range_and_input_masking_at_256():
    torch.manual_seed(0)
    generator = Generator(256, attention="none").eval()
    x = torch.rand(1, 3, 256, 256)
    mask = _center_mask(1, 256, 128)
    with torch.no_grad():
        out = generator(x, mask)
        # The generator masks its input itself: hole content cannot matter.
        scrambled = torch.where(mask.bool(), torch.rand_like(x), x)
        out_scrambled = generator(scrambled, mask)
    assert out.shape == (1, 3, 256, 256)
    assert 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, out_scrambled)


def test_attention_maps_shapes_per_dsa_layer():
    generator = Generator(256).eval()
    x, mask = torch.rand(1, 3, 256, 256), _center_mask(1, 256, 128)
    with torch.no_grad():
        maps = generator.forward_attention(x, mask, until_layer=13)
    assert sorted(maps) == [12, 13]
    assert maps[12]["cross"].shape == maps[12]["self"].shape == (1, 256, 256)
    assert maps[13]["cross"].shape == (1, 1024, 1024)
    # Rows of hole pixels are distributions over the keys.
    hole_rows = dsa_ops.reduce_hole_mask(mask, (16, 16))[0]
    torch.testing.assert_close(maps[12]["cross"][0, hole_rows].sum(-1), torch.ones(int(hole_rows.sum())))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="resolution"):
        Generator(512)
    with pytest.raises(ValueError, match="attention"):
        Generator(256, attention="transformer")
    generator = Generator(256, attention="none")
    with pytest.raises(ValueError, match="x must have shape"):
        generator(torch.rand(2, 3, 128, 128), torch.zeros(2, 1, 128, 128))
    with pytest.raises(ValueError, match="at least 2 samples"):
        generator(torch.rand(1, 3, 256, 256), torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match="attention='dsa'"):
        generator.eval()(torch.rand(1, 3, 256, 256), torch.zeros(1, 1, 256, 256), return_attention=True)


def test_attention_variants_use_the_same_places():
    ca, none = Generator(256, attention="ca"), Generator(256, attention="none")
    assert sorted(int(k) for k in ca.attention) == [12, 13, 14]
    assert all(isinstance(m, ContextualAttention) for m in ca.attention.values())
    assert all(isinstance(m, NoAttention) for m in none.attention.values())
    assert [m.channels for m in ca.attention.values()] == [512, 256, 128]


def _backends_under_test():
    params = []
    for backend in ("triton", "cuda"):
        reason = dsa_ops.backend_unavailable_reason(backend, "cpu")
        if reason is None:
            params.append(pytest.param(backend, "cpu", id=f"{backend}-cpu"))
        elif torch.cuda.is_available() and dsa_ops.backend_unavailable_reason(backend, "cuda") is None:
            params.append(pytest.param(backend, "cuda", id=f"{backend}-cuda"))
        else:
            params.append(pytest.param(backend, "cpu", id=backend, marks=pytest.mark.skip(
                reason=f"backend {backend!r} unavailable here: {reason}")))
    return params


@pytest.mark.parametrize("backend,device", _backends_under_test())
def test_backends_agree_with_reference(backend, device):
    """Same weights and masks: features, maps and gradients match the reference backend.

    On the CPU (Triton's interpreter) the check is shallow — layers 1..12 with the 16² DSA
    — to stay fast; on CUDA the whole generator runs.
    """
    torch.manual_seed(0)
    reference = Generator(256, dsa_backend="reference").to(device).eval()
    with torch.no_grad():  # non-zero α, β so the attention output reaches the features
        for module in reference.attention.values():
            module.alpha.fill_(0.7)
            module.beta.fill_(-0.4)
    other = Generator(256, dsa_backend=backend).to(device).eval()
    other.load_state_dict(reference.state_dict())
    x = torch.rand(1, 3, 256, 256, device=device)
    mask = torch.zeros(1, 1, 256, 256, device=device)
    # Off-centre rectangle: uneven fg/bg splits. On the CPU a small one (2×3 pixels at 16²):
    # the interpreted Triton backward is slow.
    if device == "cpu":
        mask[:, :, 50:80, 100:140] = 1
    else:
        mask[:, :, 40:150, 90:210] = 1
    until = 12 if device == "cpu" else 16
    layers = (12,) if device == "cpu" else (12, 13, 14)
    results = []
    for generator in (reference, other):
        features, maps = generator.run_until(x, mask, until, layers)
        loss = features.square().mean() + sum((m["cross"] * m["self"]).sum() for m in maps.values())
        # Layers past ``until`` get no gradient (None), on both sides alike.
        grads = torch.autograd.grad(loss, list(generator.parameters()), allow_unused=True)
        results.append((features, maps, grads))
    (f_ref, m_ref, g_ref), (f_other, m_other, g_other) = results
    torch.testing.assert_close(f_other, f_ref, rtol=1e-4, atol=1e-4)
    for layer in layers:
        for branch in ("cross", "self"):
            torch.testing.assert_close(m_other[layer][branch], m_ref[layer][branch], rtol=1e-4, atol=1e-5)
    assert [g is None for g in g_other] == [g is None for g in g_ref]
    assert sum(g is not None for g in g_ref) > 0
    for a, b in zip(g_other, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_oracle_pass_stops_at_last_supervised_layer_and_keeps_bn_statistics():
    torch.manual_seed(0)
    generator = Generator(256).train()
    calls = {}

    def counter(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
        return hook

    for index, block in generator.layers.items():
        block.register_forward_hook(counter(f"layer{index}"))
    for index, module in generator.attention.items():
        module.register_forward_hook(counter(f"dsa{index}"))
    bn_state = {k: v.clone() for k, v in generator.state_dict().items()
                if "running" in k or "num_batches" in k}
    x, mask = torch.rand(2, 3, 256, 256), _center_mask(2, 256, 96)
    maps = generator.oracle_attention(x, mask, layers=(12,))

    assert sorted(maps) == [12] and not maps[12]["cross"].requires_grad
    assert all(calls.get(f"layer{i}") == 1 for i in range(1, 13))
    assert calls.get("dsa12") == 1
    assert not any(calls.get(name) for name in ("layer13", "layer14", "layer15", "layer16", "dsa13", "dsa14"))
    for key, value in generator.state_dict().items():
        if key in bn_state:
            assert torch.equal(value, bn_state[key]), key
    # The oracle sees the ground truth: hole content changes its maps (unlike the prediction).
    other = torch.where(mask.bool(), torch.rand_like(x), x)
    maps_other = generator.oracle_attention(other, mask, layers=(12,))
    assert not torch.allclose(maps_other[12]["self"], maps[12]["self"])
    # Up to layer 13: two DSA layers run, layer 14 does not.
    calls.clear()
    generator.oracle_attention(x, mask, layers=(12, 13))
    assert calls.get("dsa13") == 1 and not calls.get("layer14")


# ----------------------------------------------------------------------------- contextual attention
def _contextual_attention_by_loops(x, hole, patch, scale, propagate):
    """Yu et al.'s contextual attention written pixel by pixel (one sample)."""
    channels, height, width = x.shape
    r = patch // 2
    padded = torch.nn.functional.pad(x, (r, r, r, r))
    hole_padded = torch.nn.functional.pad(hole.float(), (r, r, r, r))
    pixels = [(i, j) for i in range(height) for j in range(width)]
    patches = torch.stack([padded[:, i:i + patch, j:j + patch].reshape(-1) for i, j in pixels])
    usable = torch.tensor([hole_padded[i:i + patch, j:j + patch].sum() == 0 for i, j in pixels])
    normed = patches / patches.norm(dim=1, keepdim=True).clamp_min(1e-4)
    cosine = normed @ normed.T
    pr = propagate // 2

    def get(s, a, b, c, d):
        inside = 0 <= a < height and 0 <= b < width and 0 <= c < height and 0 <= d < width
        return s[a * width + b, c * width + d] if inside else 0.0

    along_x = torch.zeros_like(cosine)
    for q, (a, b) in enumerate(pixels):
        for k, (c, d) in enumerate(pixels):
            along_x[q, k] = sum(get(cosine, a, b + t, c, d + t) for t in range(-pr, pr + 1))
    both = torch.zeros_like(cosine)
    for q, (a, b) in enumerate(pixels):
        for k, (c, d) in enumerate(pixels):
            both[q, k] = sum(get(along_x, a + t, b, c + t, d) for t in range(-pr, pr + 1))
    logits = (scale * both).masked_fill(~usable[None], float("-inf"))
    attention = torch.softmax(logits, dim=1) if usable.any() else torch.zeros_like(logits)
    pasted = torch.zeros(channels, height + 2 * r, width + 2 * r)
    for q, (i, j) in enumerate(pixels):
        pasted[:, i:i + patch, j:j + patch] += (attention[q] @ patches).view(channels, patch, patch)
    pasted = pasted[:, r:r + height, r:r + width] / patch ** 2
    return torch.where(hole.bool(), pasted, x)


@pytest.mark.parametrize("propagate", [1, 3])
def test_contextual_attention_matches_loop_definition(propagate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    hole = torch.zeros(2, 1, 6, 7)
    hole[0, :, 1:4, 2:5] = 1
    hole[1, :, 3:6, 0:3] = 1
    module = ContextualAttention(3, softmax_scale=10.0, propagate_size=propagate, rate=1)
    out = module(x, hole)
    for b in range(2):
        expected = _contextual_attention_by_loops(x[b], hole[b, 0], 3, 10.0, propagate)
        torch.testing.assert_close(out[b], expected)


def test_contextual_attention_mask_reduction_and_edge_cases():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    hole = torch.zeros(1, 1, 32, 32)
    hole[:, :, 8:20, 8:20] = 1  # image-resolution mask, reduced by max-pooling like DSA
    out = ContextualAttention(4)(x, hole)
    valid = ~dsa_ops.reduce_hole_mask(hole, (8, 8)).view(1, 1, 8, 8)
    torch.testing.assert_close(out * valid, x * valid)
    # No usable background patch: hole pixels become 0, never NaN, gradients finite.
    full = ContextualAttention(4)(x, torch.ones(1, 1, 8, 8))
    assert torch.equal(full, torch.zeros_like(full))
    full.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        ContextualAttention(3)(x, hole)


@pytest.mark.slow
def test_1024_configuration_builds_and_runs():
    """Table 8: construction, layer-by-layer check and one forward at batch 1 (~20 s on a core)."""
    generator = Generator(1024).eval()
    _check_built_layers(generator, TABLE_8)
    x, mask = torch.rand(1, 3, 1024, 1024), _center_mask(1, 1024, 512)
    with torch.no_grad():
        out = generator(x, mask)
    assert out.shape == (1, 3, 1024, 1024)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
