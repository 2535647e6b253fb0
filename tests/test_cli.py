"""The command line: config precedence, and clear errors that leave the run folder untouched."""
import warnings

import pytest
from PIL import Image

from oracleface.cli import build_parser, main
from oracleface.training.config import TrainConfig, load_config_file, merge_config, save_config
from oracleface.cli.train import flag_values
from oracleface.training.trainer import Trainer


@pytest.fixture()
def run_dir(faces, tmp_path):
    """A run folder at step 0 (config.yaml + checkpoints/latest.pt), made without training."""
    run = tmp_path / "run"
    config = TrainConfig(data=str(faces), out=str(run), width=0.125, attention="none", batch_size=2,
                         lambda_perceptual=0.0, workers=0, device="cpu", dsa_backend="reference").validate()
    trainer = Trainer(config)
    trainer.save()
    save_config(config, run / "config.yaml")
    return run


def snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def parse_train(argv):
    return build_parser().parse_args(["train", *argv])


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("batch-size: 8\nmasks: center\nsteps: 5\nlambda_kl: 1\n")
    args = parse_train(["--data", "d", "--out", "o", "--batch-size", "4", "--epochs", "2", "--amp", "bf16"])
    config = merge_config(load_config_file(config_file), flag_values(args))
    assert (config.batch_size, config.masks, config.lambda_kl, config.amp) == (4, "center", 1, "bf16")
    assert (config.steps, config.epochs) == (None, 2)  # --epochs replaces the file's steps
    assert config.lr_generator == config.lr_discriminator == 1e-4 and config.lambda_reconstruction == 10
    assert "resolution" not in flag_values(args)  # options not given stay out of the flag layer


def test_config_errors_name_the_option(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("batch_sise: 8\n")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config_file(config_file)
    with pytest.raises(ValueError, match="amp must be one of"):
        merge_config({"amp": "fp8"})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        merge_config({"batch_size": 0})


def test_missing_and_empty_data_folders_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(out), "--device", "cpu"]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert not out.exists()


def test_a_new_run_never_overwrites_an_existing_one(faces, run_dir, capsys):
    before = snapshot(run_dir)
    assert main(["train", "--data", str(faces), "--out", str(run_dir), "--device", "cpu"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_resuming_with_another_resolution_is_refused(faces, run_dir, capsys):
    before = snapshot(run_dir)
    assert main(["train", "--data", str(faces), "--out", str(run_dir), "--resume", "--resolution", "1024"]) == 2
    assert "resolution: checkpoint 256, requested 1024" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_corrupt_checkpoint_is_refused_by_train_eval_and_complete(faces, run_dir, tmp_path, capsys):
    latest = run_dir / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    for snapshot_file in (run_dir / "checkpoints").glob("step_*.pt"):  # else --resume falls back to it
        snapshot_file.write_bytes(latest.read_bytes())
    before = snapshot(run_dir)
    assert main(["train", "--data", str(faces), "--out", str(run_dir), "--resume"]) == 2
    assert main(["eval", "--data", str(faces), "--checkpoint", str(latest), "--device", "cpu"]) == 2
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40)).save(photo)
    assert main(["complete", str(photo), "--mask", "center", "--checkpoint", str(latest),
                 "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 2
    errors = capsys.readouterr().err
    # train names latest.pt and the snapshot step_00000000.pt it tried next; eval and complete one each
    assert errors.count("cannot read checkpoint") == 4 and "corrupt" in errors
    assert snapshot(run_dir) == before and not (tmp_path / "o.png").exists()


def test_mask_of_the_wrong_size_is_refused(run_dir, tmp_path, capsys):
    photo, mask = tmp_path / "p.png", tmp_path / "m.png"
    Image.new("RGB", (40, 30)).save(photo)
    Image.new("L", (30, 40), 255).save(mask)
    assert main(["complete", str(photo), "--mask", str(mask), "--checkpoint",
                 str(run_dir / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "o.png")]) == 2
    assert "30×40 but the image is 40×30" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_resume_with_nothing_to_resume_says_so_and_starts_nothing(faces, tmp_path, capsys):
    out = tmp_path / "empty"
    assert main(["train", "--data", str(faces), "--out", str(out), "--resume", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "nothing to resume" in error and str(out / "checkpoints" / "latest.pt") in error
    assert "--resume if-any" in error and not out.exists()


def test_default_workers_fit_the_cpus_this_process_may_use(monkeypatch):
    from oracleface.training import runtime

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.default_workers() == 2
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runtime.default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes share the node's CPUs
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert runtime.default_workers() == 1


@pytest.mark.parametrize("flag, expected", [([], 2), (["--workers", "1"], 1)])
def test_the_trainer_loader_fits_a_two_cpu_machine_without_pytorch_warnings(faces, tmp_path, monkeypatch,
                                                                            flag, expected):
    import os
    import warnings

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # DataLoader compares its workers with the same affinity mask.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    args = parse_train(["--data", str(faces), "--out", str(tmp_path / "run"), "--width", "0.125",
                        "--attention", "none", "--batch-size", "2", "--lambda-perceptual", "0",
                        "--device", "cpu", "--landmarks", "canonical", *flag])
    trainer = Trainer(merge_config(flag_values(args)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = trainer._loader()
        next(iter(loader))
    assert loader.num_workers == trainer.workers == expected
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def _trainer_config(data, out, *flags):
    args = parse_train(["--data", str(data), "--out", str(out), "--width", "0.125", "--attention", "none",
                        "--batch-size", "2", "--lambda-perceptual", "0", "--device", "cpu", "--workers", "0",
                        "--no-progress", *flags])
    return merge_config(flag_values(args))


def test_train_defaults_to_dlib_landmarks_computed_once_into_a_cache(celeba_hq, tmp_path, capsys):
    import shutil

    from oracleface.data.landmarks import read_landmark_cache

    data = tmp_path / "faces"
    data.mkdir()
    for photo in sorted(celeba_hq.glob("*.jpg"))[:4]:
        shutil.copy(photo, data / photo.name)
    trainer = Trainer(_trainer_config(data, tmp_path / "run"))
    captured = capsys.readouterr()
    assert trainer.config.landmarks == "dlib" and "canonical" not in captured.err
    cache = data / "landmarks_dlib.json"
    assert f"landmarks (dlib): {cache}: 4 images, 4 computed now; no face found in 0" in captured.out
    assert len(read_landmark_cache(cache)["landmarks"]) == 4
    boxes = {tuple(trainer.dataset[i]["boxes"].flatten().tolist()) for i in range(len(trainer.dataset))}
    canonical = trainer.dataset._canonical_boxes.flatten().tolist()
    assert tuple(canonical) not in boxes and len(boxes) == len(trainer.dataset)  # one set per face
    Trainer(_trainer_config(data, tmp_path / "again"))
    assert "4 images, 0 computed now" in capsys.readouterr().out  # reused, not recomputed


def test_canonical_landmarks_only_when_asked_with_a_one_line_warning(faces, tmp_path, capsys):
    Trainer(_trainer_config(faces, tmp_path / "run", "--landmarks", "canonical"))
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "canonical" in line]
    assert len(error_lines) == 1 and "warning" in error_lines[0] and "dlib" in error_lines[0]


def test_the_landmark_cache_is_kept_in_the_run_folder_when_the_data_is_read_only(faces, tmp_path, monkeypatch):
    import os
    import shutil

    from oracleface.training.trainer import landmark_cache_path

    data = shutil.copytree(faces, tmp_path / "faces", ignore=shutil.ignore_patterns("*.json"))
    assert landmark_cache_path(_trainer_config(data, tmp_path / "run")) == data / "landmarks_dlib.json"
    with_cache_dir = _trainer_config(data, tmp_path / "run", "--cache-dir", str(tmp_path / "c"))
    assert landmark_cache_path(with_cache_dir) == tmp_path / "c" / "landmarks_dlib.json"
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert landmark_cache_path(_trainer_config(data, tmp_path / "run")) == tmp_path / "run" / "landmarks_dlib.json"


def test_new_train_defaults_and_their_opt_out_flags():
    defaults = merge_config(flag_values(parse_train(["--data", "d", "--out", "o"])))
    assert (defaults.landmarks, defaults.flip, defaults.sync_bn, defaults.workers) == ("dlib", True, True, None)
    changed = merge_config(flag_values(parse_train(["--data", "d", "--out", "o", "--no-flip", "--no-sync-bn",
                                                    "--landmarks", "canonical", "--workers", "3"])))
    assert (changed.landmarks, changed.flip, changed.sync_bn, changed.workers) == ("canonical", False, False, 3)
    assert parse_train(["--resume", "if-any"]).resume == "if-any" and parse_train(["--resume"]).resume == "latest"


def test_the_help_quotes_the_defaults_of_the_config(monkeypatch, capsys):
    # TrainConfig is the one source of defaults: the help reads them from it.
    import oracleface.training.config as config

    monkeypatch.setattr(config, "DEFAULTS", TrainConfig(lambda_kl=3.5, batch_size=24, lr_generator=2e-4))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in ("weight of the kl loss (default 3.5)", "(default 24)", "RMSprop lr of G (default 0.0002)"):
        assert expected in help_text


def test_loss_weights_default_to_the_config():
    from oracleface.losses import LossWeights

    defaults = TrainConfig()
    assert LossWeights() == LossWeights(defaults.lambda_reconstruction, defaults.lambda_kl,
                                        defaults.lambda_perceptual, defaults.lambda_adversarial,
                                        defaults.gradient_penalty)


def test_the_old_kl_layers_name_still_works_and_warns_once(tmp_path, monkeypatch):
    import oracleface.training.config as config

    monkeypatch.setattr(config, "_warned_deprecated", set())
    with pytest.warns(FutureWarning, match="--kl-layers is deprecated: use --oracle-layers"):
        args = parse_train(["--kl-layers", "12", "13"])
    assert flag_values(args)["oracle_layers"] == [12, 13] and "kl_layers" not in flag_values(args)
    old_file = tmp_path / "old.yaml"
    old_file.write_text("kl_layers: [12, 14]\n")
    with pytest.warns(FutureWarning, match="kl_layers is deprecated: use oracle_layers"):
        assert merge_config(load_config_file(old_file)).oracle_layers == [12, 14]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second use is quiet
        parse_train(["--kl-layers", "12"])
        assert merge_config(load_config_file(old_file)).oracle_layers == [12, 14]
    with pytest.raises(ValueError, match="kl_layers and oracle_layers are one setting"):
        merge_config({"kl_layers": [12], "oracle_layers": [13]})


def test_a_run_saved_with_the_old_name_resumes_with_its_oracle_layers(run_dir):
    # Checkpoints written before the rename store kl_layers in their config.
    from oracleface.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from oracleface.training.trainer import prepare_run

    path = latest_checkpoint(run_dir)
    state = load_checkpoint(path)
    del state["config"]["oracle_layers"]
    state["config"]["kl_layers"] = [12, 13]
    save_checkpoint(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nobody typed the old name: no warning
        config, _, _ = prepare_run([{"data": state["config"]["data"], "out": str(run_dir)}], "latest")
    assert config.oracle_layers == [12, 13]


def test_every_command_reports_bad_input_in_one_line(tmp_path, capsys):
    # The landmarks command used to end in a traceback here (its cache is from another provider).
    (tmp_path / "faces").mkdir()
    cache = tmp_path / "landmarks.json"
    cache.write_text('{"format": "oracleface-landmarks", "version": 1, "provider": "dlib", '
                     '"landmarks": {}, "no_face": [], "unreadable": []}')
    commands = {
        "landmarks": ["landmarks", str(tmp_path / "faces"), "--provider", "canonical", "--out", str(cache)],
        "eval": ["eval", "--data", str(tmp_path / "absent"), "--checkpoint", str(tmp_path / "c.pt")],
        "complete": ["complete", str(tmp_path / "absent.png"), "--mask", "center", "--checkpoint",
                     str(tmp_path / "c.pt"), "--out", str(tmp_path / "out.png")],
        "train": ["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run")],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        error = capsys.readouterr().err
        assert error.startswith(f"oracleface {name}: error: ") and error.count("\n") == 1, error
