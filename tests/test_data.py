"""oracleface.data.folders.FaceFolder on tiny generated folders: split, resize, corrupt files, cache."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import oracleface.data.folders as data
import oracleface.data.landmarks as landmarks
from oracleface.data.boxes import COMPONENTS
from oracleface.data.folders import FaceFolder, default_test_size, find_images, split_files
from oracleface.data.landmarks import canonical_landmarks

RESOLUTION = 16


def _make_image(path, colour, size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def face_dir(tmp_path):
    """12 small images (PNG and JPG, nested folders, one non-square) plus a non-image file."""
    root = tmp_path / "faces"
    for i in range(12):
        folder = root / ("a" if i < 6 else "b/c")
        suffix = ".png" if i % 2 else ".jpg"
        _make_image(folder / f"img{i:02d}{suffix}", (20 * i, 100, 200 - 10 * i))
    # Non-square: red side bands, a green centre square that the crop keeps.
    wide = np.zeros((32, 48, 3), dtype=np.uint8)
    wide[:, :, 0] = 255
    wide[:, 8:40] = (0, 255, 0)
    Image.fromarray(wide).save(root / "b" / "wide.png")
    (root / "readme.txt").write_text("not an image")
    return root


def _add_corrupt_files(root):
    source = (root / "a" / "img00.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(source[: len(source) // 2])
    (root / "b" / "text.png").write_text("this is not a PNG")
    return {"a/truncated.jpg", "b/text.png"}


def test_finds_nested_images_only(face_dir):
    files = find_images(face_dir)
    assert len(files) == 13 and files == sorted(files)
    assert "b/c/img11.png" in files and "readme.txt" not in files


def test_split_is_deterministic_and_disjoint(face_dir):
    train = FaceFolder(face_dir, RESOLUTION, "train", test_size=4, seed=3)
    test = FaceFolder(face_dir, RESOLUTION, "test", test_size=4, seed=3)
    assert 1 <= len(test) < 13 and len(train) + len(test) == 13
    assert not set(train.files) & set(test.files)
    assert set(train.files) | set(test.files) == set(find_images(face_dir))
    assert train.test_files == test.files
    assert FaceFolder(face_dir, RESOLUTION, "test", test_size=4, seed=3).files == test.files
    assert FaceFolder(face_dir, RESOLUTION, "test", test_size=4, seed=4).files != test.files


def test_adding_files_and_a_cache_never_moves_a_file_between_splits(face_dir):
    """Membership is a property of the file: adding images (and a cache of resized copies
    inside the data folder) keeps every earlier file in its split, and cached copies are
    never listed as images."""
    names = [f"x{i:03d}.png" for i in range(200)]
    first_train, first_test = split_files(names, seed=0, test_size=0.1)
    assert 10 <= len(first_test) <= 30  # about 10 % of 200
    more = names + [f"new/y{i:03d}.png" for i in range(300)]
    train, test = split_files(more, seed=0, test_size=0.1)
    assert set(first_test) <= set(test) and set(first_train) <= set(train)
    # A count means the same fraction: 20 of 200 holds out what 0.1 does.
    assert split_files(names, seed=0, test_size=20) == (first_train, first_test)

    before_train = FaceFolder(face_dir, RESOLUTION, "train", test_size=0.25, seed=1, cache_dir=face_dir / "cache")
    before_test = FaceFolder(face_dir, RESOLUTION, "test", test_size=0.25, seed=1)
    for i in range(20):
        _make_image(face_dir / "added" / f"n{i}.png", (i, 2 * i, 3 * i))
    assert (face_dir / "cache" / f"{RESOLUTION}px").is_dir()  # the cache lies inside the data folder
    after_train = FaceFolder(face_dir, RESOLUTION, "train", test_size=0.25, seed=1, cache_dir=face_dir / "cache")
    after_test = FaceFolder(face_dir, RESOLUTION, "test", test_size=0.25, seed=1)
    assert set(before_test.files) <= set(after_test.files)
    assert set(before_train.files) <= set(after_train.files)
    assert not set(before_train.files) & set(after_test.files)
    listed = find_images(face_dir)
    assert len(listed) == 13 + 20 and not any(name.startswith("cache/") for name in listed)


def test_a_recorded_test_list_pins_the_test_split(face_dir, tmp_path):
    from oracleface.data.folders import read_test_list, write_test_list

    test = FaceFolder(face_dir, RESOLUTION, "test", test_size=0.25, seed=1)
    record = write_test_list(tmp_path / "run", test.files + ["a/gone.png"], seed=1)
    recorded = read_test_list(tmp_path / "run")
    # A different rule (seed, size) cannot move recorded files into training ...
    train = FaceFolder(face_dir, RESOLUTION, "train", test_size=1, seed=9, test_files=recorded)
    assert not set(train.files) & set(test.files)
    # ... and the test split is exactly the recorded files that are still there, the rest named.
    with pytest.warns(UserWarning, match=r"1 of the \d+ recorded test images are gone.*a/gone.png"):
        pinned = FaceFolder(face_dir, RESOLUTION, "test", test_size=1, seed=9, test_files=recorded)
    assert pinned.files == test.files
    record.write_text("{}")
    with pytest.raises(ValueError, match="not a readable test list"):
        read_test_list(record)


def test_default_test_sizes_follow_the_paper():
    assert default_test_size(30_000) == 2_000
    assert default_test_size(69_999) == 2_000
    assert default_test_size(70_000) == 10_000
    assert default_test_size(1_000) == 100
    assert default_test_size(3) == 1
    train, test = split_files([f"{i}.png" for i in range(400)], seed=0, test_size=0.25)
    assert 70 <= len(test) <= 130 and len(train) + len(test) == 400  # about a quarter
    assert len(split_files(["a.png", "b.png"], seed=0, test_size=0.01)[1]) == 1  # at least one
    with pytest.raises(ValueError, match="test_size"):
        split_files(["a.png"], seed=0, test_size=2)


def test_items_have_the_documented_layout(face_dir):
    dataset = FaceFolder(face_dir, RESOLUTION, "train", test_size=2)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, RESOLUTION, RESOLUTION) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["hole_mask"].shape == (3, 1, RESOLUTION, RESOLUTION)
    assert torch.all((batch["hole_mask"] == 0) | (batch["hole_mask"] == 1))
    assert batch["hole_mask"].sum() > 0
    assert batch["boxes"].shape == (3, len(COMPONENTS), 4) and batch["boxes"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_images_are_centre_cropped_and_resized(face_dir):
    train = FaceFolder(face_dir, RESOLUTION, "train", test_size=0.1, seed=0)
    test = FaceFolder(face_dir, RESOLUTION, "test", test_size=0.1, seed=0)

    def item(name):
        dataset = train if name in train.files else test
        return dataset[dataset.files.index(name)]

    image = item("b/wide.png")["image"]
    assert image.shape == (3, RESOLUTION, RESOLUTION)
    # The red side bands are cropped away: green, bar a trace of filter support at the edges.
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(image[:, :, 1:-1], green, atol=0.02)
    assert torch.allclose(image, green, atol=0.1)
    colour = item("a/img01.png")["image"][:, 5, 5]
    assert torch.allclose(colour, torch.tensor([20, 100, 190]) / 255, atol=1e-6)


def test_test_masks_are_fixed_per_index_and_train_masks_per_epoch(face_dir):
    test = FaceFolder(face_dir, RESOLUTION, "test", test_size=4, seed=1)
    rebuilt = FaceFolder(face_dir, RESOLUTION, "test", test_size=4, seed=1)
    masks = [test[i]["hole_mask"] for i in range(len(test))]
    rebuilt.set_epoch(5)
    assert all(torch.equal(m, rebuilt[i]["hole_mask"]) for i, m in enumerate(masks))
    assert any(not torch.equal(masks[0], m) for m in masks[1:])

    train = FaceFolder(face_dir, RESOLUTION, "train", test_size=4, seed=1)
    epoch0 = [train[i]["hole_mask"] for i in range(len(train))]
    train.set_epoch(1)
    epoch1 = [train[i]["hole_mask"] for i in range(len(train))]
    assert any(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    train.set_epoch(0)  # resuming at an epoch replays its masks
    assert all(torch.equal(a, train[i]["hole_mask"]) for i, a in enumerate(epoch0))


def test_mask_argument_accepts_kinds_and_callables(face_dir):
    centre = FaceFolder(face_dir, RESOLUTION, "test", test_size=2, masks="center")
    assert centre[0]["hole_mask"].sum() == (RESOLUTION // 2) ** 2
    full = FaceFolder(face_dir, RESOLUTION, "test", test_size=2,
                      masks=lambda generator: torch.ones(1, RESOLUTION, RESOLUTION))
    assert torch.all(full[1]["hole_mask"] == 1)
    wrong = FaceFolder(face_dir, RESOLUTION, "test", test_size=2, masks=lambda generator: torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="mask sampler returned shape"):
        wrong[0]
    with pytest.raises(TypeError, match="masks"):
        FaceFolder(face_dir, RESOLUTION, "test", test_size=2, masks=3)


def test_corrupt_files_are_skipped_with_one_warning(face_dir):
    bad = _add_corrupt_files(face_dir)
    total = len(find_images(face_dir))
    skipped, sizes = set(), 0
    for split in ("train", "test"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = FaceFolder(face_dir, RESOLUTION, split, test_size=7, seed=2)
        relevant = [w for w in caught if "unreadable" in str(w.message)]
        if dataset.skipped:
            assert len(relevant) == 1
            message = str(relevant[0].message)
            assert all(name in message for name in dataset.skipped)
            assert f"{len(dataset)} of {dataset.requested_size}" in message
        else:
            assert not relevant
        assert dataset.num_skipped == len(dataset.skipped)
        assert len(dataset) + dataset.num_skipped == dataset.requested_size
        skipped |= set(dataset.skipped)
        sizes += len(dataset)
        for i in range(len(dataset)):  # a full pass never meets a bad file
            dataset[i]
    assert skipped == bad and sizes == total - len(bad)


def test_cache_is_reused_without_decoding_sources(face_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _add_corrupt_files(face_dir)
    with pytest.warns(UserWarning, match="unreadable"):
        first = FaceFolder(face_dir, RESOLUTION, "train", test_size=2, cache_dir=cache)
    uncached = [first[i]["image"] for i in range(len(first))]

    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        if str(face_dir) in str(path):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    with pytest.warns(UserWarning, match="unreadable"):  # bad files are remembered, still reported
        second = FaceFolder(face_dir, RESOLUTION, "train", test_size=2, cache_dir=cache)
    assert second.files == first.files and second.skipped == first.skipped
    assert all(torch.equal(second[i]["image"], image) for i, image in enumerate(uncached))
    assert opened == []

    # A changed source is decoded again, and only that one.
    changed = second.files[0]
    _make_image(face_dir / changed, (255, 255, 255))
    with pytest.warns(UserWarning, match="unreadable"):
        third = FaceFolder(face_dir, RESOLUTION, "train", test_size=2, cache_dir=cache)
    assert opened == [str(face_dir / changed)]
    assert torch.all(third[0]["image"] == 1)


def test_cache_inside_the_dataset_folder_is_not_scanned(face_dir):
    first = FaceFolder(face_dir, RESOLUTION, "train", test_size=2, cache_dir=face_dir / "cache")
    assert not any(name.startswith("cache/") for name in find_images(face_dir))
    again = FaceFolder(face_dir, RESOLUTION, "train", test_size=2, cache_dir=face_dir / "cache")
    assert again.files == first.files


def test_missing_or_empty_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FaceFolder(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        FaceFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="split"):
        FaceFolder(tmp_path / "empty", split="val")


def test_a_folder_of_only_bad_files_raises(tmp_path):
    (tmp_path / "broken.png").write_text("nope")
    with pytest.warns(UserWarning, match="broken.png"), pytest.raises(ValueError, match="no readable images"):
        FaceFolder(tmp_path, RESOLUTION, "test")


def test_mask_seeds_are_stable():
    assert data.mask_seed(0, "test", 0, 1) == data.mask_seed(0, "test", 0, 1)
    assert len({data.mask_seed(0, "test", 0, i) for i in range(100)}) == 100
    assert 0 <= data.mask_seed(123, "train", 7, 99) < 2 ** 63


class _UnpicklableProvider:
    """Stands for a detector object (like dlib's) that cannot be pickled."""

    def __reduce__(self):
        raise TypeError("this provider cannot be pickled")

    def __call__(self, image):
        return canonical_landmarks(image.shape[0]) + 1.0


def test_dataset_pickles_for_spawned_workers(face_dir, monkeypatch):
    import pickle

    monkeypatch.setitem(landmarks.PROVIDERS, "unpicklable", _UnpicklableProvider)
    dataset = FaceFolder(face_dir, RESOLUTION, "test", test_size=3, masks="irregular", landmarks="unpicklable")
    first = dataset[0]  # builds the provider
    clone = pickle.loads(pickle.dumps(dataset))
    again = clone[0]
    for key in ("image", "hole_mask", "boxes"):
        assert torch.equal(first[key], again[key])


def test_flip_mirrors_half_the_training_images_with_their_boxes_and_never_the_test_split(face_dir):
    from oracleface.data.boxes import mirror_boxes

    landmarks_file = face_dir.parent / "landmarks.json"
    points = canonical_landmarks(1).copy()
    points[:, 0] = points[:, 0] * 0.6  # a face off to the left: its boxes are not symmetric
    landmarks._write_landmark_cache(landmarks_file, "dlib", {name: points for name in find_images(face_dir)},
                                    set(), set())
    plain = FaceFolder(face_dir, 64, "train", test_size=2, landmarks=landmarks_file)
    flipping = FaceFolder(face_dir, 64, "train", test_size=2, landmarks=landmarks_file, flip=True)
    flipped = [flipping.flipped(i) for i in range(len(flipping))]
    assert 0 < sum(flipped) < len(flipped)
    for index, is_flipped in enumerate(flipped):
        a, b = plain[index], flipping[index]
        assert torch.equal(a["hole_mask"], b["hole_mask"])
        if is_flipped:
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert torch.equal(b["boxes"], mirror_boxes(a["boxes"], 64))
        else:
            assert torch.equal(b["image"], a["image"]) and torch.equal(b["boxes"], a["boxes"])
    boxes = plain[0]["boxes"]
    mirrored = mirror_boxes(boxes, 64)
    left, right = COMPONENTS.index("left_eye"), COMPONENTS.index("right_eye")
    assert mirrored[left].tolist() == [64 - boxes[right, 2], boxes[right, 1], 64 - boxes[right, 0], boxes[right, 3]]
    assert torch.equal(mirror_boxes(mirrored, 64), boxes)
    flipping.set_epoch(1)  # another epoch, other flips; the same epoch, the same flips
    assert [flipping.flipped(i) for i in range(len(flipping))] != flipped
    flipping.set_epoch(0)
    assert [flipping.flipped(i) for i in range(len(flipping))] == flipped
    test = FaceFolder(face_dir, 64, "test", test_size=2, flip=True)
    assert not any(test.flipped(i) for i in range(len(test)))
