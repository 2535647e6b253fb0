"""The training-step API: generator + multi-discriminator + losses in one module.

A trainer needs only::

    model = OracleFaceModel(resolution=256).to(device)
    g_opt = torch.optim.RMSprop(model.generator.parameters(), lr=1e-4)
    d_opt = torch.optim.RMSprop(model.discriminator.parameters(), lr=1e-4)
    for batch in loader:   # {"image": (B,3,H,W) in [0,1], "hole_mask": (B,1,H,W), "boxes": (B,4,4)}
        terms = model.training_step(batch, g_opt, d_opt)          # floats, for logging

``training_step`` does one critic update and one generator update per batch (the
pix2pix order: generate once, update D on the detached output, then update G against
the updated D). The pieces are public for trainers that schedule differently (e.g.
several critic steps per generator step): ``generate``, ``discriminator_losses``,
``generator_losses`` return tensors.

Mixed precision: pass ``autocast=lambda: torch.autocast("cuda", dtype=...)`` and, for
float16, a ``torch.amp.GradScaler`` (one scaler serves both optimizers; the gradient
penalty unscales its inner gradient itself). Multi-GPU: GAN steps run several forwards
per backward (oracle pass, real/fake/interpolated critics, double backward), which
``DistributedDataParallel``'s reducer does not support well; instead run the model
per process, ``broadcast_parameters(model)`` once, and pass
``gradient_sync=all_reduce_gradients`` so gradients are averaged across processes
after each backward (the approach of StyleGAN2-ADA). BatchNorm statistics then stay
per process unless the trainer converts them with ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from oracleface.common import composite
from oracleface.data.boxes import COMPONENTS
from oracleface.losses import (
    LossWeights,
    PerceptualLoss,
    attention_kl_loss,
    discriminator_loss,
    generator_adversarial_loss,
    reconstruction_loss,
    streaming_oracle_kl_loss,
)
from oracleface.models import Generator, MultiDiscriminator
from oracleface.training.config import rename_old_fields

Tensor = torch.Tensor


@dataclasses.dataclass
class GeneratorOutput:
    """The generator's output ``(B,3,H,W)`` and, of the supervised DSA layers, either the
    attention inputs for the streaming loss (``queries_keys``, see
    ``Generator.forward_queries_keys``) or the dense maps (``attention``, only with
    ``detach_oracle=False``)."""

    output: Tensor
    attention: dict
    queries_keys: dict = dataclasses.field(default_factory=dict)


def check_batch(batch: dict, resolution: int) -> None:
    """Raise ValueError/TypeError unless ``batch`` follows the batch contract."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict with image, hole_mask, boxes; got {type(batch).__name__}")
    missing = [key for key in ("image", "hole_mask", "boxes") if key not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    image, hole_mask, boxes = batch["image"], batch["hole_mask"], batch["boxes"]
    size = (resolution, resolution)
    if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[-2:]) != size:
        raise ValueError(f"batch['image'] must have shape (B, 3, {resolution}, {resolution}); "
                         f"got {tuple(image.shape)}")
    if hole_mask.shape != (image.shape[0], 1, *size):
        raise ValueError(f"batch['hole_mask'] must have shape ({image.shape[0]}, 1, {resolution}, "
                         f"{resolution}); got {tuple(hole_mask.shape)}")
    if boxes.shape != (image.shape[0], len(COMPONENTS), 4) or boxes.dtype != torch.int64:
        raise ValueError(f"batch['boxes'] must be int64 of shape ({image.shape[0]}, "
                         f"{len(COMPONENTS)}, 4); got {boxes.dtype} {tuple(boxes.shape)}")


class OracleFaceModel(nn.Module):
    """Generator, seven critics and every loss of the paper, with the per-step logic.

    Args:
        resolution, attention, dsa_backend: see ``oracleface.models.Generator``.
        weights: λ's of Eq. 10 and γ of Eq. 8 (``LossWeights``; paper defaults).
        oracle_layers: DSA layers with oracle supervision, the generator's ``oracle_layers``
            (default: the first DSA layer — layer 12 at 256², 14 at 1024² — as in the paper;
            ``(12, 13, 14)``: every DSA layer at 256²; ``()`` disables LKL; always ``()``
            without DSA).
        detach_oracle: the oracle is the target (no gradient through the oracle pass): LKL
            is streamed (``streaming_oracle_kl_loss``: no L×L maps, any layer). ``False``
            differentiates through both passes with the dense maps (``attention_kl_loss``,
            O(L²) memory: for ablations at 16²).
        perceptual: a ``PerceptualLoss``; default builds one with ``vgg_weights`` /
            ``pretrained`` (see ``oracleface.losses.PerceptualLoss``).
        width: channel multiplier of G and the critics in (0, 1] (1 = the paper).
        kl_layers: the old name of ``oracle_layers`` (deprecated; warns once).
    """

    def __init__(self, resolution: int = 256, attention: str = "dsa", dsa_backend: str = "auto",
                 weights: LossWeights = LossWeights(), oracle_layers=None, detach_oracle: bool = True,
                 perceptual: Optional[PerceptualLoss] = None, vgg_weights=None,
                 pretrained: bool = True, width: float = 1.0, kl_layers=None):
        super().__init__()
        given = {name: tuple(layers) for name, layers in (("kl_layers", kl_layers),
                                                          ("oracle_layers", oracle_layers))
                 if layers is not None}
        oracle_layers = rename_old_fields(given).get("oracle_layers")  # kl_layers: the old name
        self.resolution = resolution
        self.generator = Generator(resolution, attention, dsa_backend, width=width,
                                   oracle_layers=oracle_layers)
        self.discriminator = MultiDiscriminator(resolution, width=width)
        self.perceptual = perceptual if perceptual is not None else PerceptualLoss(vgg_weights, pretrained)
        self.weights = weights
        self.oracle_layers = self.generator.oracle_layers
        self.detach_oracle = detach_oracle

    # ------------------------------------------------------------------ pieces
    def generate(self, batch: dict) -> GeneratorOutput:
        """Run G on the batch, keeping what the oracle loss needs of ``oracle_layers``: their
        q, k (streamed loss) or, with ``detach_oracle=False``, their dense maps."""
        check_batch(batch, self.resolution)
        if self.oracle_layers and self.detach_oracle:
            output, queries_keys = self.generator.forward_queries_keys(
                batch["image"], batch["hole_mask"], self.oracle_layers)
            return GeneratorOutput(output, {}, queries_keys)
        if self.oracle_layers:
            output, maps = self.generator(batch["image"], batch["hole_mask"], return_attention=True,
                                          attention_layers=self.oracle_layers)
        else:
            output, maps = self.generator(batch["image"], batch["hole_mask"]), {}
        return GeneratorOutput(output, maps)

    def generator_losses(self, batch: dict, generated: GeneratorOutput) -> dict[str, Tensor]:
        """Eq. 10 and its terms: ``g_reconstruction, g_perceptual, g_kl, g_adversarial, g_total``
        (unweighted terms, weighted total). The critics' gradients are not touched here;
        ``training_step`` freezes them while G trains."""
        image, hole_mask, boxes = batch["image"], batch["hole_mask"], batch["boxes"]
        output = generated.output
        terms = {
            "g_reconstruction": reconstruction_loss(output, image, hole_mask, boxes),
            # I_gen: valid pixels from the ground truth
            "g_perceptual": self.perceptual(output, composite(image, output, hole_mask), image),
        }
        if self.oracle_layers and self.detach_oracle:
            oracle = self.generator.oracle_queries_keys(image, hole_mask, self.oracle_layers)
            terms["g_kl"] = streaming_oracle_kl_loss(generated.queries_keys, oracle)
        elif self.oracle_layers:
            oracle = self.generator.oracle_attention(image, hole_mask, self.oracle_layers, detach=False)
            terms["g_kl"] = attention_kl_loss(generated.attention, oracle, hole_mask)
        else:
            terms["g_kl"] = output.new_zeros((), dtype=torch.float32)
        terms["g_adversarial"] = generator_adversarial_loss(self.discriminator(output, hole_mask, boxes))
        w = self.weights
        terms["g_total"] = (w.reconstruction * terms["g_reconstruction"] + w.kl * terms["g_kl"]
                            + w.perceptual * terms["g_perceptual"]
                            + w.adversarial * terms["g_adversarial"])
        return terms

    def discriminator_losses(self, batch: dict, fake: Tensor, scaler=None) -> dict[str, Tensor]:
        """Eq. 8 per critic and summed (``d_total``); ``fake`` is detached."""
        check_batch(batch, self.resolution)
        return discriminator_loss(self.discriminator, batch["image"], fake, batch["hole_mask"],
                                  batch["boxes"], self.weights.gradient_penalty, scaler)

    # ------------------------------------------------------------------ one step
    def training_step(self, batch: dict, g_optimizer: torch.optim.Optimizer,
                      d_optimizer: torch.optim.Optimizer, *, scaler=None,
                      autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                      gradient_sync: Optional[Callable[[nn.Module], None]] = None) -> dict[str, float]:
        """One critic update then one generator update; returns every term as a float."""
        autocast = autocast or contextlib.nullcontext
        self.train()
        with autocast():
            generated = self.generate(batch)

        self.discriminator.requires_grad_(True)
        d_optimizer.zero_grad(set_to_none=True)
        with autocast():
            d_terms = self.discriminator_losses(batch, generated.output.detach(), scaler)
        self._update(d_terms["d_total"], d_optimizer, self.discriminator, scaler, gradient_sync)

        # The critics only judge while G trains: no gradients into their weights.
        self.discriminator.requires_grad_(False)
        try:
            g_optimizer.zero_grad(set_to_none=True)
            with autocast():
                g_terms = self.generator_losses(batch, generated)
            self._update(g_terms["g_total"], g_optimizer, self.generator, scaler, gradient_sync)
        finally:
            self.discriminator.requires_grad_(True)
        if scaler is not None:
            scaler.update()
        terms = {**d_terms, **g_terms}
        values = torch.stack([t.detach().float() for t in terms.values()]).cpu().tolist()
        return dict(zip(terms, values))

    @staticmethod
    def _update(loss: Tensor, optimizer, module: nn.Module, scaler, gradient_sync) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if gradient_sync is not None:
            gradient_sync(module)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()


# ----------------------------------------------------------------------------- multi-process
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every process (once, before training)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)


def all_reduce_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over all processes (one flat all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # unused this step: contribute zeros so every rank agrees
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
