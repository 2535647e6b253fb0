"""Multi-discriminator (Fig. 4, Tables 7/9) and its crops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracleface.models import (
    DISCRIMINATOR_NAMES,
    MultiDiscriminator,
    PatchDiscriminator,
    crop_and_resize,
    discriminator_layer_table,
    local_boxes,
)

# Tables 7 and 9 transcribed: (kernel, stride, out channels as a multiple of C, LReLU after).
TABLE_7 = [(4, 2, 1, True), (4, 2, 2, True), (4, 2, 4, True), (4, 1, 8, True), (4, 1, None, False)]
TABLE_9 = [(4, 2, 1, True), (4, 2, 2, True), (4, 2, 4, True), (4, 2, 8, True), (4, 2, 8, True),
           (4, 1, 8, True), (4, 1, None, False)]
BOXES = torch.tensor([[[80, 96, 128, 144], [128, 96, 176, 144], [104, 128, 152, 176], [96, 176, 160, 224]]])


@pytest.mark.parametrize("resolution,table", [(256, TABLE_7), (1024, TABLE_9)])
@pytest.mark.parametrize("channels", [64, 48, 32])
def test_layer_table_matches_tables_7_and_9(resolution, table, channels):
    specs = discriminator_layer_table(channels, resolution)
    expected = [(k, s, 1 if f is None else f * channels, "lrelu" if act else "none")
                for k, s, f, act in table]
    assert [(s.kernel, s.stride, s.out_channels, s.activation) for s in specs] == expected
    critic = PatchDiscriminator(channels, resolution)
    convs = [m for m in critic if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in convs] == [e[:3] for e in expected]
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in critic) == len(table) - 1
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in critic)  # none in Table 7


def test_seven_critics_with_the_paper_widths():
    d = MultiDiscriminator(256)
    widths = {name: d.critics[name].channels for name in DISCRIMINATOR_NAMES}
    assert widths == {"global": 64, "local": 48, "local_subdivision": 32, "left_eye": 32,
                      "right_eye": 32, "nose": 32, "mouth": 32}


def test_crop_and_resize_is_exact_for_same_size_and_bilinear_otherwise():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 40, 50)
    boxes = torch.tensor([[3, 5, 19, 13], [30, 20, 46, 28]])
    crops = crop_and_resize(image, boxes, (8, 16))
    torch.testing.assert_close(crops[0], image[0, :, 5:13, 3:19])
    torch.testing.assert_close(crops[1], image[1, :, 20:28, 30:46])
    # Doubling a box equals cropping the ×2 bilinear upsampled image.
    up = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
    doubled = crop_and_resize(image, boxes, (16, 32))
    torch.testing.assert_close(doubled[0], up[0, :, 10:26, 6:38])


def test_local_boxes_rectangles_irregular_and_empty():
    mask = torch.zeros(3, 1, 64, 64)
    mask[0, :, 10:30, 5:45] = 1                 # rectangle → its bounding box
    mask[1, :, 10:30, 5:45] = 1
    mask[1, :, 30:40, 5:10] = 1                 # L-shape → central box
    boxes = local_boxes(mask, (32, 32))          # sample 2: no hole → central box
    assert boxes.tolist() == [[5, 10, 45, 30], [16, 16, 48, 48], [16, 16, 48, 48]]


def test_forward_crops_and_scores():
    torch.manual_seed(0)
    d = MultiDiscriminator(256)
    image = torch.rand(2, 3, 256, 256, requires_grad=True)
    mask = torch.zeros(2, 1, 256, 256)
    mask[0, :, 64:192, 64:192] = 1
    mask[1, :, 30:130, 120:220] = 1
    boxes = BOXES.expand(2, 4, 4)
    crops = d.crop(image, mask, boxes)
    assert crops["local"].shape == (2, 3, 128, 128)
    torch.testing.assert_close(crops["local"][0], image[0, :, 64:192, 64:192])
    quadrants = crops["local_subdivision"].view(2, 4, 3, 64, 64)
    torch.testing.assert_close(quadrants[1, 3], crops["local"][1, :, 64:, 64:])
    torch.testing.assert_close(crops["mouth"][0], image[0, :, 176:224, 96:160])
    scores = d(image, mask, boxes)
    assert set(scores) == set(DISCRIMINATOR_NAMES)
    assert scores["global"].shape == (2, 1, 30, 30)
    assert scores["local_subdivision"].shape == (8, 1, 6, 6)
    sum(s.sum() for s in scores.values()).backward()
    assert image.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="boxes must have shape"):
        d(image, mask, boxes[:, :3])
