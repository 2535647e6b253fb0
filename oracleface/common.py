"""Two small pieces of logic that several parts of oracleface need, written once here.

- Atomic writes (``atomic_write``, ``write_json_atomic``, ``copy_atomic``): checkpoints,
  configs, test lists, metrics, landmark caches, cached images and completed photos are
  written to a temporary file in the target's folder (hidden: ``.NAME.XXXX.tmp``), flushed
  to disk and renamed over the target with ``os.replace`` (then the folder is flushed, so
  the rename is durable too). A crash or error mid-write leaves the previous file intact,
  never a truncated one, and the temporary file is removed; concurrent writers (ranks
  caching the same image) each replace the file whole. Only a killed process or a power
  cut can leave a temporary behind; ``remove_leftover_temporaries`` clears them.
- Compositing (``composite``): the completed image keeps every known pixel of the input
  and takes the hole from the generator, ``image·(1−M) + output·M`` (paper Eq. 7's I_gen,
  the evaluation's "valid pixels copied into the output", the training samples).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch


TEMPORARY_SUFFIX = ".tmp"  # ``.NAME.XXXX.tmp``: an atomic write in progress (or interrupted)


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new content to; when the block
    ends normally it replaces ``path`` (parent folders are created), and on any error it is
    deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
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
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open folders)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems do not fsync folders; the rename itself is still atomic
    finally:
        os.close(handle)


def copy_atomic(source, path) -> Path:
    """Write an independent copy of ``source`` to ``path`` atomically (not a link: either
    file may later break without the other); returns the path."""
    with atomic_write(path) as temporary:
        shutil.copyfile(source, temporary)
    return Path(path)


def remove_leftover_temporaries(folder) -> list[Path]:
    """Delete the temporaries that interrupted atomic writes left in ``folder`` (not
    recursive). Call only while no one else writes there (a trainer holds its run folder
    with ``oracleface.training.run_lock``). Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).glob(f".*{TEMPORARY_SUFFIX}")):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
