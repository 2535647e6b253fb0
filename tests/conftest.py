import os

import numpy as np
import pytest
import torch
from PIL import Image

# Triton kernels run on the CPU only through the interpreter, and Triton reads this
# variable when kernels are defined: set it before dsa_ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_interpreter import install_boolean_masks

    assert install_boolean_masks() is None, install_boolean_masks()


@pytest.fixture(scope="session")
def faces(tmp_path_factory):
    """A tiny face folder for end-to-end runs: six smooth random colour fields (4×4 noise
    upsampled to 64×64, like blurry faces); the dataset resizes them to 256²."""
    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for i in range(6):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC).save(folder / f"face{i}.png")
    return folder


@pytest.fixture(scope="session")
def celeba_hq():
    """The folder of real aligned CelebA-HQ photos beside the repository (../shared); tests
    that need them skip cleanly where it is absent."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "faces" / "celeba_hq"
    if not any(folder.glob("*.jpg")):
        pytest.skip(f"{folder} (real aligned faces) is not available")
    return folder
