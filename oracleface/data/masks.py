"""Hole masks for training and evaluation (paper §4.1 and App. D).

Every mask is a ``(1, H, W)`` float32 tensor with 1 = missing, 0 = known. Functions that
draw random masks take an optional ``torch.Generator``: the same seeded generator gives
the same mask; ``None`` uses torch's global RNG (so ``torch.manual_seed`` and the RNG
state saved with a checkpoint govern it). Masks are built in numpy: small torch ops
would start intra-op threads, which costs far more than the work on a busy machine.

- ``random_rectangle_mask``: the paper's random rectangles, sides 94..128 px at 256²
  (scaled with the image), anywhere in the image. Areas span (94/256)² = 13.48 % to 25 %
  of the image: the paper's "13.5 % ~ 25 %" is that range, rounded.
- ``center_mask``: the centred square (128×128 at 256²).
- ``irregular_mask``: free-form brush strokes (in the style of Yu et al. 2019), grown
  until a hole ratio drawn uniformly from ``ratio_range`` is reached.
- ``MaskFolder``: mask images from a folder (e.g. the NVIDIA irregular mask set),
  binarised, resized, optionally flipped/rotated by a random multiple of 90°.
- ``make_mask_sampler(kind, size)``: a ``generator -> (1, H, W)`` callable for the trainer.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from oracleface.data.images import DECODE_ERRORS, decode_error_reason, load_gray

MaskSampler = Callable[["torch.Generator | None"], torch.Tensor]

# Paper §4.1: rectangle sides between 94 and 128 px at 256×256.
RECTANGLE_SIDES_256 = (94, 128)
MASK_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def random_rectangle_mask(size: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random axis-aligned rectangle hole ``(1, size, size)``.

    Width and height are drawn independently and uniformly from 94..128 px scaled by
    ``size / 256`` (inclusive); the top-left corner is uniform over all positions that
    keep the rectangle inside the image.
    """
    _check_size(size)
    low, high = (max(1, round(side * size / 256)) for side in RECTANGLE_SIDES_256)
    width, height = (_randint(low, high + 1, generator) for _ in range(2))
    x0 = _randint(0, size - width + 1, generator)
    y0 = _randint(0, size - height + 1, generator)
    mask = np.zeros((1, size, size), dtype=np.float32)
    mask[:, y0:y0 + height, x0:x0 + width] = 1.0
    return torch.from_numpy(mask)


def center_mask(size: int = 256, hole: int | None = None) -> torch.Tensor:
    """The centred square hole ``(1, size, size)`` of side ``hole`` (default ``size // 2``,
    i.e. the paper's 128×128 at 256²)."""
    _check_size(size)
    hole = size // 2 if hole is None else hole
    if isinstance(hole, bool) or not isinstance(hole, int) or not 0 < hole <= size:
        raise ValueError(f"hole must be an int in 1..size ({size}); got {hole!r}")
    start = (size - hole) // 2
    mask = np.zeros((1, size, size), dtype=np.float32)
    mask[:, start:start + hole, start:start + hole] = 1.0
    return torch.from_numpy(mask)


def irregular_mask(size: int = 256, generator: torch.Generator | None = None,
                   ratio_range: tuple[float, float] = (0.05, 0.5)) -> torch.Tensor:
    """A free-form hole ``(1, size, size)`` made of random brush strokes.

    A target hole ratio is drawn uniformly from ``ratio_range``; strokes (polylines of
    4–12 segments with round joints, brush width 12–40 px at 256²) are added until the
    hole covers at least that fraction of the image, so the ratios spread over the range
    instead of clustering around one stroke count.
    """
    _check_size(size)
    low, high = ratio_range
    if not 0.0 < low <= high < 1.0:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high < 1; got {ratio_range!r}")
    target = low + (high - low) * _uniform(generator)
    scale = size / 256
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    # A stroke covers a few percent at most; the cap only guards against a pathological draw.
    for _ in range(200):
        _draw_stroke(draw, size, scale, generator)
        hole = np.asarray(canvas) > 0
        if hole.mean() >= target:
            break
    return torch.from_numpy(hole.astype(np.float32))[None]


def _draw_stroke(draw: ImageDraw.ImageDraw, size: int, scale: float,
                 generator: torch.Generator | None) -> None:
    width = max(1, round((12 + 28 * _uniform(generator)) * scale))
    x, y = size * _uniform(generator), size * _uniform(generator)
    angle = 2 * math.pi * _uniform(generator)
    points = [(x, y)]
    for _ in range(_randint(4, 13, generator)):
        # Mostly smooth strokes: each segment turns by at most ±60° from the previous one.
        angle += (_uniform(generator) - 0.5) * (2 * math.pi / 3)
        length = (10 + 30 * _uniform(generator)) * scale
        next_x, next_y = x + length * math.cos(angle), y + length * math.sin(angle)
        if not (0 <= next_x < size and 0 <= next_y < size):  # bounce off the border
            angle += math.pi
            next_x, next_y = x + length * math.cos(angle), y + length * math.sin(angle)
        x, y = min(max(next_x, 0), size - 1), min(max(next_y, 0), size - 1)
        points.append((x, y))
    draw.line(points, fill=255, width=width, joint="curve")
    radius = width / 2
    for px, py in (points[0], points[-1]):  # round caps
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)


class MaskFolder:
    """Mask images from a folder (searched recursively), drawn at random.

    Each call picks a file uniformly, converts it to grayscale, resizes it to ``size``²
    (bilinear, then thresholded at 50 % so edges stay smooth) and binarises it: bright
    pixels are holes unless ``invert`` (for sets that mark holes black). With ``flip``, a
    random horizontal flip; with ``rotate``, a random multiple of 90° (lossless, keeps the
    hole ratio). Returns ``(1, size, size)`` float32, 1 = missing.
    """

    def __init__(self, root, size: int = 256, flip: bool = True, rotate: bool = True,
                 invert: bool = False):
        _check_size(size)
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"mask folder {root} does not exist or is not a directory")
        self.files = sorted(path for path in root.rglob("*")
                            if path.is_file() and path.suffix.lower() in MASK_IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"mask folder {root} holds no mask images ({', '.join(MASK_IMAGE_EXTENSIONS)})")
        self.root, self.size, self.flip, self.rotate, self.invert = root, size, flip, rotate, invert
        self._refuse_degenerate_masks()

    CHECKED_MASKS = 64  # masks decoded at construction, evenly spread over the sorted files

    def _refuse_degenerate_masks(self) -> None:
        """Raise ValueError when the checked masks (all of them in folders of up to
        ``CHECKED_MASKS``) mark no hole, or nothing but holes, at ``size``²: training would
        run without holes (or without known pixels) and nothing would say so."""
        count = min(len(self.files), self.CHECKED_MASKS)
        indices = sorted({round(i * (len(self.files) - 1) / max(1, count - 1)) for i in range(count)})
        fractions = []
        for index in indices:
            try:
                fractions.append(float(self._load_hole(index).mean()))
            except DECODE_ERRORS as error:
                raise ValueError(f"mask folder {self.root}: cannot read {self.files[index]}: "
                                 f"{decode_error_reason(error)}") from error
        which = "all" if len(indices) == len(self.files) else f"all {len(indices)} checked"
        polarity = "holes are bright pixels (≥ 128)" + ("; invert=True: dark" if self.invert else "")
        if max(fractions) == 0:
            raise ValueError(f"mask folder {self.root}: {which} of its {len(self.files)} masks mark no pixel "
                             f"as missing at {self.size}² ({polarity}); training would see no holes")
        if min(fractions) == 1:
            raise ValueError(f"mask folder {self.root}: {which} of its {len(self.files)} masks mark every pixel "
                             f"as missing at {self.size}² ({polarity}); are holes marked the other way round?")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """The ``index``-th mask file, binarised and resized, without augmentation."""
        return torch.from_numpy(self._load_hole(index).astype(np.float32)[None])

    def _load_hole(self, index: int) -> np.ndarray:
        gray = load_gray(self.files[index]).resize((self.size, self.size), Image.Resampling.BILINEAR)
        hole = np.asarray(gray) >= 128
        return ~hole if self.invert else hole

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        hole = self._load_hole(_randint(0, len(self.files), generator))
        if self.flip and _randint(0, 2, generator):
            hole = hole[:, ::-1]
        if self.rotate:
            hole = np.rot90(hole, _randint(0, 4, generator))
        return torch.from_numpy(np.ascontiguousarray(hole, dtype=np.float32)[None])


MASK_KINDS = ("random", "center", "irregular", "folder:PATH")


def make_mask_sampler(kind: str, size: int = 256) -> MaskSampler:
    """A callable ``generator -> (1, size, size)`` mask for ``kind``.

    ``kind``: ``"random"`` (rectangles), ``"center"``, ``"irregular"`` or
    ``"folder:PATH"`` (``MaskFolder`` with flips and 90° rotations).
    """
    _check_size(size)
    if not isinstance(kind, str):
        raise TypeError(f"mask kind must be a str, one of {MASK_KINDS}; got {type(kind).__name__}")
    # Partials and classes, not lambdas: samplers must pickle to spawned DataLoader workers.
    if kind == "random":
        return functools.partial(random_rectangle_mask, size)
    if kind == "center":
        return _FixedMask(center_mask(size))
    if kind == "irregular":
        return functools.partial(irregular_mask, size)
    if kind.startswith("folder:") and len(kind) > len("folder:"):
        return MaskFolder(kind[len("folder:"):], size)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")


class _FixedMask:
    """A sampler that ignores the generator and returns a copy of one mask."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mask.clone()


# Random draws through torch so a torch.Generator (or the global torch RNG) decides them.
def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high, (), generator=generator))


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the image side in pixels); got {size!r}")
