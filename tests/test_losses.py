"""Losses of Eq. 5–10."""
import math

import pytest
import torch
from torch import nn

import dsa_ops
from oracleface.losses import (
    PerceptualLoss,
    attention_kl_loss,
    gradient_penalty,
    reconstruction_loss,
    reconstruction_weights,
)


def test_reconstruction_weights_on_a_hand_built_example():
    hole = torch.zeros(1, 1, 8, 8)
    hole[0, 0, 0:2, 0:2] = 1
    # (x0, y0, x1, y1), x1/y1 exclusive: left eye overlaps the hole at (1, 1); nose and
    # mouth overlap each other at (5, 5).
    boxes = torch.tensor([[[1, 1, 3, 3], [6, 0, 8, 1], [4, 4, 6, 6], [5, 5, 7, 7]]])
    weights = reconstruction_weights(hole, boxes)[0, 0]
    assert weights[0, 0] == 2      # hole only
    assert weights[1, 1] == 3      # hole + left eye
    assert weights[2, 2] == 2      # left eye only
    assert weights[0, 7] == 2      # right eye (row 0, column 7)
    assert weights[5, 5] == 3      # nose + mouth
    assert weights[7, 0] == 1      # nothing
    expected_total = 64 + 4 + 4 + 2 + 4 + 4  # 1 everywhere + hole + each box's area
    assert weights.sum() == expected_total
    # The loss is the mean of weights ⊙ |error|: an error of 0.5 at (1, 1) in one channel.
    target = torch.zeros(1, 3, 8, 8)
    output = target.clone()
    output[0, 1, 1, 1] = 0.5
    torch.testing.assert_close(reconstruction_loss(output, target, hole, boxes),
                               torch.tensor(3 * 0.5 / (3 * 64)))


def _maps(logits, query_mask, key_mask):
    """Attention maps from logits ``(B, L, L)`` through the reference definition."""
    batch, length, _ = logits.shape
    # q·kᵀ = logits with q = logits, k = identity.
    q = logits
    k = torch.eye(length).expand(batch, length, length)
    return dsa_ops.reference.attention_probs(q, k, query_mask, key_mask, 1.0)


def _layer_maps(logits_cross, logits_self, hole):
    fg = dsa_ops.reduce_hole_mask(hole, (2, 2))
    return {12: {"cross": _maps(logits_cross, fg, ~fg), "self": _maps(logits_self, fg, fg)}}


def test_kl_is_zero_for_equal_maps_and_matches_a_hand_computation():
    torch.manual_seed(0)
    hole = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])  # 2×2 maps
    a = _layer_maps(torch.randn(2, 4, 4), torch.randn(2, 4, 4), hole)
    b = _layer_maps(torch.randn(2, 4, 4), torch.randn(2, 4, 4), hole)
    assert attention_kl_loss(a, a, hole).item() == pytest.approx(0.0, abs=1e-7)
    loss = attention_kl_loss(b, a, hole)  # KL(a‖b)
    assert loss.item() > 0
    expected = 0.0
    # Sample 0: 2 queries × 2 keys (cross) and 2 × 2 (self); sample 1: 1 × 3 and 1 × 1.
    for branch, pairs in (("cross", 4 + 3), ("self", 4 + 1)):
        p, q = a[12][branch], b[12][branch]
        terms = [p[i, r, c] * math.log(p[i, r, c] / q[i, r, c])
                 for i in range(2) for r in range(4) for c in range(4) if p[i, r, c] > 0]
        expected += sum(terms) / pairs
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("gap", [20.0, 40.0, 80.0])
def test_kl_gradient_is_the_analytic_one_for_confidently_wrong_predictions(gap):
    """∂L/∂s = (E − E_gt)/pairs per valid score: the prediction puts a logit ``gap`` on the
    key the oracle does not attend to (at 40, E on the oracle's key is ≈ 4e-18)."""
    hole = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    fg = dsa_ops.reduce_hole_mask(hole, (2, 2))
    generator = torch.Generator().manual_seed(0)
    oracle_logits = {name: torch.randn(2, 4, 4, generator=generator, dtype=torch.float64).float() * 0.1
                     for name in ("cross", "self")}
    predicted_logits = {name: torch.zeros(2, 4, 4) for name in ("cross", "self")}
    keys = {"cross": ~fg, "self": fg}
    for name, key_mask in keys.items():
        for b in range(2):
            valid = key_mask[b].nonzero().flatten()
            oracle_logits[name][b, :, valid[0]] += 10.0      # the oracle looks at its first key,
            predicted_logits[name][b, :, valid[-1]] += gap  # the prediction confidently elsewhere
    for logits in predicted_logits.values():
        logits.requires_grad_(True)
    predicted = {12: {name: _maps(predicted_logits[name], fg, keys[name]) for name in keys}}
    oracle = {12: {name: _maps(oracle_logits[name], fg, keys[name]) for name in keys}}
    loss = attention_kl_loss(predicted, oracle, hole)
    loss.backward()
    assert torch.isfinite(loss)
    for name in keys:
        e, e_gt = predicted[12][name].detach(), oracle[12][name]
        pairs = (fg.sum(1) * keys[name].sum(1)).sum()
        assert (e[e_gt > 0.5] < 1e-8).any()  # (a sample with one key has nowhere else to look)
        expected = (e - e_gt) / pairs  # zero outside the valid query×key pairs
        torch.testing.assert_close(predicted_logits[name].grad, expected, rtol=1e-5, atol=1e-9)


def test_kl_never_nan_for_rows_without_keys_or_underflow():
    hole = torch.ones(1, 1, 2, 2)  # every pixel is a hole: the cross branch has no keys
    a = _layer_maps(torch.randn(1, 4, 4), torch.randn(1, 4, 4), hole)
    b = {12: {"cross": a[12]["cross"], "self": torch.zeros(1, 4, 4, requires_grad=True)}}
    loss = attention_kl_loss(b, a, hole)  # ln 0 of an underflowed prediction is clamped
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(b[12]["self"].grad).all()
    with pytest.raises(ValueError, match="same non-empty set"):
        attention_kl_loss(a, {13: a[12]}, hole)


class _LinearCritic(nn.Module):
    """D(x) = ⟨w, x⟩: its gradient is w everywhere, so the penalty is (‖w‖ − 1)²."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(1).view(-1, 1, 1, 1)


def test_gradient_penalty_on_a_critic_with_known_gradient_norm():
    weight = torch.zeros(1, 2, 3, 3)
    weight[0, 0, 0, 0], weight[0, 1, 2, 1] = 2.0, math.sqrt(5.0)  # ‖w‖ = 3
    critic = _LinearCritic(weight)
    crops = torch.randn(5, 2, 3, 3)
    penalty = gradient_penalty(critic, crops)
    torch.testing.assert_close(penalty, torch.tensor(4.0))
    penalty.backward()  # d/dw (‖w‖ − 1)² = 2(‖w‖ − 1)·w/‖w‖
    torch.testing.assert_close(critic.weight.grad, 2 * 2 * weight / 3)


def test_gradient_penalty_is_finite_under_float16_autocast_with_a_default_grad_scaler():
    # GradScaler starts at 2^16 = inf in float16: the inner gradient must not enter the
    # float16 graph unreduced (it did, and every fp16 critic step's penalty was NaN).
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4, 1, 1))
    crops = torch.rand(4, 3, 16, 16)
    expected = gradient_penalty(critic, crops)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.get_scale() == 2.0 ** 16
    with torch.autocast("cpu", dtype=torch.float16):
        penalty = gradient_penalty(critic, crops, scaler)
    assert torch.isfinite(penalty)
    torch.testing.assert_close(penalty, expected, rtol=2e-2, atol=2e-3)


def test_perceptual_loss_needs_weights_or_explicit_opt_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ORACLEFACE_VGG16_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        PerceptualLoss()
    with pytest.warns(UserWarning, match="RANDOM"):
        loss = PerceptualLoss(pretrained=False)
    image = torch.rand(1, 3, 32, 32)
    assert loss(image, image, image).item() == 0
    assert loss(image, image.flip(-1), image).item() > 0


def test_perceptual_features_load_torchvision_checkpoint(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1)  # the real file also holds the classifier
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    monkeypatch.setenv("ORACLEFACE_VGG16_WEIGHTS", str(path))
    loss = PerceptualLoss()
    x = torch.rand(1, 3, 32, 32)
    ours = loss.vgg(x)
    expected, h = [], x
    for index, layer in enumerate(features):
        h = layer(h)
        if index in (3, 8, 15, 22, 29):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
            expected.append(h)
    assert len(ours) == 5
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in loss.parameters())
