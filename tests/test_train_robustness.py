"""What the end-to-end tests in test_train.py do not reach: stopping by SIGTERM and resuming
from the checkpoint it leaves, bfloat16 autocast, and completion of an unaligned photo."""
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from oracleface.training.checkpoint import load_checkpoint
from oracleface.cli import main
from tests.test_train import CHEAP, FAST, scalars


def _latest_step(run_dir):
    return int(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a POSIX signal")
def test_sigterm_finishes_the_step_saves_and_resume_continues(faces, tmp_path):
    run = tmp_path / "run"
    with_progress = [arg for arg in FAST if arg != "--no-progress"]  # the bar tells us it trains
    command = [sys.executable, "-m", "oracleface", "train", "--data", str(faces), "--out", str(run),
               "--steps", "1000", "--checkpoint-every", "1000", "--sample-every", "1000",
               *with_progress, *CHEAP]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    captured = bytearray()
    reader = threading.Thread(target=lambda: [captured.extend(chunk) for chunk in
                                              iter(lambda: process.stdout.read1(256), b"")],
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while b" 1/1000 " not in captured:  # tqdm counts the first finished step
            assert process.poll() is None, captured.decode(errors="replace")
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    output = bytes(captured)
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"stopped by signal" in output
    stopped_at = _latest_step(run)
    assert 1 <= stopped_at < 1000
    assert main(["train", "--data", str(faces), "--out", str(run), "--resume",
                 "--steps", str(stopped_at + 1), *FAST, *CHEAP]) == 0
    assert _latest_step(run) == stopped_at + 1


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains_with_finite_losses(faces, tmp_path, amp):
    """fp16 runs through the GradScaler, whose first steps overflow and are skipped by design:
    training must go on, and the logged losses of applied steps must be finite."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "3", "--amp", amp,
                 "--attention", "dsa", "--lambda-perceptual", "0", *FAST]) == 0
    losses = scalars(run, "generator/g_total")
    assert sorted(losses) == [1, 2, 3] and np.isfinite(losses[3])
    if amp == "bf16":
        assert all(np.isfinite(list(losses.values())))


@pytest.mark.slow
def test_complete_aligns_an_unaligned_face_with_dlib(faces, tmp_path):
    pytest.importorskip("dlib", reason="the dlib provider needs dlib-bin")
    skimage_data = pytest.importorskip("skimage.data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "1", *FAST, *CHEAP]) == 0
    # The astronaut's face, shrunk and placed off-centre on a wider canvas: not aligned.
    face = Image.fromarray(skimage_data.astronaut()).resize((256, 256))
    canvas = Image.new("RGB", (420, 300), (90, 120, 150))
    canvas.paste(face, (140, 30))
    canvas.save(tmp_path / "photo.png")
    hole = np.zeros((300, 420), dtype=np.uint8)
    hole[95:135, 200:280] = 255  # over the eyes
    Image.fromarray(hole).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["complete", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                 "--checkpoint", str(run / "checkpoints" / "latest.pt"), "--out", str(out),
                 "--align", "dlib", "--device", "cpu"]) == 0
    result, photo = np.asarray(Image.open(out)), np.asarray(canvas)
    assert result.shape == photo.shape
    known = hole == 0
    np.testing.assert_array_equal(result[known], photo[known])
    assert not np.array_equal(result[~known], photo[~known])


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["fp16", "off"])
def test_only_steps_the_grad_scaler_skipped_may_have_non_finite_losses(faces, tmp_path, monkeypatch, amp,
                                                                       capsys):
    """An overflowing fp16 step is skipped by the GradScaler (which lowers its scale) and must
    not stop training; a non-finite loss on an applied step must."""
    from oracleface.training.step import OracleFaceModel

    original = OracleFaceModel.training_step

    def overflowing_step(self, *args, scaler=None, **kwargs):
        terms = original(self, *args, scaler=scaler, **kwargs)
        if scaler is not None:
            scaler.update(scaler.get_scale() / 2)  # what GradScaler does after an overflow
        return {**terms, "d_gp": float("inf")}

    monkeypatch.setattr(OracleFaceModel, "training_step", overflowing_step)
    command = ["train", "--data", str(faces), "--out", str(tmp_path / "run"), "--steps", "2",
               "--amp", amp, *FAST, *CHEAP]
    if amp == "fp16":
        assert main(command) == 0
    else:
        assert main(command) == 2  # one line, not a traceback (tests/test_resume.py checks it fully)
        assert "error: non-finite loss at step 1 " in capsys.readouterr().err
