"""One image loader for every path (oracleface.data.images): each Pillow mode becomes the right
8-bit RGB, and unreadable files are skipped with a count by datasets, refused by mask folders."""
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from oracleface.data.folders import FaceFolder
from oracleface.data.images import TRANSPARENT_BACKGROUND, load_rgb, load_square_image, to_gray, to_rgb
from oracleface.data.masks import MaskFolder


def _rgb(image):
    return np.asarray(to_rgb(image))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_gray_is_scaled_not_clipped(mode, tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.new(mode, (4, 1))
    for x, value in enumerate(ramp[0]):
        image.putpixel((x, 0), int(value))
    assert _rgb(image)[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (_rgb(image)[..., 0] == _rgb(image)[..., 2]).all()
    if mode == "I;16":  # and from a real 16-bit PNG file, through the dataset loader
        path = tmp_path / "sixteen.png"
        Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(path)
        assert Image.open(path).mode.startswith("I")
        assert np.asarray(load_rgb(path)).max() == 100
        assert np.asarray(load_square_image(path, 16)).max() == 100


def test_thirty_two_bit_integer_and_float_gray():
    sixteen_bit_in_i = Image.fromarray(np.array([[0, 257 * 200]], dtype=np.int32))
    assert _rgb(sixteen_bit_in_i)[0, :, 1].tolist() == [0, 200]
    wide = Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert _rgb(wide)[0, :, 1].tolist() == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert _rgb(unit)[0, :, 0].tolist() == [0, 128, 255, 0]
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert _rgb(bytes_range)[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_is_composited_on_white():
    assert TRANSPARENT_BACKGROUND == (255, 255, 255)
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (200, 0, 0, 0))      # fully transparent: the background
    rgba.putpixel((1, 0), (0, 0, 200, 128))    # half: halfway to white
    pixels = _rgb(rgba)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert np.abs(pixels[0, 1].astype(int) - [127, 127, 227]).max() <= 1
    la = Image.new("LA", (1, 1), (0, 0))
    assert _rgb(la)[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # colour 0 is transparent
    assert _rgb(palette).tolist() == [[[255, 255, 255], [40, 50, 60]]]


def test_cmyk_and_exif_orientation(tmp_path):
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red ink
    assert _rgb(cmyk)[0, 0].tolist() == [255, 0, 0]
    # 4×2 image, left half black, right half white, tagged "rotate 90° clockwise to view".
    picture = Image.new("L", (4, 2), 0)
    picture.paste(255, (2, 0, 4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    picture.save(path, exif=exif, quality=100)
    upright = load_rgb(path)
    assert upright.size == (2, 4)  # turned: now tall
    values = np.asarray(upright)[..., 0]
    assert values[0].mean() < 64 and values[-1].mean() > 192  # black on top after the turn
    assert np.asarray(to_gray(Image.open(path))).shape == (4, 2)


def _folder_with_bad_files(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"good{index}.png")
    (folder / "text.png").write_text("not an image")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    os.symlink("loop.png", folder / "loop.png")  # a symlink loop
    os.symlink(folder / "denied.png", folder / "denied_link.png")
    Image.new("RGB", (20, 20)).save(folder / "denied.png")
    return folder


def test_dataset_skips_every_kind_of_unreadable_file_with_one_counted_warning(tmp_path, monkeypatch):
    folder = _folder_with_bad_files(tmp_path)
    real_open = Image.open

    def open_denying(path, *args, **kwargs):  # tests run as root: simulate a file we may not read
        if os.path.basename(str(path)).startswith("denied"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_denying)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = FaceFolder(folder, resolution=16, split="train", test_size=0)
    assert sorted(dataset.files) == [f"good{index}.png" for index in range(4)]
    assert dataset.skipped == ["denied.png", "denied_link.png", "loop.png", "text.png", "truncated.png"]
    messages = [str(warning.message) for warning in caught if "unreadable" in str(warning.message)]
    assert len(messages) == 1 and "5 unreadable image(s) skipped" in messages[0]


def test_a_symlink_loop_in_the_data_folder_does_not_stop_training_setup(tmp_path):
    from oracleface.training.trainer import prepare_run

    folder = _folder_with_bad_files(tmp_path)
    config, state, _ = prepare_run([{"data": str(folder), "out": str(tmp_path / "run")}], None)
    with pytest.warns(UserWarning, match="unreadable"):
        dataset = FaceFolder(config.data, resolution=16, split="train", test_size=0)
    assert "loop.png" in dataset.skipped and state is None


@pytest.mark.parametrize("invert", [False, True])
def test_a_mask_folder_without_holes_is_refused(tmp_path, invert):
    folder = tmp_path / "masks"
    folder.mkdir()
    for index in range(3):
        Image.new("L", (32, 32), 255 if invert else 0).save(folder / f"m{index}.png")
    with pytest.raises(ValueError, match="mark no pixel as missing"):
        MaskFolder(folder, size=32, invert=invert)
    full = tmp_path / "full"
    full.mkdir()
    Image.new("I;16", (32, 32), 0 if invert else 65535).save(full / "f.png")
    with pytest.raises(ValueError, match="every pixel"):
        MaskFolder(full, size=32, invert=invert)
    # One mask with a hole among empty ones is a valid (if odd) folder.
    hole = Image.new("L", (32, 32), 255 if invert else 0)
    hole.paste(0 if invert else 255, (8, 8, 16, 16))
    hole.save(folder / "z.png")
    assert MaskFolder(folder, size=32, invert=invert).load(3).sum() == 64


def test_sixteen_bit_masks_are_scaled_before_thresholding(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    mask = np.full((32, 32), 257 * 100, dtype=np.uint16)  # dark: 100 of 255, not a hole
    mask[:8, :8] = 65535
    Image.fromarray(mask).save(folder / "m.png")
    assert MaskFolder(folder, size=32).load(0).sum() == 64
