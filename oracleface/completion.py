"""Inference on one photo, behind ``oracleface complete IMAGE --mask MASK.png|center|random
--checkpoint CKPT [--out OUT.png] [--side-by-side PATH] [--align dlib|face-alignment]
[--overwrite]`` (the command line is ``oracleface.cli.complete``).

Any image size. The model works at its training resolution R (256 or 1024), so:

1. Without ``--align`` the photo is taken as an aligned face (like the training data):
   it is padded to a square by replicating its border (padding counts as known pixels,
   so the face is never stretched), resized to R×R (Lanczos), completed, and the result
   is resized back (Lanczos) and cropped to the original frame.
2. With ``--align``, a landmark provider finds the face; a similarity transform maps its
   68 landmarks onto the canonical template at R×R (least squares); the photo is warped
   into that aligned frame, completed, and the completion is warped back with the
   inverse transform.
3. Either way only the hole pixels are taken from the model: every known pixel of OUT
   equals the input's exactly. The hole is mapped to R×R conservatively (a model pixel
   is missing if any photo pixel it covers is), so nothing of the hole leaks in as
   "known". Hole pixels outside the aligned face crop (with ``--align``) cannot be
   completed and are left as they are, with a warning.

4. Output: PNG by default (``IMAGE_completed.png`` beside the photo); the format follows
   ``--out``'s extension, checked before the model runs. Lossless formats (PNG, WebP,
   which is written lossless, TIFF, BMP, ...) keep every known pixel bit-identical; a
   lossy one (JPEG, ...) changes them, and ``complete`` says so in one warning line.
   Outputs are written atomically. ``--out`` / ``--side-by-side`` that name an input
   (the photo, the mask, the checkpoint) are refused unless ``--overwrite``; the two
   outputs must be different files.

Photos and masks are read by ``oracleface.data.images`` (every Pillow mode, EXIF orientation,
transparency on white). Mask files: any image of the photo's size; bright pixels (≥ 128
in grayscale) are the hole. ``center``: a centred square of half the photo's shorter side; ``random``: one of
the paper's random rectangles, scaled to the photo (``--seed``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oracleface.common import atomic_write
from oracleface.visualize import masked_picture, side_by_side

MASK_KEYWORDS = ("center", "random")


# ----------------------------------------------------------------------------- masks
def load_hole(mask: str, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """The hole ``(H, W)`` bool for ``mask`` (a file, ``center`` or ``random``) and an image
    of ``size = (width, height)``."""
    from oracleface.data.masks import center_mask, random_rectangle_mask

    width, height = size
    side = min(width, height)
    hole = np.zeros((height, width), dtype=bool)
    top, left = (height - side) // 2, (width - side) // 2
    if mask == "center":
        square = center_mask(side).numpy()[0] > 0
    elif mask == "random":
        square = random_rectangle_mask(side, torch.Generator().manual_seed(seed)).numpy()[0] > 0
    else:
        from oracleface.data.images import DECODE_ERRORS, decode_error_reason, load_gray

        path = Path(mask)
        if not path.is_file():
            raise FileNotFoundError(f"--mask {mask}: no such file (or use 'center' / 'random')")
        try:
            picture = load_gray(path)
        except DECODE_ERRORS as error:
            raise ValueError(f"--mask {mask}: cannot read it as an image: {decode_error_reason(error)}") from error
        if picture.size != (width, height):
            raise ValueError(f"--mask {mask} is {picture.size[0]}×{picture.size[1]} but the image is "
                             f"{width}×{height}; the mask must have the image's size")
        hole = np.asarray(picture) >= 128
        if not hole.any():
            raise ValueError(f"--mask {mask} marks no pixel as missing (holes are bright pixels, ≥ 128)")
        return hole
    hole[top:top + side, left:left + side] = square
    return hole


def hole_to_model(hole: np.ndarray, resolution: int) -> torch.Tensor:
    """A ``(H, W)`` bool hole at photo resolution → ``(1, 1, R, R)`` float at model resolution,
    conservatively (any covered photo pixel missing → missing)."""
    coverage = Image.fromarray(hole.astype(np.uint8) * 255).resize((resolution, resolution),
                                                                   Image.Resampling.BOX)
    return torch.from_numpy((np.asarray(coverage) > 0).astype(np.float32))[None, None]


# ----------------------------------------------------------------------------- completion
@torch.no_grad()
def run_generator(generator, square: np.ndarray, hole: torch.Tensor) -> np.ndarray:
    """Complete an ``(R, R, 3)`` float image in [0, 1]; returns the raw output, same shape."""
    device = next(generator.parameters()).device
    image = torch.from_numpy(square).permute(2, 0, 1)[None].float().to(device)
    output = generator(image, hole.to(device))
    return output[0].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy()


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W, 3)`` float image in [0, 1] to ``size = (width, height)`` (Lanczos)."""
    channels = [np.asarray(Image.fromarray(array[..., c].astype(np.float32), mode="F")
                           .resize(size, Image.Resampling.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 1)


def complete_unaligned(generator, photo: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Model prediction for every pixel of ``photo`` ``(H, W, 3)`` float (see module docstring, 1)."""
    height, width = hole.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pad = ((top, side - height - top), (left, side - width - left))
    square = np.pad(photo, pad + ((0, 0),), mode="edge")
    square_hole = np.pad(hole, pad, mode="constant")
    resolution = generator.resolution
    small = _resize_float(square, (resolution, resolution))
    output = run_generator(generator, small, hole_to_model(square_hole, resolution))
    return _resize_float(output, (side, side))[top:top + height, left:left + width]


def _fit_similarity(source: np.ndarray, target: np.ndarray):
    """Least-squares similarity transform source → target, or None when it cannot be fitted
    (scikit-image ≥ 0.26 has ``from_estimate``; older releases only the in-place ``estimate``)."""
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):
        transform = SimilarityTransform.from_estimate(source, target)
        return transform if transform else None
    transform = SimilarityTransform()
    return transform if transform.estimate(source, target) else None


def complete_aligned(generator, photo: np.ndarray, hole: np.ndarray, provider: str) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction (H, W, 3), covered (H, W) bool)``: the completion through face alignment
    (module docstring, 2); ``covered`` marks the pixels inside the aligned crop."""
    from skimage.transform import warp

    from oracleface.data.landmarks import canonical_landmarks, get_provider

    resolution = generator.resolution
    points = get_provider(provider)((photo * 255).round().astype(np.uint8))
    if points is None:
        raise ValueError(f"--align {provider}: no face found in the image")
    to_aligned = _fit_similarity(np.asarray(points, dtype=np.float64), canonical_landmarks(resolution))
    if to_aligned is None:
        raise ValueError(f"--align {provider}: could not fit a similarity transform to the landmarks")
    shape = (resolution, resolution)
    # warp() takes the map from output coordinates to input coordinates.
    aligned = warp(photo, to_aligned.inverse, output_shape=shape, order=3, mode="edge")
    aligned_hole = warp(hole.astype(np.float64), to_aligned.inverse, output_shape=shape, order=0) > 0
    output = run_generator(generator, np.clip(aligned, 0, 1),
                           torch.from_numpy(aligned_hole.astype(np.float32))[None, None])
    height, width = hole.shape
    back = warp(output, to_aligned, output_shape=(height, width), order=3, mode="edge")
    covered = warp(np.ones(shape), to_aligned, output_shape=(height, width), order=0, cval=0) > 0
    return np.clip(back, 0, 1), covered


def complete_photo(generator, photo: Image.Image, hole: np.ndarray, align: str | None = None) -> Image.Image:
    """The completed photo: hole pixels from the model, every other pixel exactly ``photo``'s."""
    original = np.asarray(photo.convert("RGB"))
    if hole.shape != original.shape[:2]:
        raise ValueError(f"hole must have the image's shape {original.shape[:2]}; got {hole.shape}")
    values = original.astype(np.float32) / 255
    if align is None:
        prediction, fill = complete_unaligned(generator, values, hole), hole
    else:
        prediction, covered = complete_aligned(generator, values, hole, align)
        fill = hole & covered
        if (hole & ~covered).any():
            warnings.warn(f"{int((hole & ~covered).sum())} hole pixels lie outside the aligned face "
                          "crop and are left unchanged", UserWarning, stacklevel=2)
    result = original.copy()
    result[fill] = (prediction[fill] * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(result)


LOSSLESS_FORMATS = ("PNG", "WEBP", "TIFF", "BMP", "DIB", "PPM", "TGA", "SGI", "QOI", "PCX", "IM")
SAVE_OPTIONS = {"WEBP": {"lossless": True, "exact": True}, "PNG": {"compress_level": 6}}


def output_format(path, flag: str) -> str:
    """The Pillow format ``path``'s extension asks for; ValueError naming ``flag`` when there is none."""
    Image.init()
    suffix = Path(path).suffix.lower()
    format = Image.registered_extensions().get(suffix)
    if format is None or format not in Image.SAVE:
        raise ValueError(f"{flag} {path}: {'no' if not suffix else 'unknown'} image extension"
                         f"{'' if not suffix else f' {suffix!r}'}; use .png (lossless, the default) or "
                         "another image extension such as .webp, .tif or .jpg")
    return format


def _same_file(first: Path, second: Path) -> bool:
    try:
        if first.exists() and second.exists():
            return os.path.samefile(first, second)
        return first.resolve() == second.resolve()
    except (OSError, RuntimeError):  # a symlink loop: it cannot be either file
        return False


def check_outputs(inputs: dict[str, Path], outputs: dict[str, Path], overwrite: bool = False) -> dict[str, str]:
    """Refuse output paths that would destroy something, before any work is done.

    ``inputs`` / ``outputs``: ``{flag: path}``. An output that is an input is refused unless
    ``overwrite``; two outputs that are one file are always refused (one would be lost); a
    folder, an unknown extension or an unwritable folder is refused. Returns
    ``{flag: Pillow format}``; raises ValueError naming the flag.
    """
    formats = {}
    for flag, path in outputs.items():
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file name such as {path / 'completed.png'}")
        for input_flag, source in inputs.items():
            if not overwrite and _same_file(path, source):
                raise ValueError(f"{flag} {path} is the {input_flag} {source}: writing it would destroy the "
                                 "input; choose another path (or pass --overwrite to replace it)")
        formats[flag] = output_format(path, flag)
        folder = next((parent for parent in path.absolute().parents if parent.exists()), None)
        if folder is not None and not folder.is_dir():
            raise ValueError(f"{flag} {path}: {folder} is a file, so it cannot hold the output")
        if folder is not None and not os.access(folder, os.W_OK):
            raise ValueError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    flags = list(outputs)
    for index, flag in enumerate(flags):
        for other in flags[index + 1:]:
            if _same_file(outputs[flag], outputs[other]):
                raise ValueError(f"{other} {outputs[other]} is the same file as {flag}; give them different paths")
    return formats


def save_image(picture: Image.Image, path: Path, format: str) -> None:
    """Write ``picture`` atomically in ``format`` (WebP losslessly)."""
    with atomic_write(path) as temporary:
        picture.save(temporary, format=format, **SAVE_OPTIONS.get(format, {}))


def default_output(image) -> Path:
    """Where ``complete`` writes without ``--out``: ``IMAGE_completed.png`` beside the photo."""
    image = Path(image)
    return image.with_name(f"{image.stem}_completed.png")


def complete_file(image, mask: str, checkpoint, out=None, side_by_side_path=None, align: str | None = None,
                  device: str = "auto", seed: int = 0, overwrite: bool = False) -> Path:
    """The ``complete`` command as a function; returns the written path. Every check
    (inputs readable, outputs safe, see ``check_outputs``) runs before the model does."""
    from oracleface.data.images import DECODE_ERRORS, decode_error_reason, load_rgb
    from oracleface.training.checkpoint import generator_from_checkpoint
    from oracleface.training.runtime import resolve_device

    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"IMAGE {image}: no such file")
    out = default_output(image) if out is None else Path(out)
    inputs = {"IMAGE": image, "--checkpoint": Path(checkpoint)}
    if mask not in MASK_KEYWORDS:
        inputs["--mask"] = Path(mask)
    outputs = {"--out": out}
    if side_by_side_path is not None:
        outputs["--side-by-side"] = Path(side_by_side_path)
    formats = check_outputs(inputs, outputs, overwrite)
    if formats["--out"] not in LOSSLESS_FORMATS:
        warnings.warn(f"--out {out}: {formats['--out']} is a lossy format: it changes the known pixels too "
                      "(they stay bit-identical only in a lossless format such as .png)", UserWarning,
                      stacklevel=2)
    try:
        photo = load_rgb(image)
    except DECODE_ERRORS as error:
        raise ValueError(f"IMAGE {image}: cannot read it as an image: {decode_error_reason(error)}") from error
    hole = load_hole(mask, photo.size, seed)
    generator, _ = generator_from_checkpoint(checkpoint, resolve_device(device))
    result = complete_photo(generator, photo, hole, align)
    save_image(result, out, formats["--out"])
    if side_by_side_path is not None:
        save_image(side_by_side([photo, masked_picture(photo, hole), result]), Path(side_by_side_path),
                   formats["--side-by-side"])
    return out
