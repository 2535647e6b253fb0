"""The seven PatchGAN discriminators of Section 3.2 (Fig. 4, Table 7 / Table 9).

==================  ====  =====================================================
name                C     input
==================  ====  =====================================================
global              64    the whole image
local               48    the hole's bounding box resized to 128×128 (×4 at 1024²);
                          the central 128×128 region when the hole is not one
                          rectangle (irregular masks) or is empty
local_subdivision   32    the four quadrants of the local crop, one shared D
left_eye … mouth    32    the component boxes of the batch (``oracleface.data.boxes``),
                          resampled to the fixed per-component size
==================  ====  =====================================================

Crops are taken with ``grid_sample`` at pixel centres, so they are batched over
per-sample boxes, differentiable with respect to the image and device-agnostic; a box
of exactly the output size is an exact copy of its pixels.

The critics have no normalisation layers, as in Table 7 — which is also what WGAN-GP
needs (a critic with BatchNorm couples the samples, so its per-sample gradient norm
is not defined).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from oracleface.data.boxes import COMPONENTS, box_sizes
from oracleface.models.generator import scaled_channels

Tensor = torch.Tensor

DISCRIMINATOR_NAMES = ("global", "local", "local_subdivision") + COMPONENTS
DISCRIMINATOR_CHANNELS = {"global": 64, "local": 48, "local_subdivision": 32,
                          **{name: 32 for name in COMPONENTS}}
LOCAL_SIZE_256 = 128
LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class DiscriminatorLayerSpec:
    """One row of Table 7 / Table 9: ``Conv(kernel, kernel, out_channels), stride``."""

    index: int
    kernel: int
    stride: int
    out_channels: int
    activation: str  # "lrelu" or "none" (the last layer outputs raw critic scores)


def discriminator_layer_table(channels: int, resolution: int = 256) -> list[DiscriminatorLayerSpec]:
    """Table 7 (256) or Table 9 (1024, two more stride-2 layers) for width ``C = channels``."""
    if resolution not in (256, 1024):
        raise ValueError(f"resolution must be 256 or 1024; got {resolution!r}")
    if channels <= 0:
        raise ValueError(f"channels must be positive; got {channels}")
    plan = ([(2, 1), (2, 2), (2, 4), (1, 8)] if resolution == 256
            else [(2, 1), (2, 2), (2, 4), (2, 8), (2, 8), (1, 8)])
    table = [DiscriminatorLayerSpec(i + 1, 4, stride, factor * channels, "lrelu")
             for i, (stride, factor) in enumerate(plan)]
    table.append(DiscriminatorLayerSpec(len(plan) + 1, 4, 1, 1, "none"))
    return table


class PatchDiscriminator(nn.Sequential):
    """PatchGAN critic: ``(N, 3, h, w)`` → score map ``(N, 1, h', w')`` (4×4 convs, padding 1)."""

    def __init__(self, channels: int, resolution: int = 256):
        self.table = discriminator_layer_table(channels, resolution)
        layers: list[nn.Module] = []
        in_channels = 3
        for spec in self.table:
            layers.append(nn.Conv2d(in_channels, spec.out_channels, spec.kernel, spec.stride, padding=1))
            if spec.activation == "lrelu":
                layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            in_channels = spec.out_channels
        super().__init__(*layers)
        self.channels = channels


def crop_and_resize(image: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear crops of one box per sample: ``(B,C,H,W)``, boxes ``(B,4)`` → ``(B,C,h,w)``.

    Boxes are ``(x0, y0, x1, y1)`` in pixels with x1, y1 exclusive (int or float);
    ``size = (h, w)``. Output pixel (r, c) samples the image at
    ``(x0 + (c + ½)·(x1−x0)/w, y0 + (r + ½)·(y1−y0)/h)`` (pixel-centre convention).
    """
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W); got {tuple(image.shape)}")
    if boxes.shape != (image.shape[0], 4):
        raise ValueError(f"boxes must have shape ({image.shape[0]}, 4); got {tuple(boxes.shape)}")
    out_h, out_w = size
    height, width = image.shape[-2:]
    boxes = boxes.to(device=image.device, dtype=image.dtype if image.is_floating_point() else torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    steps_x = torch.arange(out_w, device=image.device, dtype=boxes.dtype) + 0.5
    steps_y = torch.arange(out_h, device=image.device, dtype=boxes.dtype) + 0.5
    xs = x0[:, None] + steps_x * ((x1 - x0) / out_w)[:, None]  # (B, w) pixel coordinates
    ys = y0[:, None] + steps_y * ((y1 - y0) / out_h)[:, None]
    # grid_sample's normalised coordinates (align_corners=False): -1 and 1 are the outer edges.
    grid = torch.stack(torch.broadcast_tensors((2 * xs / width - 1)[:, None, :],
                                               (2 * ys / height - 1)[:, :, None]), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def local_boxes(hole_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """The local discriminator's box per sample: ``(B,1,H,W)`` → ``(B,4)`` int64.

    The bounding box of the hole when the hole is exactly one filled rectangle (random
    rectangles, the centre mask); otherwise (irregular masks, no hole) the central box
    of ``size = (h, w)``.
    """
    if hole_mask.dim() != 4 or hole_mask.shape[1] != 1:
        raise ValueError(f"hole_mask must have shape (B, 1, H, W); got {tuple(hole_mask.shape)}")
    hole = hole_mask[:, 0] > 0.5
    batch, height, width = hole.shape
    rows, cols = hole.any(dim=2), hole.any(dim=1)

    def span(line: Tensor) -> tuple[Tensor, Tensor]:
        first = line.int().argmax(dim=1)
        last = line.shape[1] - line.flip(1).int().argmax(dim=1)
        return first, last

    y0, y1 = span(rows)
    x0, x1 = span(cols)
    bbox = torch.stack([x0, y0, x1, y1], dim=1).long()
    count = hole.sum(dim=(1, 2))
    rectangular = (count > 0) & (count == (x1 - x0) * (y1 - y0))
    out_h, out_w = size
    top, left = (height - out_h) // 2, (width - out_w) // 2
    centre = torch.tensor([left, top, left + out_w, top + out_h], device=hole.device)
    return torch.where(rectangular[:, None], bbox, centre.expand(batch, 4))


class MultiDiscriminator(nn.Module):
    """Global, local, local-subdivision and four component critics (Fig. 4).

    Args:
        resolution: 256 (Table 7) or 1024 (Table 9); crop sizes scale with it.
        component_sizes: ``{component: (width, height)}`` of the component crops
            (default ``oracleface.data.boxes.box_sizes(resolution)``).
        width: channel multiplier in (0, 1] (1 = the paper; narrower for smoke runs).

    ``forward(image (B,3,R,R), hole_mask (B,1,R,R), boxes (B,4,4) int64)`` → dict
    ``name → (N, 1, h', w')`` raw critic scores, ``N = B`` except ``local_subdivision``
    (``N = 4B``: quadrants top-left, top-right, bottom-left, bottom-right of each sample).
    ``crop`` and ``score`` are the two halves, used separately by the gradient penalty.
    """

    def __init__(self, resolution: int = 256, component_sizes: dict | None = None, width: float = 1.0):
        super().__init__()
        if resolution not in (256, 1024):
            raise ValueError(f"resolution must be 256 or 1024; got {resolution!r}")
        self.resolution = resolution
        side = LOCAL_SIZE_256 * resolution // 256
        self.local_size = (side, side)
        sizes = component_sizes or box_sizes(resolution)
        missing = [name for name in COMPONENTS if name not in sizes]
        if missing:
            raise ValueError(f"component_sizes must give (width, height) for {COMPONENTS}; "
                             f"missing {missing}")
        self.component_sizes = {name: (int(sizes[name][1]), int(sizes[name][0])) for name in COMPONENTS}
        self.width = width
        self.critics = nn.ModuleDict({name: PatchDiscriminator(scaled_channels(DISCRIMINATOR_CHANNELS[name], width),
                                                               resolution)
                                      for name in DISCRIMINATOR_NAMES})

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, local_size={self.local_size}"

    def crop(self, image: Tensor, hole_mask: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        """Each critic's input: ``name → (N, 3, h, w)`` (see the class docstring for N)."""
        size = (self.resolution, self.resolution)
        if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != size:
            raise ValueError(f"image must have shape (B, 3, {size[0]}, {size[1]}); got {tuple(image.shape)}")
        batch = image.shape[0]
        if hole_mask.shape != (batch, 1, *size):
            raise ValueError(f"hole_mask must have shape ({batch}, 1, {size[0]}, {size[1]}); "
                             f"got {tuple(hole_mask.shape)}")
        if boxes.shape != (batch, len(COMPONENTS), 4):
            raise ValueError(f"boxes must have shape ({batch}, {len(COMPONENTS)}, 4); "
                             f"got {tuple(boxes.shape)}")
        local = crop_and_resize(image, local_boxes(hole_mask, self.local_size), self.local_size)
        half_h, half_w = self.local_size[0] // 2, self.local_size[1] // 2
        quadrants = torch.stack([local[..., :half_h, :half_w], local[..., :half_h, half_w:],
                                 local[..., half_h:, :half_w], local[..., half_h:, half_w:]], dim=1)
        crops = {"global": image, "local": local, "local_subdivision": quadrants.flatten(0, 1)}
        for k, name in enumerate(COMPONENTS):
            crops[name] = crop_and_resize(image, boxes[:, k], self.component_sizes[name])
        return crops

    def score(self, crops: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run each critic on its crop: ``name → (N, 1, h', w')``."""
        return {name: self.critics[name](crops[name]) for name in DISCRIMINATOR_NAMES}

    def forward(self, image: Tensor, hole_mask: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        return self.score(self.crop(image, hole_mask, boxes))
