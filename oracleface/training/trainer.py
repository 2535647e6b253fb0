"""The trainer behind ``oracleface train`` (one process, or one per GPU under ``torchrun``);
the command line is ``oracleface.cli.train``.

The per-batch logic (critic update, generator update, every loss) lives in
``oracleface.training.step.OracleFaceModel.training_step``; this module owns everything around
it: devices and processes, the data stream, checkpoints, resuming, signals, logging.

Run folder::

    RUN_DIR/config.yaml              the merged config (see oracleface.training.config)
    RUN_DIR/checkpoints/latest.pt    newest checkpoint (what --resume continues)
    RUN_DIR/checkpoints/step_*.pt    the last ``keep_checkpoints`` numbered ones (copies)
    RUN_DIR/train.lock               while a trainer runs: its pid, host, start time
    RUN_DIR/tensorboard/             scalars: every loss term, images/s
    RUN_DIR/samples/step_*.png       input | output | ground truth, component boxes drawn

Design decisions:

- Multi-process: one process per GPU (``torchrun``), or any number on the CPU (gloo).
  The GAN step runs several forwards per backward and a double backward (gradient
  penalty), which ``DistributedDataParallel``'s reducer does not support; so, as
  ``oracleface.training.step`` recommends, every process holds a full model, rank 0's weights
  are broadcast once, and gradients are averaged by one all-reduce after each backward
  (``all_reduce_gradients``) — numerically what DDP does. ``--batch-size`` is the global
  batch, split evenly across processes (each needs ≥ 2 for BatchNorm); BatchNorm
  normalises over the global batch (``oracleface.training.sync_batchnorm``; ``--no-sync-bn``: per
  process). Only rank 0 logs, samples and writes checkpoints.
- Exact resume: the data order is a ``DistributedSampler`` permutation of
  ``(seed, epoch)`` started at the saved position, kept in samples (so a resumed run may
  use another batch size: it continues with the next unseen samples of the epoch, or the
  next epoch when less than a batch is left); masks depend on ``(seed, epoch, index)``
  (``FaceFolder.set_epoch``); the DataLoader draws its worker seeds from its own
  generator, never from the global RNG; the checkpoint holds every process's RNG states.
  So a resumed run computes the same next batch, masks and losses as an uninterrupted one.
- Resuming (``oracleface.training.resume``) applies the command line: learning rates, loss
  weights, batch size, length, cadences, ... take their new values (the optimizers'
  restored ``param_groups`` get the configured learning rates). Settings that would
  invalidate the run are refused: the architecture (``config.ARCHITECTURE_FIELDS``) and
  the split (``config.SPLIT_FIELDS``).
- One writer per run folder: ``train`` holds ``RUN_DIR/train.lock``
  (``oracleface.training.run_lock``) from before it reads the run until it ends; temporary
  files of interrupted atomic writes are removed at start; ``step_N.pt`` are independent copies of ``latest.pt``, and
  ``--resume`` falls back to the newest readable one (with a warning) when ``latest.pt``
  cannot be read.
- A non-finite loss stops training with one line naming the step and the losses; the
  step is not saved, so the last checkpoint stays the last good one.
- Stopping: SIGTERM and Ctrl-C set a flag; the current step finishes, a checkpoint is
  written and training returns. Across processes the flag is all-reduced with the
  logged losses (one small all-reduce per step).
- A perceptual weight of 0 skips the VGG-16 pass entirely (its term is logged as 0).
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from oracleface.common import copy_atomic
from oracleface.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    prune_numbered,
    restore_rng_state,
    save_checkpoint,
)
from oracleface.training.config import TrainConfig, merge_config, save_config
from oracleface.training.resume import prepare_run
from oracleface.training.runtime import (
    StopRequest,
    announce,
    default_workers,
    is_main_process,
    setup_processes,
    teardown_processes,
    warn,
)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- data stream
class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``) that can start mid-epoch:
    ``start_sample`` skips this process's first samples, so a resumed run sees exactly the
    samples an uninterrupted one would have seen next.

    Each process takes every ``num_replicas``-th index of the epoch's permutation, so
    after ``n`` global samples (a multiple of the process count) each process has taken
    its first ``n / num_replicas``: the position does not depend on the batch size."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.batch_size = batch_size
        self.start_sample = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size  # the DataLoader drops the partial batch

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_sample:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_sample)


class ZeroPerceptual(nn.Module):
    """Stands in for the VGG-16 perceptual loss when its weight is 0: costs nothing."""

    def forward(self, output: torch.Tensor, composite: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.new_zeros((), dtype=torch.float32)


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """``OracleFaceModel`` (generator, seven critics, losses) for ``config``, on ``device``."""
    from oracleface.losses import LossWeights, PerceptualLoss
    from oracleface.training.step import OracleFaceModel

    weights = LossWeights(reconstruction=config.lambda_reconstruction, kl=config.lambda_kl,
                          perceptual=config.lambda_perceptual, adversarial=config.lambda_adversarial,
                          gradient_penalty=config.gradient_penalty)
    if config.lambda_perceptual == 0:
        perceptual = ZeroPerceptual()
    else:
        if not config.perceptual_pretrained:
            warnings.warn("\n" + "!" * 78 + "\n--no-perceptual-pretrained: the perceptual loss uses a "
                          "VGG-16 with RANDOM weights.\nThe model will not learn what the paper's model "
                          "learns; use this for smoke runs only.\n" + "!" * 78, UserWarning, stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # warned above, once, loudly
            perceptual = PerceptualLoss(config.vgg_weights, pretrained=config.perceptual_pretrained)
    extra = {"width": config.width} if config.width != 1 else {}
    model = OracleFaceModel(resolution=config.resolution, attention=config.attention,
                            dsa_backend=config.dsa_backend, weights=weights,
                            oracle_layers=None if config.oracle_layers is None else tuple(config.oracle_layers),
                            perceptual=perceptual, **extra)
    return model.to(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One training run; ``run()`` trains until the configured length or a stop signal.

    ``checkpoint``: a loaded checkpoint (``oracleface.training.checkpoint.load_checkpoint``) to
    continue from, already checked against ``config`` by the caller.
    """

    def __init__(self, config: TrainConfig, checkpoint: dict | None = None):
        from oracleface.data.folders import TEST_LIST_FILE, FaceFolder, read_test_list

        self.config = config
        self.out = Path(config.out)
        self.group = setup_processes(config.device)
        group = self.group
        if config.batch_size % group.world_size or config.batch_size // group.world_size < 2:
            raise ValueError(f"batch_size ({config.batch_size}) must split evenly into at least 2 "
                             f"samples for each of the {group.world_size} processes (BatchNorm)")
        self.local_batch = config.batch_size // group.world_size
        landmarks = self._landmark_source()
        # A run's held-out files stay held out when the folder changes (see oracleface.data.folders).
        recorded = read_test_list(self.out) if (self.out / TEST_LIST_FILE).is_file() else None
        self.dataset = FaceFolder(config.data, resolution=config.resolution, split="train",
                                  test_size=config.test_size, seed=config.seed, masks=config.masks,
                                  landmarks=landmarks, cache_dir=config.cache_dir,
                                  test_files=recorded, flip=config.flip)
        self.sampler = ResumableSampler(self.dataset, group.world_size, group.rank, config.seed,
                                        self.local_batch)
        if self.sampler.batches_per_epoch == 0:
            raise ValueError(f"the train split of {config.data} has {len(self.dataset)} images, fewer "
                             f"than one batch of {config.batch_size}; lower --batch-size")
        self.batches_per_epoch = self.sampler.batches_per_epoch
        if config.steps is not None:
            self.total_steps = config.steps
        elif config.epochs is not None:
            self.total_steps = config.epochs * self.batches_per_epoch
        else:
            self.total_steps = None  # until SIGTERM / Ctrl-C

        seed_everything(config.seed + group.rank)
        self.model = build_model(config, group.device)
        if group.distributed and config.sync_bn:
            from oracleface.training.sync_batchnorm import synchronise_batchnorm

            synchronise_batchnorm(self.model.generator, group.device)
        self.g_optimizer = torch.optim.RMSprop(self.model.generator.parameters(), lr=config.lr_generator)
        self.d_optimizer = torch.optim.RMSprop(self.model.discriminator.parameters(),
                                               lr=config.lr_discriminator)
        self.scaler = torch.amp.GradScaler(group.device.type) if config.amp == "fp16" else None
        self.step = self.epoch = self.sample_in_epoch = 0  # sample_in_epoch: global samples
        if checkpoint is not None:
            self._restore(checkpoint)
        if group.distributed:
            from oracleface.training.step import broadcast_parameters
            broadcast_parameters(self.model)
        self.last_saved_step = self.step if checkpoint is not None else -1
        # The machine decides when the config does not (resumed runs may move machines).
        self.workers = config.workers if config.workers is not None else default_workers()
        self.writer = None

    def _landmark_source(self):
        """What ``FaceFolder`` gets as ``landmarks``: for a provider (``dlib``, the default) its
        cache file, computed on first use by rank 0 (progress bar, resumable: an interrupted
        run continues it) while the other processes wait; ``canonical`` with a warning."""
        from oracleface.data.landmarks import PROVIDERS, build_landmark_cache

        config, group = self.config, self.group
        if config.landmarks == "canonical":
            if group.is_main:
                warn("--landmarks canonical: one template for every face (2-6 px off per face on "
                     "CelebA-HQ, the nose up to 14 px); the paper uses per-image landmarks (the default, dlib)")
            return "canonical"
        if config.landmarks not in PROVIDERS:
            return config.landmarks  # a cache file written by `oracleface landmarks`
        path = landmark_cache_path(config)
        if group.is_main:
            try:
                summary = build_landmark_cache(config.data, provider=config.landmarks, out=path,
                                               progress=config.progress)
            except RuntimeError as error:  # the provider's package or weights are missing
                raise ValueError(f"--landmarks {config.landmarks}: {error}; or pass --landmarks "
                                 "canonical") from error
            announce(f"landmarks ({config.landmarks}): {summary['path']}: {summary['total']} images, "
                     f"{summary['computed']} computed now; no face found in {summary['no_face']} "
                     "(canonical boxes used)")
        if group.distributed:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ state
    def _restore(self, state: dict) -> None:
        try:
            self.model.generator.load_state_dict(state["generator"])
            self.model.discriminator.load_state_dict(state["discriminator"])
            self.g_optimizer.load_state_dict(state["optimizer_generator"])
            self.d_optimizer.load_state_dict(state["optimizer_discriminator"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"the checkpoint's weights do not fit the configured model: {error}") from error
        # The restored param_groups carry the saved learning rates; the command line wins.
        for optimizer, lr in ((self.g_optimizer, self.config.lr_generator),
                              (self.d_optimizer, self.config.lr_discriminator)):
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.sample_in_epoch = saved_sample_in_epoch(state)
        if self._epoch_exhausted():  # a larger batch no longer fits in what is left of the epoch
            self._next_epoch()
        rng = state.get("rng") or []
        if self.group.rank < len(rng):
            restore_rng_state(rng[self.group.rank])
        else:
            warnings.warn(f"the checkpoint holds RNG states for {len(rng)} processes, not for rank "
                          f"{self.group.rank}: this process reseeds, so the run continues but does "
                          "not replay the uninterrupted one exactly", stacklevel=2)
            seed_everything(self.config.seed + self.group.rank + 7919 * self.step)

    def state(self) -> dict:
        """The checkpoint contents; collective: every process must call it."""
        rng = capture_rng_state()
        if self.group.distributed:
            states = [None] * self.group.world_size
            dist.all_gather_object(states, rng)
            rng = states
        else:
            rng = [rng]
        return {
            "step": self.step, "epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
            "batch_in_epoch": self.sample_in_epoch // self.config.batch_size,  # read by older versions
            "config": self.config.to_dict(),
            "generator": self.model.generator.state_dict(),
            "discriminator": self.model.discriminator.state_dict(),
            "optimizer_generator": self.g_optimizer.state_dict(),
            "optimizer_discriminator": self.d_optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
        }

    def save(self) -> Path | None:
        """Write ``latest.pt`` and ``step_N.pt`` (rank 0); collective."""
        state = self.state()
        self.last_saved_step = self.step
        if not self.group.is_main:
            return None
        directory = self.out / "checkpoints"
        path = save_checkpoint(state, latest_checkpoint(self.out))
        if self.config.keep_checkpoints > 0:
            # A copy, not a link: a latest.pt damaged later must not take the snapshots with it.
            copy_atomic(path, directory / f"step_{self.step:08d}.pt")
            prune_numbered(directory, self.config.keep_checkpoints)
        return path

    # ------------------------------------------------------------------ loop pieces
    def _loader(self) -> torch.utils.data.DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_sample = self.sample_in_epoch // self.group.world_size
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
            num_workers=self.workers, pin_memory=self.group.device.type == "cuda",
            # Worker seeds from a private generator: the global RNG (saved in checkpoints)
            # is then consumed by the training step alone.
            generator=torch.Generator().manual_seed(self.config.seed + self.epoch),
            collate_fn=_collate)

    def _to_device(self, batch: dict) -> dict:
        device = self.group.device
        return {"image": batch["image"].to(device, non_blocking=True),
                "hole_mask": batch["hole_mask"].to(device, non_blocking=True),
                "boxes": batch["boxes"].to(device, non_blocking=True)}

    def _autocast(self):
        if self.config.amp == "off":
            return None
        dtype = AMP_DTYPES[self.config.amp]
        return lambda: torch.autocast(self.group.device.type, dtype=dtype)

    def _synchronise(self, terms: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """Average the logged terms over processes and agree on stopping (one all-reduce)."""
        if not self.group.distributed:
            return terms, stop
        packed = torch.tensor([float(stop), *terms.values()], dtype=torch.float64,
                              device=self.group.device)
        dist.all_reduce(packed)
        values = (packed[1:] / self.group.world_size).tolist()
        return dict(zip(terms, values)), bool(packed[0].item() > 0)

    def _last_good_checkpoint(self) -> str:
        if self.last_saved_step < 0:
            return "and no checkpoint was written yet"
        return f"the last good checkpoint is step {self.last_saved_step} ({latest_checkpoint(self.out)})"

    def _write_sample(self, batch: dict) -> None:
        from oracleface.models import batchnorm_statistics_frozen
        from oracleface.visualize import sample_grid, save_png

        generator = self.model.generator
        with torch.no_grad(), batchnorm_statistics_frozen(generator):
            output = generator(batch["image"], batch["hole_mask"])
        if not self.group.is_main:
            return
        grid = sample_grid(batch["image"].float().cpu(), batch["hole_mask"].cpu(), output.float().cpu(),
                           batch["boxes"].cpu())
        save_png(grid, self.out / "samples" / f"step_{self.step:08d}.png")

    def _log(self, terms: dict[str, float], images_per_second: float) -> None:
        for name, value in terms.items():
            group = "discriminator" if name.startswith("d_") else "generator"
            self.writer.add_scalar(f"{group}/{name}", value, self.step)
        self.writer.add_scalar("throughput/images_per_second", images_per_second, self.step)

    def _finished(self) -> bool:
        if self.config.steps is None and self.config.epochs is not None:
            return self.epoch >= self.config.epochs  # holds whatever batch sizes the run used
        return self.total_steps is not None and self.step >= self.total_steps

    def _epoch_exhausted(self) -> bool:
        """Whether this epoch has no full batch left for this process (the loader drops partial ones)."""
        taken = self.sample_in_epoch // self.group.world_size
        return self.sampler.num_samples - taken < self.local_batch

    def _next_epoch(self) -> None:
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Train; returns ``{"step", "epoch", "checkpoint", "stopped_by_signal", "last_terms"}``."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        config, group = self.config, self.group
        if group.is_main:
            from oracleface.data.folders import write_test_list

            save_config(config, self.out / "config.yaml")
            write_test_list(self.out, self.dataset.test_files, config.seed)
            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        model, autocast = self.model, self._autocast()
        gradient_sync = None
        if group.distributed:
            from oracleface.training.step import all_reduce_gradients
            gradient_sync = all_reduce_gradients
        progress = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not (group.is_main and config.progress), desc="train")
        terms: dict[str, float] = {}
        speed = None
        stop = self._finished()
        checkpoint_path = None
        with StopRequest() as stop_request:
            while not stop:
                stepped = False
                for batch in self._loader():
                    stepped = True
                    batch = self._to_device(batch)
                    started = time.perf_counter()
                    scale_before = self.scaler.get_scale() if self.scaler is not None else None
                    terms = model.training_step(batch, self.g_optimizer, self.d_optimizer,
                                                scaler=self.scaler, autocast=autocast,
                                                gradient_sync=gradient_sync)
                    if group.device.type == "cuda":
                        torch.cuda.synchronize(group.device)
                    images_per_second = config.batch_size / (time.perf_counter() - started)
                    speed = images_per_second if speed is None else 0.9 * speed + 0.1 * images_per_second
                    self.step += 1
                    self.sample_in_epoch += config.batch_size
                    if self._epoch_exhausted():
                        self._next_epoch()
                    terms, stop_requested = self._synchronise(terms, stop_request.requested)
                    stop = stop_requested or self._finished()
                    # fp16: a step the GradScaler skipped (overflow, scale lowered) has
                    # non-finite losses by design; every applied step must be finite.
                    if scale_before is None or self.scaler.get_scale() >= scale_before:
                        try:
                            _check_finite(terms, self.step, self._last_good_checkpoint())
                        except NonFiniteLoss:
                            progress.close()
                            if self.writer is not None:
                                self.writer.close()
                            raise
                    if group.is_main:
                        progress.update(1)
                        progress.set_postfix(G=f"{terms['g_total']:.3f}", D=f"{terms['d_total']:.3f}",
                                             img_s=f"{speed:.3g}", refresh=False)
                        if self.step % config.log_every == 0 or stop:
                            self._log(terms, images_per_second)
                    if self.step % config.sample_every == 0:
                        self._write_sample(batch)  # every process: synchronised BatchNorm is collective
                    if self.step % config.checkpoint_every == 0 or stop:
                        checkpoint_path = self.save()
                    if stop:
                        break
                if not stepped and not stop:  # cannot happen (positions are normalised); never spin
                    self._next_epoch()
            if self.last_saved_step != self.step:
                checkpoint_path = self.save()
            stopped_by_signal = stop_request.requested
        progress.close()
        if self.writer is not None:
            self.writer.close()
        if group.is_main and stopped_by_signal:
            print(f"stopped by signal at step {self.step}; checkpoint: {checkpoint_path}", flush=True)
        return {"step": self.step, "epoch": self.epoch, "checkpoint": checkpoint_path,
                "stopped_by_signal": stopped_by_signal, "last_terms": terms}

    def close(self) -> None:
        teardown_processes(self.group)


def landmark_cache_path(config: TrainConfig) -> Path:
    """Where training keeps the landmarks of ``config.landmarks`` (a provider): in
    ``--cache-dir`` when given, else where ``oracleface landmarks DATA_DIR`` writes
    (``DATA_DIR/landmarks_<provider>.json``) when that folder is writable, else in the run
    folder."""
    from oracleface.data.landmarks import default_cache_path

    name = default_cache_path(config.data, config.landmarks).name
    if config.cache_dir is not None:
        return Path(config.cache_dir) / name
    in_data = default_cache_path(config.data, config.landmarks)
    if in_data.is_file() or os.access(config.data, os.W_OK):
        return in_data
    return Path(config.out) / name


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([item["image"] for item in items]),
            "hole_mask": torch.stack([item["hole_mask"] for item in items]),
            "boxes": torch.stack([item["boxes"] for item in items]),
            "index": torch.tensor([item["index"] for item in items])}


class NonFiniteLoss(FloatingPointError):
    """A training step produced a non-finite loss; its message is one line for the user."""


def _check_finite(terms: dict[str, float], step: int, kept: str) -> None:
    """Raise ``NonFiniteLoss`` when a logged loss is NaN/inf; ``kept``: the last good checkpoint."""
    if all(math.isfinite(value) for value in terms.values()):
        return
    losses = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
    raise NonFiniteLoss(f"non-finite loss at step {step} ({losses}); training stopped without saving "
                        f"this step, {kept}. Resume with --amp off or a lower --lr-generator / "
                        "--lr-discriminator")


def saved_sample_in_epoch(state: dict) -> int:
    """The position in the epoch a checkpoint saved, in global samples (checkpoints before
    ``sample_in_epoch`` existed count batches of their own batch size)."""
    if "sample_in_epoch" in state:
        return int(state["sample_in_epoch"])
    return int(state["batch_in_epoch"]) * int(state["config"].get("batch_size", 16))


# ----------------------------------------------------------------------------- entry point
def train(config_layers: list[dict], resume=None) -> dict:
    """Lock the run folder (``oracleface.training.run_lock``; rank 0), prepare (see ``prepare_run``),
    train, tear down; returns ``Trainer.run``'s summary."""
    from contextlib import nullcontext

    from oracleface.common import remove_leftover_temporaries
    from oracleface.training.run_lock import RunLock

    out = merge_config(*config_layers).out
    lock = RunLock(out) if out is not None and is_main_process() else nullcontext()
    with lock:
        config, state, path = prepare_run(config_layers, resume)
        if is_main_process():
            out = Path(config.out)
            leftovers = remove_leftover_temporaries(out) + remove_leftover_temporaries(out / "checkpoints")
            if leftovers:
                warn(f"removed {len(leftovers)} temporary file(s) left by an interrupted write: "
                     f"{', '.join(leftover.name for leftover in leftovers)}")
        trainer = Trainer(config, state)
        try:
            if state is not None:
                announce(f"resuming from step {trainer.step} (epoch {trainer.epoch}) — {path}")
            return trainer.run()
        finally:
            trainer.close()
