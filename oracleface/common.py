"""Two small pieces of logic that several parts of oracleface need, written once here.

- Atomic writes (``atomic_write``, ``write_json_atomic``): checkpoints, configs, test
  lists, metrics, landmark caches and cached images are written to a temporary file in
  the target's folder (hidden: ``.NAME.XXXX.tmp``), flushed to disk and renamed over the
  target with ``os.replace`` (then the folder is flushed, so the rename is durable too). A crash or error mid-write leaves the previous file intact,
  never a truncated one, and the temporary file is removed; concurrent writers (ranks
  caching the same image) each replace the file whole.
- Compositing (``composite``): the completed image keeps every known pixel of the input
  and takes the hole from the generator, ``image·(1−M) + output·M`` (paper Eq. 7's I_gen,
  the evaluation's "valid pixels copied into the output", the training samples).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new content to; when the block
    ends normally it replaces ``path`` (parent folders are created), and on any error it is
    deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as written:  # the bytes reach the disk before the rename
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # and the rename itself survives a power cut


def _fsync_folder(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: folders cannot be opened for fsync
        return
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json_atomic(data, path, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``indent=None``: compact); returns the path."""
    with atomic_write(path) as temporary:
        with open(temporary, "w") as stream:
            if indent is None:
                json.dump(data, stream, separators=(",", ":"))
            else:
                json.dump(data, stream, indent=indent)
                stream.write("\n")
    return Path(path)


def composite(image: torch.Tensor, output: torch.Tensor, hole_mask: torch.Tensor) -> torch.Tensor:
    """Known pixels from ``image``, hole pixels from ``output``: ``image·(1−M) + output·M``.

    ``image``, ``output``: ``(B, C, H, W)``; ``hole_mask``: ``(B, 1, H, W)``, 1 = missing.
    The result has ``image``'s dtype and is differentiable in ``output``.
    """
    hole = hole_mask.to(image.dtype)
    return image * (1 - hole) + output.to(image.dtype) * hole
