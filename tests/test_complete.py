"""oracleface.completion: holes for photos of any size, conservative resizing, known pixels kept."""
import numpy as np
import pytest
import torch
from PIL import Image

from oracleface.completion import complete_photo, hole_to_model, load_hole
from oracleface.models import Generator


def test_center_and_random_holes_fit_non_square_photos():
    center = load_hole("center", (100, 60))
    assert center.shape == (60, 100) and center.sum() == 30 * 30
    assert np.argwhere(center).mean(0).tolist() == pytest.approx([29.5, 49.5])
    random_a, random_b = load_hole("random", (100, 60), seed=3), load_hole("random", (100, 60), seed=3)
    assert np.array_equal(random_a, random_b) and 0.13 <= random_a.sum() / 60**2 <= 0.26


def test_mask_files_must_match_the_photo_and_mark_a_hole(tmp_path):
    Image.new("L", (50, 40), 0).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="marks no pixel"):
        load_hole(str(tmp_path / "empty.png"), (50, 40))
    with pytest.raises(ValueError, match="must have the image's size"):
        load_hole(str(tmp_path / "empty.png"), (40, 50))
    with pytest.raises(FileNotFoundError, match="center"):
        load_hole(str(tmp_path / "absent.png"), (40, 50))


def test_hole_resizing_is_conservative():
    hole = np.zeros((1000, 1000), dtype=bool)
    hole[500, 500] = True  # one photo pixel
    small = hole_to_model(hole, 256)
    assert small.shape == (1, 1, 256, 256) and small.sum() >= 1


def test_completion_keeps_every_known_pixel_exactly():
    torch.manual_seed(0)
    generator = Generator(256, dsa_backend="reference", width=0.125).eval()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8))
    hole = np.zeros((50, 80), dtype=bool)
    hole[10:30, 20:50] = True
    result = np.asarray(complete_photo(generator, photo, hole))
    assert result.shape == (50, 80, 3)
    np.testing.assert_array_equal(result[~hole], np.asarray(photo)[~hole])
