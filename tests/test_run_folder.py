"""One writer per run folder: train holds RUN_DIR/train.lock (fcntl.flock) for the run's life;
a second trainer is refused with one line naming the holder, before anything is written."""
import os
import subprocess
import sys

import pytest

from oracleface.cli import main
from oracleface.training.run_lock import LOCK_FILE, RunFolderBusy, RunLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl.flock is POSIX")

HOLD = ("import sys, time; from oracleface.training.run_lock import RunLock; "
        "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")


def hold_lock_in_another_process(run):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_trainer_is_refused_naming_the_holder_before_writing_anything(faces, tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock_in_another_process(run)
    try:
        assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "1"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and f"pid {holder.pid} on host" in error and "in use by" in error
        assert sorted(path.name for path in run.iterdir()) == [LOCK_FILE]  # no config.yaml, no split.json
    finally:
        holder.kill()
        holder.wait()
    # kill -9 ended the holder: the operating system released its lock.
    with RunLock(run):
        assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    assert not (run / LOCK_FILE).exists()


def test_the_lock_is_held_while_training_and_gone_after(faces, tmp_path, monkeypatch):
    from oracleface.training.trainer import Trainer

    run = tmp_path / "run"
    seen = []

    def run_checking_the_lock(self):
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()} "):
            RunLock(run).acquire()
        seen.append(True)
        return {"step": 0, "epoch": 0, "checkpoint": None}

    monkeypatch.setattr(Trainer, "run", run_checking_the_lock)
    assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "1", "--width", "0.125",
                 "--attention", "none", "--lambda-perceptual", "0", "--landmarks", "canonical",
                 "--device", "cpu", "--workers", "0", "--batch-size", "2"]) == 0
    assert seen == [True] and not (run / LOCK_FILE).exists()


def test_a_refused_fresh_run_leaves_no_folder_behind(tmp_path, capsys):
    run = tmp_path / "new_run"
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(run)]) == 2
    assert "no such folder" in capsys.readouterr().err and not run.exists()


def test_ctrl_c_before_training_is_one_line_and_releases_the_folder(faces, tmp_path, monkeypatch, capsys):
    from oracleface.training.trainer import Trainer

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the dataset or landmarks are prepared
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "__init__", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "1"]) == 130
    assert capsys.readouterr().err.strip() == "oracleface train: interrupted"
    assert not run.exists()  # it was created for the lock only, and nothing was written
