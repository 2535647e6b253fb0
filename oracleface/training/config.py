"""Training configuration: paper defaults, a YAML file, command-line overrides.

``TrainConfig`` is the one place the defaults live: ``LossWeights`` and the help texts of
``oracleface train`` read them from it. Each setting has one name; ``kl_layers`` (before
it was named ``oracle_layers``) still loads from old config files and checkpoints.

Precedence, lowest first: the defaults below (Section 4.1 of the paper) < the run being
resumed (its saved config) < ``--config FILE`` < flags given on the command line. The
merged config is written to ``RUN_DIR/config.yaml`` and stored in every checkpoint.

A YAML config file is a flat mapping of ``TrainConfig`` field names (``batch_size`` or
``batch-size``) to values, e.g.::

    batch_size: 32
    masks: irregular
    lambda_kl: 1.0
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import yaml

AMP_MODES = ("off", "bf16", "fp16")

# Fields that change the networks' shapes: a resumed run must keep them.
ARCHITECTURE_FIELDS = ("resolution", "attention", "width")
# Fields that decide the train/test split: a resumed run must keep them (see oracleface.data.folders).
SPLIT_FIELDS = ("seed", "test_size")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (paper defaults)."""

    data: Optional[str] = None            # image folder (FaceFolder)
    out: Optional[str] = None             # run folder
    # Model (Tables 6-9).
    resolution: int = 256
    attention: str = "dsa"                # "dsa" | "ca" | "none"
    width: float = 1.0                    # channel multiplier (1 = the paper; < 1 for smoke runs)
    dsa_backend: str = "auto"
    oracle_layers: Optional[list] = None  # oracle-supervised DSA layers; None: the first (12 at 256²)
    sync_bn: bool = True                  # multi-process: BatchNorm over the global batch
    # Optimisation (Section 4.1, Eq. 8 and 10).
    batch_size: int = 16                  # global batch, split evenly across processes
    lr_generator: float = 1e-4            # RMSprop
    lr_discriminator: float = 1e-4        # RMSprop, all seven critics
    lambda_reconstruction: float = 10.0
    lambda_kl: float = 2.0
    lambda_perceptual: float = 1.0
    lambda_adversarial: float = 1.0
    gradient_penalty: float = 10.0
    perceptual_pretrained: bool = True    # False: random VGG-16 (smoke runs only; warns)
    vgg_weights: Optional[str] = None     # default: $ORACLEFACE_VGG16_WEIGHTS or the torch hub cache
    # Data.
    masks: str = "random"                 # random | center | irregular | folder:PATH
    landmarks: str = "dlib"               # dlib | face-alignment | CACHE_FILE | canonical (template)
    test_size: Optional[float] = None     # held-out images (None: paper counts / 10 %)
    cache_dir: Optional[str] = None       # resized-image cache (FaceFolder)
    flip: bool = True                     # random horizontal flips of training images
    workers: Optional[int] = None         # DataLoader workers per process (None: runtime.default_workers)
    seed: int = 0
    # Length: whichever is given; neither trains until interrupted (SIGTERM/Ctrl-C save).
    steps: Optional[int] = None           # total optimisation steps (a target: resuming continues to it)
    epochs: Optional[int] = None
    # Runtime.
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    amp: str = "off"                      # off | bf16 | fp16
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3             # numbered checkpoints kept besides latest.pt
    sample_every: int = 500
    log_every: int = 10
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first field with an impossible value; return self."""
        positive = ("resolution", "batch_size", "checkpoint_every", "sample_every", "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or unset; got {value!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        for name in ("workers", "keep_checkpoints", "seed"):
            value = getattr(self, name)
            if name == "workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        for name in ("lr_generator", "lr_discriminator", "lambda_reconstruction", "lambda_kl",
                     "lambda_perceptual", "lambda_adversarial", "gradient_penalty", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number; got {value!r}")
        if not 0 < self.width <= 1:
            raise ValueError(f"width must be in (0, 1]; got {self.width!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}; got {self.amp!r}")
        return self

    def to_dict(self) -> dict:
        """Plain types only (str/int/float/bool/None/list): safe for YAML and weights_only loads."""
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(field.name for field in dataclasses.fields(TrainConfig))
DEFAULTS = TrainConfig()

# Old names of settings → their names now. Old config files and checkpoints keep loading.
RENAMED_FIELDS = {"kl_layers": "oracle_layers"}
_warned_deprecated: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One FutureWarning per process that ``old`` is an old name of ``new``."""
    import warnings

    if old not in _warned_deprecated:
        _warned_deprecated.add(old)
        warnings.warn(f"{old} is deprecated: use {new} (the same setting)", FutureWarning, stacklevel=3)


def rename_old_fields(values: dict, warn: bool = True) -> dict:
    """``values`` with old setting names (``RENAMED_FIELDS``) replaced by the current ones;
    ``warn``: say so once (not for configs saved by an older run, which nobody typed)."""
    renamed = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old not in renamed:
            continue
        value = renamed.pop(old)
        if new in renamed and renamed[new] != value:
            raise ValueError(f"{old} and {new} are one setting ({old} is its old name) but were given "
                             f"different values: {value!r} and {renamed[new]!r}")
        if warn:
            warn_deprecated(old, new)
        renamed[new] = value
    return renamed


def parse_layer_list(text: str) -> list[int]:
    """``"12,13,14"`` → ``[12, 13, 14]``; ``""`` → ``[]`` (the ``oracle_layers`` field from a flag)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated layer numbers such as 12,13,14; got {text!r}") from None


def normalise_keys(values: dict, source: str) -> dict:
    """``batch-size`` → ``batch_size``; unknown keys raise ValueError naming ``source``."""
    if not isinstance(values, dict):
        raise ValueError(f"{source} must hold a mapping of option names to values; got "
                         f"{type(values).__name__}")
    normalised = rename_old_fields({str(key).replace("-", "_"): value for key, value in values.items()})
    unknown = sorted(set(normalised) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; known: {', '.join(FIELD_NAMES)}")
    return normalised


def load_config_file(path) -> dict:
    """The options of a YAML config file (validated names, values as written)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    return normalise_keys(values or {}, f"config file {path}")


def merge_config(*layers: dict[str, Any]) -> TrainConfig:
    """A validated ``TrainConfig`` from the defaults overridden by each layer in turn."""
    values: dict[str, Any] = {}
    for layer in layers:
        layer = normalise_keys(layer, "config")
        # steps and epochs are alternatives: a layer that sets one replaces the other.
        for name, other in (("steps", "epochs"), ("epochs", "steps")):
            if layer.get(name) is not None and other not in layer:
                values[other] = None
        values.update(layer)
    config = TrainConfig(**values)
    return config.validate()


def save_config(config: TrainConfig, path) -> None:
    """Write ``config`` as YAML atomically (``oracleface.common.atomic_write``)."""
    from oracleface.common import atomic_write

    with atomic_write(path) as temporary, open(temporary, "w") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
