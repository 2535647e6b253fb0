"""Resuming applies what the user changed (or refuses what would invalidate the run), keeps its
position in samples, falls back past a damaged latest.pt; a non-finite loss stops with one line."""
import math

import pytest
import torch

from oracleface.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from oracleface.cli import main
from oracleface.training.config import TrainConfig
from oracleface.training.trainer import Trainer, prepare_run

TINY = dict(width=0.125, attention="none", batch_size=2, lambda_perceptual=0.0, workers=0, device="cpu",
            dsa_backend="reference", landmarks="canonical", progress=False)


def make_run(faces, run, step=0, **overrides):
    """A run folder whose latest.pt is at ``step`` (written without training)."""
    config = TrainConfig(data=str(faces), out=str(run), **{**TINY, **overrides}).validate()
    trainer = Trainer(config)
    trainer.step = step
    trainer.save()
    return trainer


def resume(run, **flags):
    config, state, _ = prepare_run([{"data": load_checkpoint(latest_checkpoint(run))["config"]["data"],
                                     "out": str(run), **flags}], "latest")
    return Trainer(config, state)


def test_resume_applies_new_learning_rates_and_loss_weights(faces, tmp_path):
    make_run(faces, tmp_path / "run", lr_generator=1e-4, lr_discriminator=1e-4)
    trainer = resume(tmp_path / "run", lr_generator=1e-7, lr_discriminator=3e-5, lambda_kl=0.5)
    assert [group["lr"] for group in trainer.g_optimizer.param_groups] == [1e-7]
    assert [group["lr"] for group in trainer.d_optimizer.param_groups] == [3e-5]
    assert trainer.model.weights.kl == 0.5
    unchanged = resume(tmp_path / "run")  # nothing given: the run's own values
    assert unchanged.g_optimizer.param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize("flag, value", [("seed", 1), ("test_size", 2)])
def test_resume_refuses_a_new_train_test_split(faces, tmp_path, flag, value):
    make_run(faces, tmp_path / "run")
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} {value} differs from the resumed run"):
        prepare_run([{"data": str(faces), "out": str(tmp_path / "run"), flag: value}], "latest")


def _epoch_order(trainer):
    """The global sample order of the trainer's current epoch (DistributedSampler, one process)."""
    sampler = torch.utils.data.distributed.DistributedSampler(
        trainer.dataset, num_replicas=1, rank=0, shuffle=True, seed=trainer.config.seed)
    sampler.set_epoch(trainer.epoch)
    return list(sampler)


def test_the_position_is_kept_in_samples_so_any_batch_size_resumes(faces, tmp_path):
    run = tmp_path / "run"
    trainer = make_run(faces, run, test_size=0)  # all six images train
    state = trainer.state()
    # A checkpoint of the format before positions were samples: one batch of 2 taken.
    state.update(step=1, epoch=0, batch_in_epoch=1)
    state.pop("sample_in_epoch", None)
    save_checkpoint(state, latest_checkpoint(run))
    larger = resume(run, batch_size=3)  # samples 2..4 of the epoch come next
    first = next(iter(larger._loader()))
    assert (larger.epoch, first["index"].tolist()) == (0, _epoch_order(larger)[2:5])
    largest = resume(run, batch_size=6)  # 4 samples left, fewer than a batch: the next epoch
    batches = list(largest._loader())
    assert largest.epoch == 1 and len(batches) == 1
    assert batches[0]["index"].tolist() == _epoch_order(largest)


def test_snapshots_are_independent_and_resume_falls_back_past_a_damaged_latest(faces, tmp_path, capsys):
    run = tmp_path / "run"
    make_run(faces, run, step=3)
    capsys.readouterr()
    latest = latest_checkpoint(run)
    snapshot = run / "checkpoints" / "step_00000003.pt"
    assert not latest.samefile(snapshot)
    with open(latest, "r+b") as handle:  # damaged in place (what a hard link would share)
        handle.truncate(1000)
    config, state, path = prepare_run([{"data": str(faces), "out": str(run)}], "latest")
    assert path == snapshot and state["step"] == 3
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and str(latest) in warning and f"resuming from {snapshot}" in warning


def test_leftover_temporary_files_are_removed_at_start(faces, tmp_path, capsys):
    run = tmp_path / "run"
    make_run(faces, run, step=1)
    leftovers = [run / "checkpoints" / ".latest.pt.abc123.tmp", run / ".config.yaml.xyz.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    assert main(["train", "--data", str(faces), "--out", str(run), "--resume", "--steps", "1"]) == 0
    assert not any(leftover.exists() for leftover in leftovers)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(faces, tmp_path, capsys,
                                                                                  monkeypatch):
    from oracleface.training.step import OracleFaceModel

    steps = []

    def fake_step(self, batch, *args, **kwargs):  # losses only: the check is what is tested
        steps.append(1)
        return {"g_total": 1.0, "d_total": math.nan if len(steps) == 2 else 2.0}

    monkeypatch.setattr(OracleFaceModel, "training_step", fake_step)
    run = tmp_path / "run"
    argv = ["train", "--data", str(faces), "--out", str(run), "--steps", "5", "--checkpoint-every", "1",
            "--batch-size", "2", "--workers", "0", "--width", "0.125", "--device", "cpu", "--no-progress",
            "--attention", "none", "--lambda-perceptual", "0", "--landmarks", "canonical"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("oracleface train: error: non-finite loss at step 2 (g_total=1, d_total=nan)")
    assert "last good checkpoint is step 1" in error
    assert load_checkpoint(latest_checkpoint(run))["step"] == 1
