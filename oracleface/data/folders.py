"""Face image datasets: any folder of images, split, resized, masked, with component boxes.

``FaceFolder(root, resolution=256, split="train")`` serves every ``.jpg/.jpeg/.png/.webp``
under ``root`` (nested folders included; hidden folders skipped) as::

    {"image": (3, H, W) float32 in [0, 1], "hole_mask": (1, H, W) float32 (1 = missing),
     "boxes": (4, 4) int64 (oracleface.data.boxes order), "index": int, "path": str (relative)}

Design decisions:

- Images are centre-cropped to a square (a no-op for face datasets) and resized with
  PIL's antialiased Lanczos filter. JPEGs are decoded with libjpeg's DCT scaling to the
  smallest size of at least 2× the target first, which is 4× less work for 1024² → 256².
- The train/test split is a property of each file: a file is held out when
  ``sha256(seed, relative path)``, read as a number in [0, 1), is below the test fraction
  (``test_size`` as a fraction; a count means ``count / number of images``). So adding
  files never moves existing ones between splits; the test split holds about
  ``test_size`` images (at least 1: if no file falls below the fraction, the lowest-ranked
  one). Default ``test_size`` follows the paper: 2 000 for CelebA-HQ-sized folders
  (≥ 30 000 images), 10 000 for FFHQ-sized ones (≥ 70 000); smaller folders hold out 10 %.
  ``test_files`` (a run's recorded test list, ``RUN_DIR/split.json``) pins the held-out
  files: they stay held out whatever the folder holds now, and the test split is exactly
  them (files that are gone are named in a warning).
- Dataset caches are never scanned as images: a folder holding ``CACHE_MARKER`` (every
  ``cache_dir`` does) is skipped, wherever it lies.
- Every file of the split is decoded once at construction; files that fail (truncated,
  not an image) are skipped with one warning naming them, and listed in ``skipped``.
  The split is decided before that, so a bad file shrinks its split visibly (the warning
  says "N of M") and never moves other files between splits. With ``cache_dir`` the
  check is the resize into the cache and is remembered there: later constructions
  decode nothing and read small PNGs.
- Augmentation: with ``flip`` (train split only; the trainer's default) an image is
  mirrored horizontally with probability 1/2, decided by ``(seed, epoch, index)`` like its
  mask (so resuming replays it); its component boxes are mirrored and the eyes swapped.
  The test split is never flipped.
- Masks: test masks depend only on ``(seed, index)``, so evaluation is reproducible.
  Train masks depend on ``(seed, epoch, index)``: call ``set_epoch(epoch)`` before each
  epoch (like ``DistributedSampler``); resuming at an epoch replays its masks exactly,
  whatever the worker count. (Persistent DataLoader workers keep the epoch they were
  started with, so use ``persistent_workers=False`` or rebuild the loader per epoch.)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oracleface.common import atomic_write, write_json_atomic
from oracleface.data.boxes import mirror_boxes
from oracleface.data.images import (
    CACHE_MARKER,
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    check_decodable,
    find_images,
    image_to_tensor,
    load_square_image,
)
from oracleface.data.landmarks import (
    PROVIDERS,
    boxes_tensor,
    canonical_landmarks,
    component_boxes,
    get_provider,
    read_landmark_cache,
)
from oracleface.data.masks import make_mask_sampler

PAPER_TEST_SIZES = ((70_000, 10_000), (30_000, 2_000))  # (folder size at least, test images)
SMALL_FOLDER_TEST_FRACTION = 0.1


def default_test_size(num_images: int) -> int:
    """The paper's held-out counts for full-size datasets, 10 % (≥ 1) of smaller folders."""
    for at_least, test_size in PAPER_TEST_SIZES:
        if num_images >= at_least:
            return test_size
    return max(1, round(num_images * SMALL_FOLDER_TEST_FRACTION))


def held_out_fraction(count: int, test_size) -> float:
    """The held-out fraction for ``test_size`` (None, a fraction in (0, 1) or a count in
    0..``count``) in a folder of ``count`` images."""
    if test_size is None:
        return default_test_size(count) / count
    if isinstance(test_size, float) and 0.0 < test_size < 1.0:
        return test_size
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 0 <= test_size <= count:
        raise ValueError(f"test_size must be None, a fraction in (0, 1) or an int in 0..{count} "
                         f"(the number of images); got {test_size!r}")
    return test_size / count


def file_rank(seed: int, name: str) -> float:
    """Where ``name`` falls in [0, 1) for ``seed``: a pure function of the two."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_files(files: list[str], seed: int, test_size, test_files=()) -> tuple[list[str], list[str]]:
    """``(train, test)`` relative paths, each sorted; see the module docstring for the rule.
    ``test_files``: files held out whatever their rank (a run's recorded test list)."""
    if not files:
        return [], []
    fraction = held_out_fraction(len(files), test_size)
    ranks = {name: file_rank(seed, name) for name in files}
    test = {name for name, rank in ranks.items() if rank < fraction} | (set(test_files) & set(ranks))
    if not test and fraction > 0:
        test = {min(ranks, key=ranks.get)}
    return sorted(set(files) - test), sorted(test)


TEST_LIST_FILE = "split.json"  # in the run folder: the files a run holds out


def write_test_list(run_dir, files: list[str], seed: int) -> Path:
    """Record a run's held-out files in ``RUN_DIR/split.json`` (atomically)."""
    return write_json_atomic({"seed": seed, "test": sorted(files)}, Path(run_dir) / TEST_LIST_FILE)


def read_test_list(path) -> list[str]:
    """The held-out files recorded in ``path`` (a ``split.json``, or the run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TEST_LIST_FILE
    try:
        with open(path) as handle:
            files = json.load(handle)["test"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable test list (a run's {TEST_LIST_FILE}): {error}") from error
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise ValueError(f"{path}: 'test' must be a list of relative image paths")
    return files


def mark_cache_folder(folder) -> None:
    """Create ``folder`` with its ``CACHE_MARKER``, so image listings skip it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_MARKER).touch(exist_ok=True)


def mask_seed(seed: int, split: str, epoch: int, index: int) -> int:
    """A 63-bit generator seed that is a pure function of its arguments (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{split}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class FaceFolder(torch.utils.data.Dataset):
    """A folder of face images as a masked face-completion dataset (see module docstring).

    Args:
        root: the image folder (searched recursively).
        resolution: output side in pixels (square images).
        split: ``"train"`` or ``"test"``.
        test_size: held-out images: ``None`` (paper default / 10 %), an int, or a fraction.
        seed: decides the split and every mask.
        masks: a mask kind for ``oracleface.data.masks.make_mask_sampler`` (``"random"``,
            ``"center"``, ``"irregular"``, ``"folder:PATH"``) or a callable
            ``generator -> (1, resolution, resolution)``.
        landmarks: where component boxes come from: ``"canonical"`` (or ``None``: the fixed
            template for aligned faces), a provider name (``"dlib"``, ``"face-alignment"``;
            run lazily on the resized image, remembered in memory), or the path of a cache
            file written by ``oracleface landmarks``.
        cache_dir: folder for resized copies of the images (PNG) and their manifest
            (marked with ``CACHE_MARKER``, so it is never scanned as images).
        test_files: a run's recorded test list: always held out, and with
            ``split="test"`` exactly the files served (see module docstring).
        flip: random horizontal flips of training images (ignored for ``split="test"``).
    """

    def __init__(self, root, resolution: int = 256, split: str = "train", test_size=None,
                 seed: int = 0, masks="random", landmarks="canonical", cache_dir=None, test_files=None,
                 flip: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist or is not a directory")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
            raise ValueError(f"resolution must be an int >= 16; got {resolution!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}")
        self.root, self.resolution, self.split, self.seed = root, resolution, split, seed
        self.flip = bool(flip) and split == "train"
        self.epoch = 0
        self.cache_dir = Path(cache_dir) / f"{resolution}px" if cache_dir is not None else None

        if cache_dir is not None:
            mark_cache_folder(cache_dir)
        all_files = find_images(root)
        if not all_files:
            raise ValueError(f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        train, test = split_files(all_files, seed, test_size, test_files or ())
        self.test_files = test  # every held-out file of the folder, for the run's record
        candidates = train
        if split == "test":
            candidates = test if test_files is None else sorted(set(test_files) & set(all_files))
            gone = sorted(set(test_files or ()) - set(all_files))
            if gone:
                warnings.warn(f"FaceFolder({root}): {len(gone)} of the {len(test_files)} recorded test "
                              f"images are gone from the folder: {', '.join(gone[:10])}"
                              f"{' …' if len(gone) > 10 else ''}", stacklevel=2)
        if not candidates:
            raise ValueError(f"the {split} split of {root} is empty ({len(all_files)} images, "
                             f"test_size={len(test)})")
        bad = set(self._validate(candidates))
        self.files = [name for name in candidates if name not in bad]
        self.skipped = sorted(bad)
        self.requested_size = len(candidates)
        if self.skipped:
            warnings.warn(
                f"FaceFolder({root}, split={split!r}): {len(self.skipped)} unreadable image(s) skipped, "
                f"{len(self.files)} of {len(candidates)} {split} images usable: {', '.join(self.skipped)}",
                stacklevel=2)
        if not self.files:
            raise ValueError(f"no readable images in the {split} split of {root}")

        self.mask_sampler = make_mask_sampler(masks, resolution) if isinstance(masks, str) else masks
        if not callable(self.mask_sampler):
            raise TypeError(f"masks must be a mask kind (str) or a callable generator -> mask; got {masks!r}")
        self._setup_landmarks(landmarks)

    # -- construction helpers -------------------------------------------------------------

    def _validate(self, names: list[str]) -> list[str]:
        """Decode every file once (into the cache when there is one); return the bad ones."""
        from tqdm import tqdm

        manifest = self._read_manifest()
        todo = []
        unstatable = {}
        for name in names:
            try:
                stat = (self.root / name).stat()
            except OSError:  # a dangling symlink or a symlink loop: unreadable like a broken file
                unstatable[name] = {"size": -1, "mtime_ns": -1, "ok": False}
                continue
            entry = manifest.get(name)
            fresh = entry is not None and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns
            if not fresh or (entry["ok"] and not self._cached_path(name).is_file()):
                todo.append((name, stat))

        def check(item):
            name, stat = item
            try:
                if self.cache_dir is None:
                    check_decodable(self.root / name)
                else:
                    self._write_cached(name, load_square_image(self.root / name, self.resolution))
                ok = True
            except DECODE_ERRORS:
                ok = False
            return name, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ok": ok}

        if todo:
            # PIL releases the GIL while decoding and resizing, so threads scale.
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                results = pool.map(check, todo)
                description = "caching images" if self.cache_dir else "checking images"
                for name, entry in tqdm(results, total=len(todo), desc=description, unit="img", delay=2):
                    manifest[name] = entry
            self._write_manifest(manifest)
        manifest.update(unstatable)  # not remembered: the link may be fixed before the next run
        return [name for name in names if not manifest[name]["ok"]]

    def _setup_landmarks(self, landmarks) -> None:
        self._provider_name, self._provider = None, None
        self._boxes = {}  # index -> (4, 4) int64, filled lazily for providers
        self.landmark_source = "canonical" if landmarks is None else landmarks
        canonical = boxes_tensor(component_boxes(canonical_landmarks(self.resolution), self.resolution))
        self._canonical_boxes = canonical
        if landmarks is None or landmarks == "canonical":
            return
        if isinstance(landmarks, str) and landmarks in PROVIDERS:
            # Built on first use in each process: detector objects (dlib) do not pickle to
            # spawned DataLoader workers.
            self._provider_name = landmarks
            return
        if not isinstance(landmarks, (str, os.PathLike)):
            raise TypeError(f"landmarks must be 'canonical', a provider name {sorted(PROVIDERS)}, "
                            f"a cache file path or None; got {landmarks!r}")
        cache = read_landmark_cache(landmarks)
        missing = []
        for index, name in enumerate(self.files):
            points = cache["landmarks"].get(name)
            if points is None:
                missing.append(name)
                continue
            self._boxes[index] = boxes_tensor(component_boxes(points * self.resolution, self.resolution))
        if missing:
            warnings.warn(f"landmark cache {landmarks} lacks {len(missing)} of {len(self.files)} "
                          f"{self.split} images; they use canonical boxes (first: {missing[0]}). "
                          "Rerun `oracleface landmarks` to complete it.", stacklevel=3)

    # -- image cache ----------------------------------------------------------------------

    def _cached_path(self, name: str) -> Path:
        return self.cache_dir / (name + ".png")

    def _write_cached(self, name: str, image: Image.Image) -> None:
        # Atomic: concurrent ranks may write the same file.
        with atomic_write(self._cached_path(name)) as temporary:
            image.save(temporary, format="PNG", compress_level=3)

    def _manifest_path(self) -> Path:
        return self.cache_dir / "manifest.json"

    def _read_manifest(self) -> dict:
        if self.cache_dir is None or not self._manifest_path().is_file():
            return {}
        with open(self._manifest_path()) as handle:
            return json.load(handle)

    def _write_manifest(self, manifest: dict) -> None:
        if self.cache_dir is None:
            return
        if self._manifest_path().is_file():  # the other split may have added entries meanwhile
            manifest = {**self._read_manifest(), **manifest}
        write_json_atomic(manifest, self._manifest_path(), indent=None)

    # -- dataset protocol -----------------------------------------------------------------

    @property
    def num_skipped(self) -> int:
        """Files of this split that could not be decoded (named in the construction warning)."""
        return len(self.skipped)

    def set_epoch(self, epoch: int) -> None:
        """Select the train masks of ``epoch`` (test masks do not depend on it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def load_image(self, index: int) -> Image.Image:
        """The ``index``-th image as a ``resolution``² RGB PIL image."""
        name = self.files[index]
        if self.cache_dir is not None:
            with Image.open(self._cached_path(name)) as image:
                return image.convert("RGB")
        try:
            return load_square_image(self.root / name, self.resolution)
        except DECODE_ERRORS as error:  # the file changed or broke after construction
            raise OSError(f"cannot decode {self.root / name} (it decoded when the dataset was "
                          f"built): {error}") from error

    def boxes(self, index: int, image: Image.Image | None = None) -> torch.Tensor:
        """The ``(4, 4)`` int64 component boxes of the ``index``-th image."""
        if index in self._boxes:
            return self._boxes[index]
        if self._provider_name is None:
            return self._canonical_boxes
        if self._provider is None:
            self._provider = get_provider(self._provider_name)
        points = self._provider(np.asarray(image if image is not None else self.load_image(index)))
        boxes = (self._canonical_boxes if points is None
                 else boxes_tensor(component_boxes(points, self.resolution)))
        self._boxes[index] = boxes
        return boxes

    def hole_mask(self, index: int) -> torch.Tensor:
        """The ``(1, H, W)`` hole mask of the ``index``-th sample (see module docstring)."""
        epoch = 0 if self.split == "test" else self.epoch
        generator = torch.Generator().manual_seed(mask_seed(self.seed, self.split, epoch, index))
        mask = self.mask_sampler(generator)
        if mask.shape != (1, self.resolution, self.resolution):
            raise ValueError(f"mask sampler returned shape {tuple(mask.shape)}; expected "
                             f"(1, {self.resolution}, {self.resolution})")
        return mask.float()

    def flipped(self, index: int) -> bool:
        """Whether the ``index``-th training image is mirrored this epoch."""
        return self.flip and mask_seed(self.seed, "flip", self.epoch, index) % 2 == 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        image = self.load_image(index)
        boxes = self.boxes(index, image)  # landmarks are found on the image as stored
        if self.flipped(index):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = mirror_boxes(boxes, self.resolution)
        return {
            "image": image_to_tensor(image),
            "hole_mask": self.hole_mask(index),
            "boxes": boxes,
            "index": index,
            "path": self.files[index],
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_provider"] = None  # rebuilt lazily in the receiving process
        return state

    def __repr__(self) -> str:
        return (f"FaceFolder(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"skipped={self.num_skipped}, resolution={self.resolution}, "
                f"landmarks={str(self.landmark_source)!r})")
