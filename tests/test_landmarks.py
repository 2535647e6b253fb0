"""oracleface.data.landmarks: providers, component boxes, the landmark cache and its CLI."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import oracleface.data.landmarks as landmarks
from oracleface.data.boxes import COMPONENTS, box_sizes, component_masks
from oracleface.cli import main
from oracleface.data.folders import FaceFolder
from oracleface.data.landmarks import (
    LANDMARK_GROUPS,
    boxes_tensor,
    build_landmark_cache,
    canonical_landmarks,
    component_boxes,
    get_provider,
    read_landmark_cache,
)

CELEBA_HQ = Path("/work/shared/faces/celeba_hq")


def _group_centres(points):
    return {name: points[list(group)].mean(axis=0) for name, group in LANDMARK_GROUPS.items()}


def _assert_face_layout(points, boxes, image_size):
    """Eyes above nose above mouth, left eye on the image left, boxes hold their groups."""
    centres = _group_centres(points)
    assert centres["left_eye"][0] < centres["nose"][0] < centres["right_eye"][0]
    assert max(centres["left_eye"][1], centres["right_eye"][1]) < centres["nose"][1] < centres["mouth"][1]
    sizes = box_sizes(image_size)
    for name, (x0, y0, x1, y1) in boxes.items():
        assert (x1 - x0, y1 - y0) == sizes[name]
        assert 0 <= x0 and 0 <= y0 and x1 <= image_size and y1 <= image_size
        cx, cy = centres[name]
        assert x0 <= cx < x1 and y0 <= cy < y1, name
    assert boxes["left_eye"][0] < boxes["right_eye"][0]
    assert boxes["left_eye"][1] < boxes["nose"][1] < boxes["mouth"][1]


@pytest.fixture(scope="module")
def dlib_provider():
    pytest.importorskip("dlib", reason="dlib (dlib-bin) is not installed")
    return get_provider("dlib")


def test_dlib_finds_the_astronauts_face(dlib_provider):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    image = skimage_data.astronaut()
    points = dlib_provider(image)
    assert points.shape == (68, 2) and points.dtype == np.float64
    # Eileen Collins' face lies in x 150..300, y 30..230 of the 512² photo.
    assert points[:, 0].min() > 150 and points[:, 0].max() < 300
    assert points[:, 1].min() > 30 and points[:, 1].max() < 230
    _assert_face_layout(points, component_boxes(points, 512), 512)
    assert dlib_provider(np.zeros((64, 64, 3), dtype=np.uint8)) is None


def test_dlib_predictor_is_found_without_importing_its_package():
    path = landmarks.dlib_predictor_path()
    assert path.is_file() and path.name == "shape_predictor_68_face_landmarks.dat"
    assert "face_recognition_models" not in sys.modules


@pytest.mark.skipif(not CELEBA_HQ.is_dir(), reason=f"{CELEBA_HQ} (real aligned faces) is not available")
def test_dlib_on_celeba_hq_agrees_with_the_canonical_boxes(dlib_provider):
    photo = sorted(CELEBA_HQ.glob("*.jpg"))[0]
    image = np.asarray(Image.open(photo).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS))
    points = dlib_provider(image)
    detected = component_boxes(points, 256)
    _assert_face_layout(points, detected, 256)
    canonical = component_boxes(canonical_landmarks(256), 256)
    for name in COMPONENTS:
        # Pose moves nose and mouth more than the alignment-fixed eyes; a third of a box at most.
        tolerance = 8 if name.endswith("eye") else 16
        shift = np.abs(np.subtract(detected[name], canonical[name])).max()
        assert shift <= tolerance, (name, detected[name], canonical[name])


def test_face_alignment_without_weights_names_the_missing_files(tmp_path, monkeypatch):
    face_alignment = pytest.importorskip("face_alignment", reason="face_alignment is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def must_not_construct(*args, **kwargs):
        raise AssertionError("FaceAlignment was constructed: it would try to download")

    monkeypatch.setattr(face_alignment, "FaceAlignment", must_not_construct)
    with pytest.raises(RuntimeError) as error:
        get_provider("face-alignment")
    message = str(error.value)
    assert "2DFAN4" in message and "s3fd" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert not (tmp_path / "hub" / "checkpoints").exists() or not any((tmp_path / "hub" / "checkpoints").iterdir())


@pytest.mark.parametrize("image_size", [256, 512])
def test_canonical_boxes_fit_an_aligned_layout(image_size):
    points = canonical_landmarks(image_size)
    boxes = component_boxes(points, image_size)
    _assert_face_layout(points, boxes, image_size)
    centre = image_size / 2
    # Aligned faces are symmetric about the vertical midline.
    left, right = boxes["left_eye"], boxes["right_eye"]
    assert abs((left[0] + right[2]) / 2 - centre) <= image_size / 64
    for name in ("nose", "mouth"):
        assert abs((boxes[name][0] + boxes[name][2]) / 2 - centre) <= image_size / 64
    # Eyes sit a little above the middle, the mouth in the lower third.
    assert 0.35 * image_size < left[1] < 0.5 * image_size
    assert boxes["mouth"][3] < 0.9 * image_size


def test_canonical_provider_scales_to_the_image():
    provider = get_provider("canonical")
    points = provider(np.zeros((100, 200, 3), dtype=np.uint8))
    np.testing.assert_allclose(points / [200, 100], canonical_landmarks(1))


def test_boxes_are_clamped_inside_the_image():
    corner = component_boxes(np.zeros((68, 2)), 256)
    far = component_boxes(np.full((68, 2), 255.0), 256)
    sizes = box_sizes(256)
    for name in COMPONENTS:
        width, height = sizes[name]
        assert corner[name] == (0, 0, width, height)
        assert far[name] == (256 - width, 256 - height, 256, 256)


def test_boxes_tensor_follows_the_component_order():
    boxes = component_boxes(canonical_landmarks(256), 256)
    tensor = boxes_tensor(boxes)
    assert tensor.shape == (4, 4) and tensor.dtype == torch.int64
    for row, name in enumerate(COMPONENTS):
        assert tuple(tensor[row].tolist()) == boxes[name]
    masks = component_masks(tensor[None], 256, 256)
    for row, name in enumerate(COMPONENTS):
        width, height = box_sizes(256)[name]
        assert masks[0, row].sum() == width * height
    with pytest.raises(ValueError, match="lacks components"):
        boxes_tensor({"nose": (0, 0, 1, 1)})


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown landmark provider"):
        get_provider("magic")
    with pytest.raises(ValueError, match="landmarks must be"):
        component_boxes(np.zeros((5, 2)), 256)
    with pytest.raises(ValueError, match="image_size"):
        component_boxes(np.zeros((68, 2)), 0)
    with pytest.raises(TypeError, match="uint8"):
        get_provider("canonical")(np.zeros((8, 8, 3), dtype=np.float32))


# ----------------------------------------------------------------------------- cache

class CountingProvider:
    """Landmarks from the mean colour (so each image gets its own), counting calls;
    ``interrupt_after`` simulates Ctrl-C, ``no_face`` images return None."""

    def __init__(self, interrupt_after=None, no_face=()):
        self.calls, self.interrupt_after, self.no_face = 0, interrupt_after, no_face

    def __call__(self, image):
        if self.interrupt_after is not None and self.calls == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        red = int(image[..., 0].mean())
        if red in self.no_face:
            return None
        return canonical_landmarks(image.shape[0]) + red / 40


@pytest.fixture
def provider_slot(monkeypatch):
    """Registers the provider in ``slot["provider"]`` as the "counting" landmark provider."""
    slot = {"provider": CountingProvider()}
    monkeypatch.setitem(landmarks.PROVIDERS, "counting", lambda: slot["provider"])
    return slot


@pytest.fixture
def small_faces(tmp_path):
    root = tmp_path / "faces"
    for i in range(8):
        folder = root / ("x" if i < 4 else "y/z")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (30 * i, 50, 50)).save(folder / f"f{i}.png")
    return root


def test_cache_is_built_once_and_reused(small_faces, provider_slot):
    summary = build_landmark_cache(small_faces, "counting", size=64, progress=False)
    assert summary["path"] == small_faces / "landmarks_counting.json"
    assert summary["computed"] == 8 and provider_slot["provider"].calls == 8
    cache = read_landmark_cache(summary["path"])
    assert sorted(cache["landmarks"]) == [f"x/f{i}.png" for i in range(4)] + [f"y/z/f{i}.png" for i in range(4, 8)]
    np.testing.assert_allclose(cache["landmarks"]["x/f1.png"], canonical_landmarks(1) + 30 / 40 / 64, atol=1e-5)

    provider_slot["provider"] = CountingProvider()
    again = build_landmark_cache(small_faces, "counting", size=64, progress=False)
    assert again["computed"] == 0 and again["skipped"] == 8 and provider_slot["provider"].calls == 0


def test_interrupted_run_resumes_where_it_stopped(small_faces, provider_slot):
    provider_slot["provider"] = CountingProvider(interrupt_after=3)
    out = small_faces / "cache.json"
    with pytest.raises(KeyboardInterrupt):
        build_landmark_cache(small_faces, "counting", out=out, size=64, progress=False)
    assert len(read_landmark_cache(out)["landmarks"]) == 3
    assert not list(small_faces.glob("*.tmp"))  # atomic writes leave no temporaries

    provider_slot["provider"] = CountingProvider()
    summary = build_landmark_cache(small_faces, "counting", out=out, size=64, progress=False)
    assert provider_slot["provider"].calls == 5 and summary["computed"] == 5 and summary["skipped"] == 3
    assert len(read_landmark_cache(out)["landmarks"]) == 8


def test_cli_falls_back_to_canonical_and_reports(small_faces, provider_slot, capsys):
    provider_slot["provider"] = CountingProvider(no_face={60, 90})  # images 2 and 3
    (small_faces / "broken.png").write_text("not an image")
    assert main(["landmarks", str(small_faces), "--provider", "counting", "--size", "64", "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "no face detected (canonical landmarks used): 2" in report and "unreadable: 1" in report
    cache = read_landmark_cache(small_faces / "landmarks_counting.json")
    assert cache["no_face"] == {"x/f2.png", "x/f3.png"} and cache["unreadable"] == {"broken.png"}
    np.testing.assert_allclose(cache["landmarks"]["x/f2.png"], canonical_landmarks(1), atol=1e-5)
    raw = json.loads((small_faces / "landmarks_counting.json").read_text())
    assert raw["provider"] == "counting"
    with pytest.raises(ValueError, match="provider 'counting'"):
        build_landmark_cache(small_faces, "canonical", out=small_faces / "landmarks_counting.json")


def test_face_folder_uses_a_cache_file_or_a_lazy_provider(small_faces, provider_slot):
    out = build_landmark_cache(small_faces, "counting", size=64, progress=False)["path"]
    from_file = FaceFolder(small_faces, 32, "train", test_size=2, landmarks=out, masks="center")
    for i, name in enumerate(from_file.files):
        red = 30 * int(Path(name).stem[1:])
        expected = canonical_landmarks(32) + red / 40 * 32 / 64
        assert torch.equal(from_file[i]["boxes"], boxes_tensor(component_boxes(expected, 32)))

    provider_slot["provider"] = CountingProvider()
    lazy = FaceFolder(small_faces, 32, "train", test_size=2, landmarks="counting", masks="center")
    assert provider_slot["provider"].calls == 0
    first = [lazy[i]["boxes"] for i in range(len(lazy))]
    assert provider_slot["provider"].calls == len(lazy)
    assert all(torch.equal(lazy[i]["boxes"], boxes) for i, boxes in enumerate(first))
    assert provider_slot["provider"].calls == len(lazy)  # remembered

    canonical = FaceFolder(small_faces, 32, "train", test_size=2, landmarks=None)
    assert torch.equal(canonical[0]["boxes"], boxes_tensor(component_boxes(canonical_landmarks(32), 32)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FaceFolder(small_faces, 32, "train", test_size=2, landmarks=str(small_faces / "none.json"))
