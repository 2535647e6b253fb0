"""Contextual attention with DeepFill v1's ``rate``: match on the downsampled map, paste
``2·rate``-wide full-resolution patches. (``rate=1`` is checked against a pixel-by-pixel
definition in tests/test_generator.py.)"""
from __future__ import annotations

import pytest
import torch

import dsa_ops
from oracleface.models import ContextualAttention


def _paste_by_loops(x, hole, attention, rate):
    """DeepFill's transposed convolution written out for one sample: key k's raw patch is
    the 2r×2r window starting at r·k − r/2; query q pastes it at r·q − r/2; each output
    pixel averages the 4 patches covering it. Valid pixels keep x."""
    channels, height, width = x.shape
    small_w = width // rate
    kernel, offset = 2 * rate, rate // 2
    out = torch.zeros_like(x)
    for query in range(attention.shape[0]):
        qy, qx = divmod(query, small_w)
        for dy in range(kernel):
            for dx in range(kernel):
                y, x_ = rate * qy - offset + dy, rate * qx - offset + dx
                if not (0 <= y < height and 0 <= x_ < width):
                    continue
                for key in torch.nonzero(attention[query]).flatten().tolist():
                    ky, kx = divmod(key, small_w)
                    sy, sx = rate * ky - offset + dy, rate * kx - offset + dx
                    if 0 <= sy < height and 0 <= sx < width:
                        out[:, y, x_] += attention[query, key] * x[:, sy, sx]
    return torch.where(hole.bool(), out / 4, x)


@pytest.mark.parametrize("rate", [2, 4])
def test_rate_matches_on_the_downsampled_map_and_pastes_full_resolution_patches(rate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4 * rate, 3 * rate, dtype=torch.float64)
    hole = torch.zeros(2, 1, 4 * rate, 3 * rate)
    hole[0, :, rate:3 * rate, rate:2 * rate] = 1
    hole[1, :, 0:rate + 1, 0:2 * rate] = 1  # not aligned to the rate grid
    module = ContextualAttention(3, rate=rate)
    out = module(x, hole)
    # The matching is rate-1 contextual attention (checked by loops in test_generator.py)
    # on every rate-th pixel, with the hole max-pooled to that grid.
    small = (4, 3)
    small_hole = dsa_ops.reduce_hole_mask(hole, small).view(2, 1, *small)
    attention, _ = module._attention(x[:, :, ::rate, ::rate], small_hole)
    full_hole = dsa_ops.reduce_hole_mask(hole, x.shape[-2:]).view(2, 1, *x.shape[-2:])
    for b in range(2):
        expected = _paste_by_loops(x[b], full_hole[b, 0], attention[b], rate)
        torch.testing.assert_close(out[b], expected)


def test_defaults_are_deepfill_v1s_published_settings():
    module = ContextualAttention(8)
    assert (module.patch_size, module.rate, module.propagate_size, module.softmax_scale) == (3, 2, 3, 10.0)
    assert "rate=2" in repr(module)


def test_rate_two_copies_a_matching_background_patch_into_the_hole():
    """A hole whose surroundings repeat elsewhere is filled from there (scale 10 is sharp)."""
    torch.manual_seed(1)
    tile = torch.randn(4, 8, 8)
    x = tile.repeat(1, 2, 1).unsqueeze(0)  # (1, 4, 16, 8): the top half repeats below
    hole = torch.zeros(1, 1, 16, 8)
    hole[:, :, 10:12, 2:6] = 1
    out = ContextualAttention(4, softmax_scale=1000.0)(x, hole)
    # Hole pixels come from the same place one period (8 rows) up, up to the averaging of
    # overlapping patches whose matches agree.
    torch.testing.assert_close(out[0, :, 10:12, 2:6], x[0, :, 2:4, 2:6], atol=1e-3, rtol=0)


def test_rate_edge_cases_and_errors():
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    full = ContextualAttention(4)(x, torch.ones(1, 1, 8, 8))
    assert torch.equal(full, torch.zeros_like(full))  # no usable patch: zeros, never NaN
    full.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"multiples of rate \(2\); got 8×7"):
        ContextualAttention(4)(torch.randn(1, 4, 8, 7), torch.zeros(1, 1, 8, 7))
    with pytest.raises(ValueError, match="rate must be 1 or a positive even integer; got 3"):
        ContextualAttention(4, rate=3)
