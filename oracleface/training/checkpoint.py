"""Training checkpoints: atomic writes, safe loads, every RNG state.

A checkpoint is one ``torch.save`` file holding plain types and tensors only, so it
loads with ``torch.load(weights_only=True)`` (no pickled code runs)::

    {"format": "oracleface-checkpoint", "version": 1,
     "step": int, "epoch": int, "sample_in_epoch": int,    # where the data stream resumes (global samples)
     "batch_in_epoch": int,                                  # the same in batches (older readers)
     "config": dict,                                         # TrainConfig.to_dict()
     "generator": state_dict, "discriminator": state_dict,   # all seven critics
     "optimizer_generator": ..., "optimizer_discriminator": ..., "scaler": ... | None,
     "rng": [per-process RNG states, rank order]}             # see ``capture_rng_state``

Writes are atomic and durable (``oracleface.common.atomic_write``: temporary file in the
same folder, fsync, ``os.replace``, fsync of the folder): a crash or power loss mid-write
leaves the previous checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from oracleface.common import atomic_write

FORMAT = "oracleface-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("step", "epoch", "batch_in_epoch", "config", "generator", "discriminator")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or for another model."""


# ----------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain types (``weights_only``-loadable):
    torch CPU, every CUDA device (when CUDA is initialised), numpy's global and Python's."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored for as many devices as
    both the checkpoint and this machine have."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["internal"].tolist()),
                     python_state["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.to(torch.uint8), device)


# ----------------------------------------------------------------------------- files
def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` (see module docstring) to ``path`` atomically; returns the path."""
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {missing}")
    with atomic_write(path) as temporary:
        torch.save({"format": FORMAT, "version": VERSION, **state}, temporary)
    return Path(path)


# What torch.load raises for truncated/garbled files and for non-checkpoint pickles.
_READ_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
                ValueError, KeyError, AttributeError, TypeError, IndexError)


def _read_error_reason(error: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed. PyTorch's own messages run
    over several lines and advise ``weights_only=False``, which would run the file's code."""
    message = str(error)
    if "Unsupported global" in message:
        return ("it holds Python objects besides tensors and plain values (not an oracleface "
                "checkpoint; such files are never unpickled)")
    detail = ""
    if message and "weights only" not in message.lower():  # PyTorch's own detail, first line only
        detail = f" ({type(error).__name__}: {message.splitlines()[0][:100]})"
    return f"the file is corrupt, truncated or not a PyTorch checkpoint{detail}"


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and check an oracleface checkpoint with ``torch.load(weights_only=True)``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` (a
    ``ValueError``) for anything that is not a complete checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _READ_ERRORS as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {_read_error_reason(error)}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an oracleface training checkpoint "
                              f"(no format={FORMAT!r} marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; this "
                              f"oracleface reads version {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


def check_compatible(state: dict, expected: dict, path, fields) -> None:
    """Raise ``CheckpointError`` if the checkpoint's config differs from ``expected`` in
    any of ``fields`` (architecture fields: the weights would not fit)."""
    saved = state["config"]
    differing = [f"{name}: checkpoint {saved.get(name)!r}, requested {expected[name]!r}"
                 for name in fields if name in expected and saved.get(name) != expected[name]]
    if differing:
        raise CheckpointError(f"checkpoint {path} was trained for another model ({'; '.join(differing)})")


def latest_checkpoint(run_dir) -> Path:
    """``RUN_DIR/checkpoints/latest.pt`` (what ``--resume`` without a path continues from)."""
    return Path(run_dir) / "checkpoints" / "latest.pt"


def numbered_checkpoints(run_dir) -> list[Path]:
    """``RUN_DIR/checkpoints/step_*.pt``, newest (highest step) first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"), reverse=True)


def load_newest_readable(run_dir) -> tuple[dict, Path, list[str]]:
    """The checkpoint ``--resume`` continues: ``latest.pt``, or when that cannot be read the
    newest readable ``step_*.pt``. Returns ``(state, its path, reasons)`` where ``reasons``
    names every newer checkpoint that was passed over and why (one line each).
    Raises ``FileNotFoundError`` when the run holds no checkpoint and ``CheckpointError``
    (naming each file) when none is readable."""
    reasons = []
    for path in [latest_checkpoint(run_dir), *numbered_checkpoints(run_dir)]:
        try:
            return load_checkpoint(path), path, reasons
        except FileNotFoundError:
            continue
        except CheckpointError as error:
            reasons.append(str(error))
    if not reasons:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    raise CheckpointError("no readable checkpoint to resume: " + "; ".join(reasons))


def prune_numbered(directory, keep: int) -> None:
    """Delete all but the ``keep`` newest ``step_*.pt`` files in ``directory``."""
    numbered = sorted(Path(directory).glob("step_*.pt"))
    for path in numbered[:max(0, len(numbered) - keep)]:
        path.unlink(missing_ok=True)


def generator_from_checkpoint(path, device="cpu", dsa_backend: str = "auto"):
    """``(Generator in eval mode on device, checkpoint state)`` for inference.

    The architecture comes from the checkpoint's config; ``dsa_backend`` is chosen for
    this machine (a run trained with the CUDA kernels still evaluates on a CPU).
    """
    from oracleface.models import Generator

    state = load_checkpoint(path)
    config = state["config"]
    extra = {"width": config["width"]} if config.get("width", 1.0) != 1.0 else {}
    try:
        generator = Generator(config["resolution"], config.get("attention", "dsa"), dsa_backend, **extra)
        generator.load_state_dict(state["generator"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: its generator weights do not fit the model its "
                              f"config describes: {error}") from error
    return generator.to(device).eval(), state
