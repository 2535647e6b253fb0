"""Image files: finding them in a folder, decoding them to squares, as tensors.

Shared by the dataset (``oracleface.data.folders``) and the landmark cache (``oracleface.data.landmarks``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CACHE_MARKER = ".oracleface-cache"  # in every dataset cache folder: never scanned as images
# What PIL raises for files that are not images, truncated or corrupt.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


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
        image = image.convert("RGB")  # forces the full decode, so truncation raises here
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def check_decodable(path) -> None:
    """Decode ``path`` as cheaply as possible (JPEG at 1/8 scale), raising ``DECODE_ERRORS``."""
    with Image.open(path) as image:
        image.draft("RGB", (1, 1))
        image.load()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ``(3, H, W)`` float32 in [0, 1]."""
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    return torch.from_numpy(np.ascontiguousarray(pixels))
