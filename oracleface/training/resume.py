"""What ``oracleface train`` continues: the merged config and the checkpoint to resume,
worked out before anything in the run folder is written (``prepare_run``).

``--resume`` applies the command line over the saved config (learning rates, loss weights,
batch size, ...), but refuses a change of architecture (``ARCHITECTURE_FIELDS``) or of the
train/test split (``SPLIT_FIELDS``); ``latest.pt`` that cannot be read falls back to the
newest readable ``step_*.pt``, with a warning.
"""
from __future__ import annotations

from pathlib import Path

from oracleface.training.checkpoint import (
    CheckpointError,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    load_newest_readable,
    numbered_checkpoints,
)
from oracleface.training.config import (
    ARCHITECTURE_FIELDS,
    SPLIT_FIELDS,
    TrainConfig,
    merge_config,
    rename_old_fields,
)
from oracleface.training.runtime import announce, warn


def prepare_run(config_layers: list[dict], resume) -> tuple[TrainConfig, dict | None, Path | None]:
    """Merge the config and load the checkpoint to resume, before anything is written.

    ``config_layers``: the config file's values then the flags given (lowest first).
    ``resume``: None (a fresh run), ``"latest"`` (RUN_DIR/checkpoints/latest.pt, which must
    exist; when it cannot be read, the newest readable ``step_*.pt``, with a warning),
    ``"if-any"`` (like ``"latest"`` when the run holds a checkpoint, else a fresh run, said
    so) or a checkpoint path. Returns ``(config, checkpoint state or None, its path or None)``.
    Raises FileNotFoundError/ValueError/CheckpointError with the reason; on error
    nothing in the run folder has been touched.
    """
    config = merge_config(*config_layers)
    if config.data is None or config.out is None:
        raise ValueError("train needs --data DIR and --out RUN_DIR (flags or config file)")
    data = Path(config.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    latest = latest_checkpoint(config.out)
    holds_run = latest.exists() or bool(numbered_checkpoints(config.out))
    if resume == "if-any":
        if holds_run:
            resume = "latest"
        else:
            announce(f"nothing to resume in {config.out} (no {latest}): starting a fresh run")
            resume = None
    if resume is None:
        if holds_run:
            raise ValueError(f"{config.out} already holds a run ({latest.parent}); "
                             "pass --resume to continue it or choose another --out")
        return config, None, None
    if resume == "latest" and not holds_run:
        raise FileNotFoundError(f"nothing to resume: {latest} does not exist. Leave out --resume to "
                                f"start a fresh run in {config.out}, or pass --resume if-any to start "
                                "fresh whenever there is nothing to resume")
    if resume == "latest":
        state, path, passed_over = load_newest_readable(config.out)
        for reason in passed_over:
            warn(f"{reason}; resuming from {path} instead")
    else:
        path = Path(resume)
        state = load_checkpoint(path)
    saved = state["config"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} has no readable config")
    # The resumed run's config is the base; the config file and flags override it.
    saved = {key: value for key, value in rename_old_fields(saved, warn=False).items()
             if key in TrainConfig.__dataclass_fields__}
    config = merge_config(saved, *config_layers)
    check_compatible(state, config.to_dict(), path, ARCHITECTURE_FIELDS)
    refuse_split_changes(saved, config, path)
    changed = [f"{name} {saved[name]!r} → {value!r}" for name, value in config.to_dict().items()
               if name in saved and saved[name] != value]
    if changed:
        announce(f"resuming with changed settings: {', '.join(changed)}")
    return config, state, path


def refuse_split_changes(saved: dict, config: TrainConfig, path) -> None:
    """Raise ValueError naming the first ``SPLIT_FIELDS`` setting that differs from the
    resumed run's: a new split would train on images the run holds out (or the reverse)."""
    for name in SPLIT_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)!r} differs from the resumed "
                             f"run's {saved[name]!r} ({path}): it decides the train/test split, so the run "
                             "would train on images it holds out; keep it, or start a new run (another --out)")
