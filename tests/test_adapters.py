"""dsa_ops.adapters in small copies of DeepFill's and PEN-Net's call patterns (written here)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops import DualSpatialAttention
from dsa_ops.adapters import (DeepFillV1ContextualAttention, DeepFillV2ContextualAttention,
                              PENNetAtnConv, attend_with_offsets, attended_offsets, flow_to_image)


def centre_hole(batch, size, hole):
    mask = torch.zeros(batch, 1, size, size)
    start = (size - hole) // 2
    mask[:, :, start:start + hole, start:start + hole] = 1
    return mask


class TinyDeepFillV1(nn.Module):
    """DeepFill v1's refinement attention branch in miniature: image + ones + mask → two
    stride-2 convolutions (features at 1/4) → ``x, offset_flow = ca(x, x, mask)`` → convs →
    two nearest upsamplings → image."""

    def __init__(self, attention: nn.Module, cnum: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(5, cnum, 3, 2, 1), nn.ELU(),
                                     nn.Conv2d(cnum, 2 * cnum, 3, 2, 1), nn.ReLU())
        self.contextul_attention = attention
        self.decoder = nn.Sequential(nn.Conv2d(2 * cnum, 2 * cnum, 3, 1, 1), nn.ELU(),
                                     nn.Upsample(scale_factor=2), nn.Conv2d(2 * cnum, cnum, 3, 1, 1),
                                     nn.ELU(), nn.Upsample(scale_factor=2), nn.Conv2d(cnum, 3, 3, 1, 1))

    def forward(self, image, mask):
        ones = torch.ones_like(mask)
        x = self.encoder(torch.cat([image * (1 - mask), ones, mask], dim=1))
        x, offset_flow = self.contextul_attention(x, x, mask)
        return torch.clamp(self.decoder(x), -1, 1), offset_flow


class TinyPENNet(nn.Module):
    """PEN-Net's pyramid in miniature: three stride-2 levels with doubling channels, the
    attention chain ``x2 = at2(x2, x3, mask); x1 = at1(x1, x2, mask)``, a decoder."""

    def __init__(self, cnum: int = 4, **attention_options):
        super().__init__()
        self.dw1 = nn.Sequential(nn.Conv2d(4, cnum, 3, 2, 1), nn.LeakyReLU(0.2))
        self.dw2 = nn.Sequential(nn.Conv2d(cnum, 2 * cnum, 3, 2, 1), nn.LeakyReLU(0.2))
        self.dw3 = nn.Sequential(nn.Conv2d(2 * cnum, 4 * cnum, 3, 2, 1), nn.ReLU())
        self.at2 = PENNetAtnConv(2 * cnum, 2 * cnum, **attention_options)
        self.at1 = PENNetAtnConv(cnum, cnum, **attention_options)
        self.up = nn.Conv2d(cnum, 3, 3, 1, 1)

    def forward(self, image, mask, attention_mask=...):
        x1 = self.dw1(torch.cat([image * (1 - mask), mask], dim=1))
        x2 = self.dw2(x1)
        x3 = self.dw3(x2)
        attention_mask = mask if attention_mask is ... else attention_mask
        x2 = self.at2(x2, x3, attention_mask)
        x1 = self.at1(x1, x2, attention_mask)
        return torch.tanh(self.up(F.interpolate(x1, scale_factor=2, mode="bilinear",
                                                align_corners=True)))


def train_a_few_steps(model, forward, steps=4):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = forward()
        loss.backward()
        optimiser.step()


def gates(model):
    return [m for m in model.modules() if isinstance(m, DualSpatialAttention)]


# ----------------------------------------------------------------------------- DeepFill
def test_deepfill_v1_swap_trains_and_returns_the_ports_outputs():
    torch.manual_seed(0)
    attention = DeepFillV1ContextualAttention(16, ksize=3, stride=1, rate=2, fuse_k=3,
                                              softmax_scale=10, fuse=True, use_cuda=False,
                                              device_ids=None)
    model = TinyDeepFillV1(attention)
    image, mask = torch.rand(2, 3, 32, 32) * 2 - 1, centre_hole(2, 32, 12)

    def loss():
        output, flow = model(image, mask)
        # The port's flow: (B, 3, 4·(H // rate)·rate, …) float in [0, 1] at image resolution.
        assert flow.shape == (2, 3, 32, 32) and flow.dtype == torch.float32
        assert 0 <= flow.min() and flow.max() <= 1
        return F.l1_loss(output, image)

    train_a_few_steps(model, loss)
    (dsa,) = gates(model)
    assert dsa.alpha.item() != 0 and dsa.beta.item() != 0  # the gates learn
    assert dsa.mask_threshold == 0.0  # DeepFill: any non-zero mask value is unavailable


def test_deepfill_v1_flow_size_without_rate_is_the_feature_size():
    attention = DeepFillV1ContextualAttention(8, rate=1)
    x = torch.randn(1, 8, 6, 5)
    _, flow = attention(x, x, centre_hole(1, 24, 8)[..., :20])
    assert flow.shape == (1, 3, 6, 5)


def test_deepfill_v2_returns_no_flow_unless_asked():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 16, 8, 8), centre_hole(2, 32, 12)
    quiet = DeepFillV2ContextualAttention(16, ksize=3, stride=1, rate=2, fuse_k=3, softmax_scale=10,
                                          fuse=True, device_ids=None, return_flow=False, n_down=2)
    y, flow = quiet(x, x, mask)
    assert y.shape == x.shape and flow is None
    verbose = DeepFillV2ContextualAttention(16, rate=2, fuse=True, return_flow=True, n_down=2)
    verbose.load_state_dict(quiet.state_dict())
    y_too, flow = verbose(x, x, mask)
    torch.testing.assert_close(y_too, y)
    assert flow.shape == (2, 3, 8, 8) and flow.dtype == torch.float32


def test_deepfill_batch_one_mask_serves_the_batch_and_none_means_nothing_missing():
    torch.manual_seed(0)
    attention = DeepFillV1ContextualAttention(16, rate=2)
    with torch.no_grad():
        attention.attention.alpha.fill_(0.5)
    x = torch.randn(3, 16, 8, 8)
    shared, full = attention(x, x, centre_hole(1, 32, 12)), attention(x, x, centre_hole(3, 32, 12))
    for actual, expected in zip(shared, full):
        torch.testing.assert_close(actual, expected)
    y, flow = attention(x, x, None)
    torch.testing.assert_close(y, attention.attention.fuse(2 * x))
    assert torch.equal(flow, torch.ones_like(flow))  # no hole: every offset 0, white


def test_deepfill_separate_foreground_matches_in_the_hole_and_background_elsewhere():
    """f ≠ b: queries from f in the hole, keys and values from b (f pasted into the hole as guide)."""
    torch.manual_seed(0)
    attention = DeepFillV2ContextualAttention(16)
    with torch.no_grad():
        attention.attention.alpha.fill_(0.6)
        attention.attention.beta.fill_(0.4)
    f, b, mask = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), centre_hole(2, 32, 12)
    hole = F.adaptive_max_pool2d(mask, (8, 8)) > 0
    y, _ = attention(f, b, mask)
    torch.testing.assert_close(y, attention.attention(b, mask, guide=torch.where(hole, f, b)))
    assert not torch.allclose(y, attention(b, b, mask)[0])
    with pytest.raises(ValueError, match=r"DeepFillV2ContextualAttention: f must have the shape of b"):
        attention(torch.randn(2, 16, 4, 4), b, mask)


# ----------------------------------------------------------------------------- flow
def test_flow_colours_follow_deepfills_wheel():
    """DeepFill's coding: zero offset white; direction → hue, with the wheel's red at +row,
    yellow-orange (255, 229, 0) at +column, blue-violet (88, 0, 255) at -column; the
    colours depend on the direction and relative length only."""
    offsets = torch.zeros(1, 2, 1, 5)
    offsets[0, :, 0, 1] = torch.tensor([1.0, 0.0])   # +row
    offsets[0, :, 0, 2] = torch.tensor([0.0, 1.0])   # +column
    offsets[0, :, 0, 3] = torch.tensor([0.0, -1.0])  # -column
    offsets[0, :, 0, 4] = torch.tensor([0.0, 0.5])   # half as long: paler
    image = flow_to_image(offsets)
    assert image.shape == (1, 3, 1, 5) and image.dtype == torch.float32
    rgb = (image[0, :, 0] * 255).round().t().int().tolist()
    assert rgb[0] == [255, 255, 255] and rgb[1] == [255, 0, 0]
    assert rgb[2] == [255, 229, 0] and rgb[3] == [88, 0, 255]
    assert rgb[4] == [255, 242, 127]  # 1 - 0.5·(1 - colour), floored
    torch.testing.assert_close(flow_to_image(7 * offsets), image)
    with pytest.raises(ValueError, match=r"offsets must have shape \(B, 2, H, W\)"):
        flow_to_image(torch.zeros(1, 3, 2, 2))


def test_attended_offsets_are_the_cross_attention_weighted_mean_offset():
    torch.manual_seed(0)
    module = DualSpatialAttention(16, scale=3.0)
    x, hole = torch.randn(2, 16, 6, 5), centre_hole(2, 6, 2)[..., :5]
    hole[1] = 1  # sample 1 has no background: no offsets
    offsets = attended_offsets(module, x, hole)
    _, maps = module(x, hole, return_attention=True)
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij")
    positions = torch.stack([rows, cols]).flatten(1).t()  # (L, 2)
    foreground = maps["cross"].sum(-1) > 0  # rows that attend
    expected = (maps["cross"] @ positions - positions) * foreground.unsqueeze(-1)
    torch.testing.assert_close(offsets, expected.transpose(1, 2).reshape(2, 2, 6, 5))
    assert offsets[0].abs().sum() > 0 and torch.equal(offsets[1], torch.zeros_like(offsets[1]))


def test_offsets_ride_along_without_changing_the_output_or_its_gradient():
    torch.manual_seed(0)
    module = DualSpatialAttention(16)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.fill_(-0.2)
    hole = centre_hole(2, 8, 4)
    results = []
    for run in (lambda x: module(x, hole), lambda x: attend_with_offsets(module, x, hole)[0]):
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        module.zero_grad()
        y = run(x)
        y.square().sum().backward()
        results.append((y, x.grad, module.projection.weight.grad.clone()))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------------- PEN-Net
def test_pennet_swap_trains_with_cross_scale_matching():
    torch.manual_seed(0)
    model = TinyPENNet()
    image, mask = torch.rand(2, 3, 32, 32) * 2 - 1, centre_hole(2, 32, 10)
    train_a_few_steps(model, lambda: F.l1_loss(model(image, mask), image))
    for dsa in gates(model):
        assert dsa.alpha.item() != 0 and dsa.beta.item() != 0
        assert dsa.guide_projection.weight.grad.abs().sum() > 0  # x2 drives the matching
    # PEN-Net passes None when nothing is missing.
    assert model(image, torch.zeros_like(mask), attention_mask=None).shape == image.shape


def test_pennet_output_channels_and_hole_at_the_coarse_level():
    torch.manual_seed(0)
    attention = PENNetAtnConv(8, 12, groups=3, rates=[1, 2, 4])
    x1, x2 = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    assert attention(x1, x2, centre_hole(2, 32, 12)).shape == (2, 12, 8, 8)
    unfused = PENNetAtnConv(8, 8, ksize=1, fuse=False)
    with torch.no_grad():
        unfused.attention.alpha.fill_(1.0)
    # A soft speck (0.1) in one image pixel: PEN-Net treats any non-zero as missing, and
    # decides at x2's resolution, so the whole 2×2 block of x1 under that x2 pixel is hole.
    speck = torch.zeros(2, 1, 32, 32)
    speck[:, :, 9, 9] = 0.1
    block = torch.zeros(2, 1, 4, 4)
    block[:, :, 1, 1] = 1
    y = unfused(x1, x2, speck)
    expected = unfused.attention(x1, block, guide=F.interpolate(x2, size=(8, 8), mode="nearest"))
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, unfused(x1, x2, None))


def test_pennet_guide_channels_mismatch_says_what_to_pass():
    attention = PENNetAtnConv(8, 8)
    with pytest.raises(ValueError, match="PENNetAtnConv: x2 has 8 channels but the module expects "
                                         "16: pass guide_channels=8"):
        attention(torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4))
    deepest = PENNetAtnConv(8, 8, ksize=1, fuse=False, guide_channels=8)
    assert deepest(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)).shape == (1, 8, 4, 4)


@pytest.mark.parametrize("make, call", [
    (lambda: DeepFillV1ContextualAttention(8), lambda m: m(torch.randn(8, 4, 4), torch.randn(1, 8, 4, 4))),
    (lambda: DeepFillV2ContextualAttention(8), lambda m: m(torch.randn(1, 8, 4, 4), None)),
    (lambda: PENNetAtnConv(8, 8), lambda m: m(torch.randn(1, 8, 4, 4), torch.randn(16, 2, 2)))])
def test_bad_feature_maps_name_the_adapter_and_argument(make, call):
    module = make()
    argument = {"DeepFillV1ContextualAttention": "f", "DeepFillV2ContextualAttention": "b",
                "PENNetAtnConv": "x2"}[type(module).__name__]
    with pytest.raises(ValueError, match=rf"^{type(module).__name__}: {argument} must have shape "
                                         r"\(B, C, H, W\); got"):
        call(module)
