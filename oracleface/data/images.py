"""Image files: finding them in a folder, decoding them to squares, as tensors.

Shared by every reader of images: the dataset (``oracleface.data.folders``, so training
and ``eval``), the landmark cache (``oracleface.data.landmarks``), mask folders
(``oracleface.data.masks``) and ``oracleface.completion``.

Every Pillow mode becomes 8-bit RGB the same way (``to_rgb``):

- EXIF orientation is applied first (a photo shows upright, as in image viewers).
- 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled to 8 bits
  (value / 257, rounded), never clipped; ``I`` (32-bit integers, which Pillow also uses
  for 16-bit files) the same when its values fit in 16 bits, else scaled from
  0..2³¹−1; ``F`` (32-bit float) is read as 0..1 when every value lies there, else as
  0..255; negative values become 0, NaN 0.
- Transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour) is
  composited on a WHITE background (``TRANSPARENT_BACKGROUND``).
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P``: Pillow's conversion.

Masks are read as grayscale the same way, without compositing (``to_gray``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CACHE_MARKER = ".oracleface-cache"  # in every dataset cache folder: never scanned as images
# What PIL raises for files that are not images, truncated or corrupt.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
TRANSPARENT_BACKGROUND = (255, 255, 255)  # white: what transparent pixels become
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _wide_to_gray(image: Image.Image) -> Image.Image:
    """An ``I;16*``, ``I`` or ``F`` image as 8-bit ``L``, scaled (module docstring)."""
    values = np.asarray(image).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if image.mode == "F":
        top = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
    elif image.mode == "I" and values.size and values.max() > 65535:
        top = float(2**31 - 1)
    else:
        top = 65535.0
    scaled = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8: mode L


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation (unchanged when it has none)."""
    return ImageOps.exif_transpose(image) or image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as upright 8-bit RGB (see the module docstring for each mode)."""
    image = _upright(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _wide_to_gray(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        background = Image.new("RGBA", image.size, (*TRANSPARENT_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """Any Pillow image as upright 8-bit grayscale ``L`` (alpha ignored, 16-bit scaled)."""
    image = _upright(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _wide_to_gray(image)
    return image.convert("L")


def load_rgb(path) -> Image.Image:
    """Decode ``path`` fully as upright 8-bit RGB (``to_rgb``); raises ``DECODE_ERRORS``
    for files that are missing, unreadable, truncated or not images."""
    with Image.open(path) as image:
        return to_rgb(image)


def load_gray(path) -> Image.Image:
    """Decode ``path`` fully as upright 8-bit grayscale (``to_gray``); raises ``DECODE_ERRORS``."""
    with Image.open(path) as image:
        return to_gray(image)


def decode_error_reason(error: BaseException) -> str:
    """One line on why an image could not be read."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return error.strerror.lower()  # e.g. too many levels of symbolic links
    return f"not a readable image ({str(error).splitlines()[0][:120] if str(error) else type(error).__name__})"


def find_images(root, exclude=()) -> list[str]:
    """Relative POSIX paths of the images under ``root``, sorted; hidden folders, anything
    under the ``exclude`` folders and dataset caches (folders holding ``CACHE_MARKER``) are
    skipped."""
    root = Path(root)
    excluded = [Path(path).resolve() for path in exclude]
    found = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        if CACHE_MARKER in files:
            subdirectories[:] = []
            continue
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")
                             and (here / name).resolve() not in excluded]
        found += [(here / name).relative_to(root).as_posix() for name in files
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return sorted(found)


def load_square_image(path, size: int) -> Image.Image:
    """Decode ``path`` fully as RGB, centre-crop to a square and resize (antialiased) to ``size``².

    Raises one of ``DECODE_ERRORS`` for unreadable or truncated files.
    """
    with Image.open(path) as image:
        image.draft("RGB", (2 * size, 2 * size))  # JPEG only: DCT-domain downscale, still ≥ 2× target
        image = to_rgb(image)  # forces the full decode, so truncation raises here
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def check_decodable(path) -> None:
    """Decode ``path`` as cheaply as possible (JPEG at 1/8 scale), raising ``DECODE_ERRORS``."""
    with Image.open(path) as image:
        image.draft("RGB", (1, 1))
        to_rgb(image)  # the full decode, and the mode conversion training will do


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ``(3, H, W)`` float32 in [0, 1]."""
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    return torch.from_numpy(np.ascontiguousarray(pixels))
