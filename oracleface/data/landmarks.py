"""Facial landmarks (iBUG-68) and the component boxes derived from them.

A *provider* is a callable ``image -> landmarks``: ``image`` is an RGB ``uint8`` numpy
array ``(H, W, 3)``; ``landmarks`` is a float ``(68, 2)`` array of ``(x, y)`` pixel
coordinates in the iBUG-68 order, or ``None`` when no face is found. Providers:

- ``"face-alignment"``: the FAN network of the ``face_alignment`` package. Its weights
  must already be in the torch hub cache; nothing is downloaded.
- ``"dlib"``: dlib's HOG frontal-face detector plus the 68-point shape predictor shipped
  by the ``face-recognition-models`` package. Fully offline.
- ``"canonical"``: fixed positions for aligned datasets (CelebA-HQ/FFHQ-style
  alignment); no model, never ``None``.

Left and right are *image* left and right throughout: ``"left_eye"`` is iBUG points
36–41, the eye on the left of the picture (the subject's right eye).

Landmark cache files (written by ``oracleface landmarks DATA_DIR``, read by
``oracleface.data.folders.FaceFolder``) are JSON, keyed by the image's path relative to the
dataset folder, with coordinates normalised to the square centre crop (``x / side``,
``y / side``), so one cache serves every training resolution.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oracleface.common import write_json_atomic
from oracleface.data.boxes import COMPONENTS, box_sizes

NUM_LANDMARKS = 68

# iBUG-68 point ranges (0-based, end exclusive) of each component; "left" = image left.
LANDMARK_GROUPS = {
    "left_eye": range(36, 42),
    "right_eye": range(42, 48),
    "nose": range(27, 36),
    "mouth": range(48, 68),
}

Provider = Callable[[np.ndarray], "np.ndarray | None"]

# Mean dlib landmarks over the 46 aligned CelebA-HQ photos in /work/shared/faces/celeba_hq
# (1024², 25 female / 21 male), normalised by the image side; obtained by running the
# "dlib" provider over each photo and averaging (every photo had a detected face). FFHQ
# is aligned the same way (eyes and mouth at fixed positions), so the template serves
# both; a dataset aligned differently should use a real provider.
CANONICAL_LANDMARKS_NORMALISED = np.array([
    (0.2420, 0.4879), (0.2433, 0.5583), (0.2519, 0.6290), (0.2657, 0.6993),  # 0-3
    (0.2908, 0.7660), (0.3305, 0.8250), (0.3787, 0.8778), (0.4335, 0.9228),  # 4-7
    (0.4990, 0.9362), (0.5672, 0.9251), (0.6298, 0.8836), (0.6867, 0.8334),  # 8-11
    (0.7340, 0.7751), (0.7634, 0.7072), (0.7784, 0.6330), (0.7867, 0.5584),  # 12-15
    (0.7892, 0.4839), (0.2760, 0.4359), (0.3082, 0.4062), (0.3545, 0.3996),  # 16-19
    (0.4023, 0.4068), (0.4478, 0.4258), (0.5403, 0.4230), (0.5903, 0.4035),  # 20-23
    (0.6419, 0.3969), (0.6924, 0.4057), (0.7298, 0.4355), (0.4946, 0.4780),  # 24-27
    (0.4935, 0.5283), (0.4922, 0.5791), (0.4909, 0.6305), (0.4423, 0.6570),  # 28-31
    (0.4669, 0.6675), (0.4937, 0.6771), (0.5218, 0.6673), (0.5479, 0.6576),  # 32-35
    (0.3322, 0.4814), (0.3612, 0.4634), (0.3981, 0.4646), (0.4286, 0.4898),  # 36-39
    (0.3948, 0.4952), (0.3590, 0.4950), (0.5714, 0.4888), (0.6024, 0.4636),  # 40-43
    (0.6394, 0.4628), (0.6700, 0.4809), (0.6423, 0.4942), (0.6060, 0.4946),  # 44-47
    (0.3863, 0.7360), (0.4257, 0.7253), (0.4653, 0.7201), (0.4945, 0.7273),  # 48-51
    (0.5253, 0.7204), (0.5678, 0.7259), (0.6121, 0.7354), (0.5706, 0.7805),  # 52-55
    (0.5284, 0.8008), (0.4951, 0.8048), (0.4627, 0.8012), (0.4236, 0.7817),  # 56-59
    (0.4029, 0.7407), (0.4650, 0.7424), (0.4947, 0.7461), (0.5261, 0.7424),  # 60-63
    (0.5943, 0.7403), (0.5264, 0.7626), (0.4947, 0.7669), (0.4639, 0.7629),  # 64-67
], dtype=np.float64).reshape(NUM_LANDMARKS, 2)


# ----------------------------------------------------------------------------- providers

def canonical_landmarks(image_size: int) -> np.ndarray:
    """The canonical template ``(68, 2)`` in pixels of a ``image_size``² aligned image."""
    _check_positive_int(image_size, "image_size")
    return CANONICAL_LANDMARKS_NORMALISED * image_size


class CanonicalProvider:
    """Returns the canonical template scaled to the image (assumes an aligned face)."""

    name = "canonical"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = _check_image(image).shape[:2]
        return CANONICAL_LANDMARKS_NORMALISED * np.array([width, height], dtype=np.float64)


def dlib_predictor_path() -> Path:
    """Path of the 68-point predictor shipped by ``face-recognition-models``.

    Found through the import system without importing the package, whose ``__init__``
    needs ``pkg_resources`` (absent from modern setuptools).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the 'dlib' landmark provider needs the face-recognition-models package "
            "(pip install face-recognition-models)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / "shape_predictor_68_face_landmarks.dat"
        if path.is_file():
            return path
    raise RuntimeError(
        "face-recognition-models is installed but shape_predictor_68_face_landmarks.dat "
        f"is missing from {list(spec.submodule_search_locations)}/models")


class DlibProvider:
    """dlib HOG frontal-face detector + 68-point shape predictor (CPU, offline).

    When several faces are found, the largest detection is used.
    ``upsample`` is the detector's image pyramid upsampling count; 1 finds faces down to
    about 40 px wide.
    """

    name = "dlib"

    def __init__(self, upsample: int = 1):
        try:
            import dlib
        except ImportError as error:
            raise RuntimeError("the 'dlib' landmark provider needs dlib (pip install dlib-bin)") from error
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_predictor_path()))

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        image = np.ascontiguousarray(_check_image(image))
        faces = self._detector(image, self.upsample)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda rect: rect.area())
        shape = self._predictor(image, face)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(NUM_LANDMARKS)],
                        dtype=np.float64)


def face_alignment_weight_files() -> list[Path]:
    """The files ``face_alignment`` (2D, large FAN + SFD detector) loads from the hub cache."""
    from urllib.parse import urlparse

    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / os.path.basename(urlparse(url).path)
            for url in (fan_urls["2DFAN-4"], sfd_urls["s3fd"])]


class FaceAlignmentProvider:
    """The FAN 2D landmark network of ``face_alignment`` with its SFD face detector.

    Weights come from the torch hub cache (``$TORCH_HOME/hub/checkpoints``); when they are
    absent this raises instead of letting ``face_alignment`` download them.
    """

    name = "face-alignment"

    def __init__(self, device: str | None = None):
        try:
            import face_alignment
        except ImportError as error:
            raise RuntimeError(
                "the 'face-alignment' landmark provider needs the face_alignment package "
                "(pip install face-alignment)") from error
        files = face_alignment_weight_files()
        missing = [path for path in files if not path.is_file()]
        if missing:
            raise RuntimeError(
                "face-alignment weights not found (nothing is downloaded at run time): "
                f"missing {', '.join(path.name for path in missing)} in {missing[0].parent}. "
                "Copy them there (URLs in face_alignment.api.models_urls and "
                "face_alignment.detection.sfd.sfd_detector.models_urls), set TORCH_HOME to a "
                "folder whose hub/checkpoints holds them, or use --provider dlib.")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, flip_input=False, compile=False)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        with warnings.catch_warnings():  # "No faces were detected." is our None, not news
            warnings.simplefilter("ignore", UserWarning)
            landmarks, _, boxes = self._model.get_landmarks_from_image(_check_image(image), return_bboxes=True)
        if not landmarks:
            return None
        # Largest detected face, as for dlib.
        areas = [(box[2] - box[0]) * (box[3] - box[1]) for box in boxes]
        return np.asarray(landmarks[int(np.argmax(areas))][:, :2], dtype=np.float64)


PROVIDERS: dict[str, Callable[[], Provider]] = {
    "canonical": CanonicalProvider,
    "dlib": DlibProvider,
    "face-alignment": FaceAlignmentProvider,
}


def get_provider(name: str) -> Provider:
    """Build the landmark provider called ``name`` (one of ``PROVIDERS``)."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown landmark provider {name!r}; expected one of {sorted(PROVIDERS)}")
    return PROVIDERS[name]()


# ----------------------------------------------------------------------------- boxes

def component_boxes(landmarks, image_size: int,
                    sizes: dict | None = None) -> dict[str, tuple[int, int, int, int]]:
    """Fixed-size ``(x0, y0, x1, y1)`` boxes (x1, y1 exclusive) of the four components.

    ``landmarks``: ``(68, 2)`` pixel coordinates in a square image of side ``image_size``.
    ``sizes``: ``{component: (width, height)}`` at 256², scaled with ``image_size`` by
    ``oracleface.data.boxes.box_sizes`` (default ``DEFAULT_BOX_SIZES_256``). Each box is centred
    on the mean of its landmark group and shifted, keeping its size, inside the image.
    """
    _check_positive_int(image_size, "image_size")
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (NUM_LANDMARKS, 2) or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be a finite ({NUM_LANDMARKS}, 2) array; got shape {points.shape}")
    pixel_sizes = box_sizes(image_size, sizes)
    boxes = {}
    for name in COMPONENTS:
        width, height = (min(side, image_size) for side in pixel_sizes[name])
        centre_x, centre_y = points[list(LANDMARK_GROUPS[name])].mean(axis=0)
        x0 = int(np.clip(round(centre_x - width / 2), 0, image_size - width))
        y0 = int(np.clip(round(centre_y - height / 2), 0, image_size - height))
        boxes[name] = (x0, y0, x0 + width, y0 + height)
    return boxes


def boxes_tensor(boxes: dict[str, tuple[int, int, int, int]]) -> torch.Tensor:
    """``component_boxes`` output as the ``(4, 4)`` int64 tensor of ``oracleface.data.boxes``."""
    missing = [name for name in COMPONENTS if name not in boxes]
    if missing:
        raise ValueError(f"boxes lacks components {missing}; expected keys {list(COMPONENTS)}")
    return torch.tensor([list(boxes[name]) for name in COMPONENTS], dtype=torch.int64)


# ----------------------------------------------------------------------------- cache files

CACHE_FORMAT = "oracleface-landmarks"
CACHE_VERSION = 1


def default_cache_path(data_dir, provider: str) -> Path:
    """Where ``oracleface landmarks`` writes by default: ``DATA_DIR/landmarks_<provider>.json``."""
    return Path(data_dir) / f"landmarks_{provider}.json"


def read_landmark_cache(path) -> dict:
    """Load a cache file: ``{"provider", "landmarks": {relpath: (68, 2) normalised}, "no_face", "unreadable"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark cache file {path} does not exist")
    with open(path) as handle:
        content = json.load(handle)
    if content.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not an oracleface landmark cache (format field {content.get('format')!r})")
    if content.get("version") != CACHE_VERSION:
        raise ValueError(f"{path} has cache version {content.get('version')}; this oracleface reads {CACHE_VERSION}")
    return {
        "provider": content["provider"],
        "landmarks": {key: np.asarray(value, dtype=np.float64).reshape(NUM_LANDMARKS, 2)
                      for key, value in content["landmarks"].items()},
        "no_face": set(content["no_face"]),
        "unreadable": set(content["unreadable"]),
    }


def _write_landmark_cache(path: Path, provider: str, landmarks: dict, no_face: set, unreadable: set) -> None:
    # Atomic: a crash mid-write leaves the previous complete file in place.
    content = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "provider": provider,
        "coordinates": "(x, y) / side of the square centre crop, iBUG-68 order",
        "landmarks": {key: np.round(value, 5).tolist() for key, value in sorted(landmarks.items())},
        "no_face": sorted(no_face),
        "unreadable": sorted(unreadable),
    }
    write_json_atomic(content, path, indent=None)


def build_landmark_cache(data_dir, provider: str = "dlib", out=None, size: int = 512,
                         flush_every: int = 200, flush_seconds: float = 60.0,
                         progress: bool = True) -> dict:
    """Compute landmarks for every image under ``data_dir`` into a cache file, resumably.

    Each image is centre-cropped to a square and resized to ``size``² (the same loader as
    ``FaceFolder``) before the provider runs; landmarks are stored normalised by ``size``.
    Images already in the cache are skipped; the file is rewritten atomically every
    ``flush_every`` images or ``flush_seconds``, and on exit, including interruption.
    Faces that are not detected get the canonical template and are listed in ``no_face``.
    Returns a summary ``{"path", "total", "computed", "skipped", "no_face", "unreadable"}``
    (``no_face``/``unreadable`` count the whole cache, ``computed`` this run only).
    """
    from tqdm import tqdm

    from oracleface.data.images import DECODE_ERRORS, find_images, load_square_image

    _check_positive_int(size, "size")
    _check_positive_int(flush_every, "flush_every")
    data_dir = Path(data_dir)
    files = find_images(data_dir)
    out = Path(out) if out is not None else default_cache_path(data_dir, provider)
    if out.exists():
        cache = read_landmark_cache(out)
        if cache["provider"] != provider:
            raise ValueError(f"{out} holds landmarks from provider {cache['provider']!r}, not {provider!r}; "
                             "pass a different --out")
    else:
        cache = {"landmarks": {}, "no_face": set(), "unreadable": set()}
    landmarks, no_face, unreadable = cache["landmarks"], cache["no_face"], cache["unreadable"]
    todo = [name for name in files if name not in landmarks and name not in unreadable]

    computed, changed = 0, False
    last_flush = time.monotonic()

    def flush():
        nonlocal last_flush
        _write_landmark_cache(out, provider, landmarks, no_face, unreadable)
        last_flush = time.monotonic()

    model = get_provider(provider) if todo else None
    try:
        for name in tqdm(todo, desc=f"landmarks ({provider})", unit="img", disable=not progress):
            try:
                image = load_square_image(data_dir / name, size)
            except DECODE_ERRORS:
                unreadable.add(name)
                changed = True
                continue
            points = model(np.asarray(image))
            if points is None:
                no_face.add(name)
                points = canonical_landmarks(size)
            landmarks[name] = np.asarray(points, dtype=np.float64) / size
            computed, changed = computed + 1, True
            if computed % flush_every == 0 or time.monotonic() - last_flush > flush_seconds:
                flush()
    finally:
        if changed or not out.exists():
            flush()
    return {"path": out, "total": len(files), "computed": computed,
            "skipped": len(files) - len(todo), "no_face": len(no_face & set(files)),
            "unreadable": len(unreadable & set(files))}


# ----------------------------------------------------------------------------- checks

def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise TypeError("image must be an RGB uint8 numpy array of shape (H, W, 3); got "
                        f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
    return image


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
