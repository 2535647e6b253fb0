"""oracleface.training.checkpoint: RNG capture/restore, atomic writes, safe and checked loads."""
import random

import numpy as np
import pytest
import torch

from oracleface.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    prune_numbered,
    restore_rng_state,
    save_checkpoint,
)


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], \
        np.random.randn(1).tolist()


def _state(**extra):
    return {"step": 7, "epoch": 1, "batch_in_epoch": 2, "config": {"resolution": 256, "width": 1.0},
            "generator": {"w": torch.arange(4.0)}, "discriminator": {}, **extra}


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's state: it must survive too
    path = save_checkpoint(_state(rng=[capture_rng_state()]), tmp_path / "c.pt")
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"][0])
    assert _draws() == expected


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "run" / "latest.pt"
    save_checkpoint(_state(), path)
    save_checkpoint(_state(step=8), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]
    assert load_checkpoint(path)["step"] == 8


def test_save_rejects_incomplete_state(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint({"step": 1}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_corrupt_files_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "c.pt"
    if content is None:  # a real checkpoint cut in half
        save_checkpoint(_state(), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_foreign_pickles_and_missing_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an oracleface"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_check_compatible_names_the_differing_fields(tmp_path):
    state = _state()
    check_compatible(state, {"resolution": 256, "width": 1.0}, "c.pt", ("resolution", "width"))
    with pytest.raises(CheckpointError, match="resolution: checkpoint 256, requested 1024"):
        check_compatible(state, {"resolution": 1024, "width": 1.0}, "c.pt", ("resolution", "width"))


def test_prune_keeps_the_newest_numbered_checkpoints(tmp_path):
    for step in (1, 2, 10, 3):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"x")
    (tmp_path / "latest.pt").write_bytes(b"x")
    prune_numbered(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "step_00000003.pt", "step_00000010.pt"]


class _NotATensor:
    pass


@pytest.mark.parametrize("content", ["truncated", "garbage", "python_object"])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_the_problem(tmp_path, content):
    path = tmp_path / "latest.pt"
    if content == "python_object":  # a pickle weights_only refuses: PyTorch advises weights_only=False
        torch.save({"step": _NotATensor()}, path)
    else:
        save_checkpoint(_state(), path)
        path.write_bytes(path.read_bytes()[:300] if content == "truncated" else b"not a checkpoint " * 9)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "cannot read checkpoint" in message
    assert "weights_only" not in message and "\x1b" not in message
    assert ("Python objects" in message) == (content == "python_object")
