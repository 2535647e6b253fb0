"""`complete` never destroys input: outputs that are inputs (or each other) are refused before
the model runs; lossless outputs keep known pixels bit-identical; a lossy one says it does not."""
import numpy as np
import pytest
from PIL import Image

from oracleface.cli import main
from oracleface.training.config import TrainConfig
from oracleface.training.trainer import Trainer


@pytest.fixture(scope="module")
def checkpoint(faces, tmp_path_factory):
    run = tmp_path_factory.mktemp("complete") / "run"
    config = TrainConfig(data=str(faces), out=str(run), width=0.125, attention="none", batch_size=2,
                         lambda_perceptual=0.0, workers=0, device="cpu", dsa_backend="reference",
                         landmarks="canonical").validate()
    return Trainer(config).save()


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def no_model(monkeypatch):
    """Fail if the model is loaded: the checks must come first."""
    import oracleface.training.checkpoint as checkpoint_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the output was checked")

    monkeypatch.setattr(checkpoint_module, "generator_from_checkpoint", refuse)


def complete(photo, checkpoint, *extra):
    return main(["complete", str(photo), "--mask", "center", "--checkpoint", str(checkpoint),
                 "--device", "cpu", *extra])


def one_error_line(capsys):
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("oracleface complete: error: ")
    return error


def test_an_output_that_is_the_input_is_refused_before_the_model_runs(photo, checkpoint, capsys, no_model,
                                                                      tmp_path):
    before = photo.read_bytes()
    assert complete(photo, checkpoint, "--out", str(photo)) == 2
    assert "is the IMAGE" in one_error_line(capsys)
    (tmp_path / "alias").symlink_to(photo)
    assert complete(photo, checkpoint, "--out", str(tmp_path / "alias")) == 2  # the same file
    assert "is the IMAGE" in one_error_line(capsys)
    assert complete(photo, checkpoint, "--out", str(tmp_path / "o.png"), "--side-by-side", str(checkpoint)) == 2
    assert "is the --checkpoint" in one_error_line(capsys)
    assert photo.read_bytes() == before


def test_two_outputs_in_one_file_and_unknown_extensions_are_refused_first(photo, checkpoint, capsys, no_model,
                                                                         tmp_path):
    out = tmp_path / "o.png"
    assert complete(photo, checkpoint, "--out", str(out), "--side-by-side", str(out), "--overwrite") == 2
    assert "is the same file as --out" in one_error_line(capsys)
    for bad in ("o.xyz", "o"):
        assert complete(photo, checkpoint, "--out", str(tmp_path / bad)) == 2
        assert "image extension" in one_error_line(capsys)
    assert complete(photo, checkpoint, "--out", str(tmp_path)) == 2
    assert "is a folder" in one_error_line(capsys)
    assert complete(photo, checkpoint, "--out", str(photo / "o.png")) == 2  # under a file
    assert "is a file" in one_error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png"]


def test_overwrite_allows_replacing_the_input(photo, checkpoint, capsys):
    original = np.asarray(Image.open(photo)).copy()
    assert complete(photo, checkpoint, "--out", str(photo), "--overwrite") == 0
    result = np.asarray(Image.open(photo))
    hole = np.zeros(original.shape[:2], bool)
    hole[14:34, 10:30] = True  # center: half the shorter side (40), centred
    assert (result[~hole] == original[~hole]).all()


@pytest.mark.parametrize("extension", [".png", ".webp", ".tif", ".bmp"])
def test_lossless_outputs_keep_every_known_pixel_bit_identical(photo, checkpoint, capsys, tmp_path, extension):
    out = tmp_path / f"o{extension}"
    assert complete(photo, checkpoint, "--out", str(out)) == 0
    assert "warning" not in capsys.readouterr().err
    original, result = np.asarray(Image.open(photo)), np.asarray(Image.open(out).convert("RGB"))
    known = np.ones(original.shape[:2], bool)
    known[14:34, 10:30] = False
    assert (result[known] == original[known]).all()


def test_a_lossy_output_says_so_in_one_line_and_png_is_the_default(photo, checkpoint, capsys, tmp_path):
    assert complete(photo, checkpoint, "--out", str(tmp_path / "o.jpg")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "lossy" in warnings[0] and "known pixels" in warnings[0]
    assert complete(photo, checkpoint) == 0
    assert Image.open(tmp_path / "photo_completed.png").format == "PNG"


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_a_corrupt_input_image_is_one_line(tmp_path, checkpoint, capsys, content, no_model):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    assert complete(bad, checkpoint, "--out", str(tmp_path / "o.png")) == 2
    assert "IMAGE" in one_error_line(capsys)
