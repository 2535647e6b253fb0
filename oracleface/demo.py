"""``oracleface demo [--out DIR] [--steps N] [--device]``: the whole pipeline on a fresh machine.

Nothing is downloaded. The photos are the ones scikit-image ships in its wheel
(``skimage.data``): the 100 face crops of ``lfw_subset`` (Labeled Faces in the Wild,
25×25 grayscale), the faces of ``astronaut`` (Eileen Collins) and ``camera`` (the
cameraman), and ``chelsea`` (a cat's face) and ``coffee`` for variety. The astronaut's
face is held out; the rest train a narrow model (``--width``, default 1/8 of the paper's
channels) for ``--steps`` steps at 256² with random rectangles; the VGG perceptual term
is off (its weights may be absent and it is the slowest part on a CPU), the other
losses and all seven critics are on. Then the held-out face is completed with the centre
mask and ``before_after.png`` (input | masked | output) is written.

It shows that data, training, checkpointing and completion run end to end; a few
hundred CPU steps on ~100 tiny photos claim nothing about quality.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEMO_RESOLUTION = 256
DEFAULT_STEPS = 30
DEFAULT_WIDTH = 0.125


def _square(array: np.ndarray, top: int, left: int, side: int) -> Image.Image:
    crop = array[top:top + side, left:left + side]
    if crop.ndim == 2:
        crop = np.stack([crop] * 3, -1)
    if crop.dtype != np.uint8:
        crop = (np.clip(crop, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(crop).resize((DEMO_RESOLUTION, DEMO_RESOLUTION), Image.Resampling.LANCZOS)


def write_demo_photos(folder) -> tuple[Path, Path]:
    """Write the training photos into ``folder/train`` and the held-out face; returns both paths."""
    from skimage import data

    folder = Path(folder)
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    for index, face in enumerate(data.lfw_subset()[:100]):  # the first 100 are faces
        _square(face, 0, 0, 25).save(train / f"lfw_{index:03d}.png")
    _square(data.camera(), 40, 180, 200).save(train / "camera_face.png")
    _square(data.chelsea(), 0, 80, 300).save(train / "chelsea.png")
    _square(data.coffee(), 0, 100, 400).save(train / "coffee.png")
    held_out = folder / "astronaut_face.png"
    _square(data.astronaut(), 0, 120, 250).save(held_out)
    return train, held_out


def run_demo(out="oracleface-demo", steps: int = DEFAULT_STEPS, device: str = "cpu",
             width: float = DEFAULT_WIDTH, batch_size: int = 4) -> Path:
    """Train, complete, write ``OUT/before_after.png``; returns its path."""
    from oracleface.completion import complete_file
    from oracleface.training.trainer import train

    out = Path(out)
    train_folder, held_out = write_demo_photos(out / "photos")
    run_dir = out / "run"
    layers = [{"data": str(train_folder), "out": str(run_dir), "steps": steps, "width": width,
               "batch_size": batch_size, "lambda_perceptual": 0.0, "device": device, "workers": 0,
               "test_size": 1, "checkpoint_every": steps, "sample_every": max(1, steps // 2),
               "log_every": 1}]
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    summary = train(layers, resume="latest" if checkpoint.exists() else None)
    before_after = out / "before_after.png"
    complete_file(held_out, "center", summary["checkpoint"] or checkpoint, out / "completed.png",
                  side_by_side_path=before_after, device=device)
    return before_after
