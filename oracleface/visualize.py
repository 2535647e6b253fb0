"""Image grids for training samples and before/after pictures.

``sample_grid`` lays out one row per sample: masked input | completed output | ground
truth, with the component boxes (``oracleface.data.boxes`` order) drawn on the ground truth.
Holes in the input are shown in mid grey.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from oracleface.common import composite
from oracleface.data.boxes import COMPONENTS

BOX_COLOURS = {"left_eye": (0, 200, 255), "right_eye": (0, 255, 120), "nose": (255, 200, 0),
               "mouth": (255, 60, 60)}
HOLE_GREY = 0.5
GAP = 2  # pixels between tiles


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` float in [0, 1] → RGB PIL image (values clamped)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W); got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def masked_input(image: torch.Tensor, hole_mask: torch.Tensor) -> torch.Tensor:
    """What the network sees, for display: hole pixels replaced by grey. Shapes as ``image``."""
    return composite(image, torch.full_like(image, HOLE_GREY), hole_mask)


def draw_boxes(picture: Image.Image, boxes: torch.Tensor) -> Image.Image:
    """A copy of ``picture`` with the ``(4, 4)`` component boxes ``(x0, y0, x1, y1)`` outlined."""
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    for name, (x0, y0, x1, y1) in zip(COMPONENTS, boxes.tolist()):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOURS[name], width=1)
    return picture


def tile(rows: list[list[Image.Image]], gap: int = GAP) -> Image.Image:
    """Paste equally sized pictures into a grid (rows × columns) on a white background."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * width + (columns - 1) * gap,
                               len(rows) * height + (len(rows) - 1) * gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            canvas.paste(picture, (c * (width + gap), r * (height + gap)))
    return canvas


def sample_grid(image: torch.Tensor, hole_mask: torch.Tensor, output: torch.Tensor,
                boxes: torch.Tensor | None = None, max_rows: int = 4) -> Image.Image:
    """The training-sample picture: rows of input | output | ground truth.

    ``image``, ``output``: ``(B, 3, H, W)`` in [0, 1]; ``hole_mask``: ``(B, 1, H, W)``
    (1 = missing); ``boxes``: ``(B, 4, 4)`` or None. The output column is the composite
    (known pixels from the input), which is what completion delivers.
    """
    if image.shape != output.shape or image.dim() != 4:
        raise ValueError(f"image and output must both be (B, 3, H, W); got {tuple(image.shape)} "
                         f"and {tuple(output.shape)}")
    completed = composite(image, output, hole_mask)
    shown = masked_input(image, hole_mask)
    rows = []
    for b in range(min(max_rows, image.shape[0])):
        truth = to_pil(image[b])
        if boxes is not None:
            truth = draw_boxes(truth, boxes[b])
        rows.append([to_pil(shown[b]), to_pil(completed[b]), truth])
    return tile(rows)


def save_png(picture: Image.Image, path) -> Path:
    """Save ``picture`` as PNG, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def side_by_side(pictures: list[Image.Image]) -> Image.Image:
    """One row of pictures of the same size (e.g. input | masked | output)."""
    sizes = {picture.size for picture in pictures}
    if len(sizes) != 1:
        raise ValueError(f"side_by_side needs pictures of one size; got {sorted(sizes)}")
    return tile([[picture.convert("RGB") for picture in pictures]])


def masked_picture(picture: Image.Image, hole: np.ndarray) -> Image.Image:
    """``picture`` with the pixels where ``hole`` (H, W bool) is true painted grey."""
    array = np.asarray(picture.convert("RGB")).copy()
    array[hole] = round(HOLE_GREY * 255)
    return Image.fromarray(array)
