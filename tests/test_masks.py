"""oracleface.data.masks: shapes, the paper's rectangle statistics, irregular strokes, folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from oracleface.data.masks import (
    MaskFolder,
    center_mask,
    irregular_mask,
    make_mask_sampler,
    random_rectangle_mask,
)


def _bounding_box(mask):
    # numpy: thousands of tiny torch ops would each wake intra-op threads.
    hole = mask[0].numpy()
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _assert_binary_mask(mask, size):
    assert mask.shape == (1, size, size) and mask.dtype == torch.float32
    assert np.isin(mask.numpy(), (0.0, 1.0)).all()


def _rectangle_statistics(size, draws, seed=0):
    generator = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(draws):
        mask = random_rectangle_mask(size, generator)
        x0, y0, x1, y1 = _bounding_box(mask)
        # Exactly one filled rectangle: the hole fills its bounding box.
        hole_pixels = int(mask.numpy().sum())
        assert hole_pixels == (x1 - x0) * (y1 - y0)
        stats.append((x0, y0, x1 - x0, y1 - y0, hole_pixels / size ** 2))
    return np.array(stats)


def test_random_rectangles_match_paper_statistics():
    x0, y0, width, height, area = _rectangle_statistics(256, 3000).T
    assert width.min() == 94 and width.max() == 128
    assert height.min() == 94 and height.max() == 128
    # The paper's 13.5 % is (94/256)² = 13.48 % rounded.
    assert area.min() >= (94 / 256) ** 2 - 1e-9 and area.max() <= 0.25 + 1e-9
    assert area.min() < 0.14 and area.max() > 0.24  # the whole range is used
    # Positions are uniform over the free range: quartiles of the relative offset.
    for offset, side in ((x0, width), (y0, height)):
        relative = offset / (256 - side)
        counts = np.histogram(relative, bins=4, range=(0, 1))[0] / len(relative)
        assert np.all(np.abs(counts - 0.25) < 0.04), counts


def test_random_rectangles_scale_with_size():
    _, _, width, height, area = _rectangle_statistics(512, 500, seed=1).T
    assert width.min() >= 188 and width.max() <= 256 and height.min() >= 188 and height.max() <= 256
    assert width.max() - width.min() > 50
    assert area.min() >= (188 / 512) ** 2 - 1e-9 and area.max() <= 0.25 + 1e-9


def test_center_mask_is_the_exact_central_square():
    mask = center_mask()
    _assert_binary_mask(mask, 256)
    expected = torch.zeros(1, 256, 256)
    expected[:, 64:192, 64:192] = 1
    assert torch.equal(mask, expected)
    assert _bounding_box(center_mask(512)) == (128, 128, 384, 384)
    assert _bounding_box(center_mask(256, hole=100)) == (78, 78, 178, 178)
    with pytest.raises(ValueError, match="hole"):
        center_mask(256, hole=300)


def test_irregular_masks_are_free_form_with_varied_ratios():
    generator = torch.Generator().manual_seed(0)
    ratios, fills = [], []
    for _ in range(150):
        mask = irregular_mask(256, generator)
        _assert_binary_mask(mask, 256)
        x0, y0, x1, y1 = _bounding_box(mask)
        hole_pixels = float(mask.numpy().sum())
        ratios.append(hole_pixels / 256 ** 2)
        fills.append(hole_pixels / ((x1 - x0) * (y1 - y0)))
    ratios = np.array(ratios)
    assert max(fills) < 0.95  # never a rectangle
    assert ratios.min() >= 0.05 and ratios.min() < 0.12 and ratios.max() > 0.4
    assert ratios.std() > 0.08
    with pytest.raises(ValueError, match="ratio_range"):
        irregular_mask(64, ratio_range=(0.5, 0.2))


@pytest.mark.parametrize("kind", ["random", "center", "irregular"])
def test_seeded_generators_reproduce_masks(kind):
    sampler = make_mask_sampler(kind, 128)
    first = sampler(torch.Generator().manual_seed(7))
    again = sampler(torch.Generator().manual_seed(7))
    _assert_binary_mask(first, 128)
    assert torch.equal(first, again)
    if kind != "center":
        others = [sampler(torch.Generator().manual_seed(seed)) for seed in range(8, 12)]
        assert any(not torch.equal(first, other) for other in others)
        # generator=None follows torch's global RNG.
        torch.manual_seed(3)
        from_global = sampler(None)
        torch.manual_seed(3)
        assert torch.equal(from_global, sampler(None))


@pytest.fixture
def mask_folder(tmp_path):
    # An L-shaped hole (white) so flips and rotations give 8 distinct masks.
    hole = np.zeros((64, 64), dtype=np.uint8)
    hole[8:56, 8:20] = 255
    hole[44:56, 8:40] = 255
    (tmp_path / "nested").mkdir()
    Image.fromarray(hole).save(tmp_path / "nested" / "l_shape.png")
    Image.fromarray(np.full((40, 30), 255, dtype=np.uint8)).convert("RGB").save(tmp_path / "full.png")
    (tmp_path / "notes.txt").write_text("not a mask")
    return tmp_path


def test_mask_folder_loads_binarised_resized_masks(mask_folder):
    masks = MaskFolder(mask_folder, size=32, flip=False, rotate=False)
    assert len(masks) == 2
    loaded = {path.name: masks.load(i) for i, path in enumerate(masks.files)}
    for mask in loaded.values():
        _assert_binary_mask(mask, 32)
    assert torch.all(loaded["full.png"] == 1)  # non-square, RGB: resized, still all hole
    l_shape = loaded["l_shape.png"]
    assert l_shape[0, 16, 6] == 1 and l_shape[0, 1, 1] == 0 and l_shape[0, 8, 24] == 0
    inverted = MaskFolder(mask_folder, size=32, flip=False, rotate=False, invert=True)
    index = [path.name for path in inverted.files].index("l_shape.png")
    assert torch.equal(inverted.load(index), 1 - l_shape)


def test_mask_folder_augments_and_reproduces(mask_folder):
    (mask_folder / "full.png").unlink()
    sampler = make_mask_sampler(f"folder:{mask_folder}", 32)
    generator = torch.Generator().manual_seed(0)
    draws = [sampler(generator) for _ in range(64)]
    distinct = {tuple(mask.flatten().tolist()) for mask in draws}
    assert len(distinct) == 8  # the dihedral group: 2 flips × 4 rotations
    assert len({float(mask.sum()) for mask in draws}) == 1  # lossless augmentation
    assert torch.equal(sampler(torch.Generator().manual_seed(5)), sampler(torch.Generator().manual_seed(5)))


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MaskFolder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no mask images"):
        MaskFolder(tmp_path)
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask_sampler("triangle", 256)
    with pytest.raises(TypeError, match="mask kind"):
        make_mask_sampler(3, 256)
    with pytest.raises(ValueError, match="size"):
        random_rectangle_mask(0)
