"""oracleface.common: the one atomic write every writer uses, and the one compositing formula."""
import json

import pytest
import torch
import yaml

from oracleface.common import (atomic_write, composite, copy_atomic, remove_leftover_temporaries,
                               write_json_atomic)


class WriteFailed(Exception):
    pass


def test_atomic_write_replaces_the_file_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_write(path) as temporary:
        assert temporary.parent == path.parent and temporary.name.startswith(".file.txt.")
        temporary.write_text("first")
    assert path.read_text() == "first"
    with pytest.raises(WriteFailed):
        with atomic_write(path) as temporary:
            temporary.write_text("half of the second")
            raise WriteFailed
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]  # no temporary left


def test_json_is_indented_or_compact_and_round_trips(tmp_path):
    data = {"seed": 0, "test": ["a.png", "b.png"]}
    write_json_atomic(data, tmp_path / "indented.json")
    write_json_atomic(data, tmp_path / "compact.json", indent=None)
    assert json.loads((tmp_path / "indented.json").read_text()) == data
    assert (tmp_path / "indented.json").read_text().endswith("\n")
    assert " " not in (tmp_path / "compact.json").read_text().replace("a.png", "")


def test_copy_atomic_makes_an_independent_copy(tmp_path):
    # step_N.pt must survive damage to latest.pt: a hard link would share its bytes.
    source, copy = tmp_path / "latest.pt", tmp_path / "checkpoints" / "step_1.pt"
    source.write_bytes(b"weights")
    copy_atomic(source, copy)
    assert copy.read_bytes() == b"weights" and copy.stat().st_ino != source.stat().st_ino
    source.write_bytes(b"damaged")
    assert copy.read_bytes() == b"weights"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["step_1.pt"]


def test_only_the_temporaries_of_atomic_writes_are_removed_as_leftovers(tmp_path):
    with pytest.raises(WriteFailed):
        with atomic_write(tmp_path / "latest.pt") as temporary:
            leftover = temporary.with_name(temporary.name.replace("latest", "step_1"))
            leftover.write_bytes(b"what a killed process leaves")  # an error cleans up its own
            raise WriteFailed
    for name in ("latest.pt", ".hidden", "notes.tmp"):
        (tmp_path / name).write_text("keep")
    assert remove_leftover_temporaries(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "latest.pt", "notes.tmp"]


def test_a_folder_that_cannot_be_fsynced_does_not_fail_the_write(tmp_path, monkeypatch):
    # Some file systems refuse fsync on folders; the rename is atomic all the same.
    import os
    import stat

    fsync = os.fsync

    def fsync_files_only(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(22, "Invalid argument")
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_files_only)
    write_json_atomic({"a": 1}, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}


def _failing_dump(*args, **kwargs):
    raise WriteFailed


@pytest.mark.parametrize("writer", ["config", "json", "landmark cache"])
def test_every_writer_leaves_the_old_file_and_no_temporary_when_writing_fails(tmp_path, monkeypatch, writer):
    # The config and landmark-cache writers used to leave their temporary files behind.
    import oracleface.data.landmarks as landmarks
    from oracleface.training.config import TrainConfig, save_config

    path = tmp_path / "target"
    path.write_text("old")
    if writer == "config":
        monkeypatch.setattr(yaml, "safe_dump", _failing_dump)
        write = lambda: save_config(TrainConfig(), path)  # noqa: E731
    elif writer == "json":
        monkeypatch.setattr(json, "dump", _failing_dump)
        write = lambda: write_json_atomic({}, path)  # noqa: E731
    else:
        monkeypatch.setattr(json, "dump", _failing_dump)
        write = lambda: landmarks._write_landmark_cache(path, "dlib", {}, set(), set())  # noqa: E731
    with pytest.raises(WriteFailed):
        write()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["target"]


def test_composite_keeps_the_known_pixels_and_takes_the_hole_from_the_output():
    image, output = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., 2:4, 2:6] = 1
    result = composite(image, output, hole)
    assert result.sum() == 3 * 8 and torch.equal(result[..., 2:4, 2:6], torch.ones(1, 3, 2, 4))


def test_composite_has_the_image_dtype_and_passes_gradients_to_the_hole_only():
    image = torch.rand(2, 3, 4, 4)
    output = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    hole = (torch.rand(2, 1, 4, 4) > 0.5).float()
    result = composite(image, output, hole)
    assert result.dtype == torch.float32
    result.sum().backward()
    assert torch.equal(output.grad.float(), hole.expand_as(image))
