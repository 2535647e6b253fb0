"""The losses of Section 3.3 (Eq. 5–10).

=====================  ==========================================================
``reconstruction_loss``  Eq. 6: weighted L1, weight 1 + hole + Σ component boxes
``PerceptualLoss``       Eq. 7: VGG-16 feature L1 of I_out and of the composite I_gen
``attention_kl_loss``    Eq. 5: KL(E_gt‖E) + KL(E'_gt‖E') over valid query×key pairs
``streaming_oracle_kl_loss``  Eq. 5 from the passes' q, k (``dsa_ops.attention_kl``): no L×L maps
``discriminator_loss``   Eq. 8: WGAN-GP critic loss, summed over the seven critics
``generator_adversarial_loss``  Eq. 9
``LossWeights``          Eq. 10: λr = 10, λKL = 2, λp = 1, λG = 1 (and γ = 10)
=====================  ==========================================================

Mask convention: ``hole_mask`` is 1 where pixels are missing (the paper's M_1 is its
complement). Images are in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dsa_ops import attention_kl, reduce_hole_mask
from oracleface.data.boxes import component_masks
from oracleface.training.config import DEFAULTS

Tensor = torch.Tensor

VGG16_WEIGHTS_ENV = "ORACLEFACE_VGG16_WEIGHTS"
VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's file name in the hub cache
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Trade-offs of Eq. 10 and the gradient-penalty weight γ of Eq. 8 (paper defaults, from
    ``oracleface.training.config.TrainConfig``, the one place defaults are written)."""

    reconstruction: float = DEFAULTS.lambda_reconstruction
    kl: float = DEFAULTS.lambda_kl
    perceptual: float = DEFAULTS.lambda_perceptual
    adversarial: float = DEFAULTS.lambda_adversarial
    gradient_penalty: float = DEFAULTS.gradient_penalty


# ----------------------------------------------------------------------------- Eq. 6
def reconstruction_weights(hole_mask: Tensor, boxes: Tensor) -> Tensor:
    """``1 + hole + Σ component indicators`` ``(B, 1, H, W)``: the paper's 1 + Σ(1 − M_i)."""
    height, width = hole_mask.shape[-2:]
    components = component_masks(boxes.to(hole_mask.device), height, width)
    return 1 + hole_mask.float() + components.sum(dim=1, keepdim=True)


def reconstruction_loss(output: Tensor, target: Tensor, hole_mask: Tensor, boxes: Tensor) -> Tensor:
    """Eq. 6: mean over all elements of ``weights ⊙ |output − target|`` (a scalar)."""
    if output.shape != target.shape:
        raise ValueError(f"output and target must have the same shape; got {tuple(output.shape)} "
                         f"and {tuple(target.shape)}")
    if hole_mask.shape != (output.shape[0], 1, *output.shape[-2:]):
        raise ValueError(f"hole_mask must have shape (B, 1, H, W) = "
                         f"{(output.shape[0], 1, *output.shape[-2:])}; got {tuple(hole_mask.shape)}")
    weights = reconstruction_weights(hole_mask, boxes).to(output.dtype)
    return (weights * (output - target).abs()).mean()


# ----------------------------------------------------------------------------- Eq. 7
# torchvision's vgg16.features up to relu5_3: (out channels, number of 3×3 convs) per stage.
_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def resolve_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    """Where the VGG-16 weights are: ``path``, else ``$ORACLEFACE_VGG16_WEIGHTS``, else the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``).

    Nothing is downloaded; a missing file raises ``FileNotFoundError`` naming the paths.
    """
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS_FILE
    for source, candidate in (("argument", path), (VGG16_WEIGHTS_ENV, os.environ.get(VGG16_WEIGHTS_ENV))):
        if candidate:
            candidate = Path(candidate).expanduser()
            if not candidate.is_file():
                raise FileNotFoundError(f"VGG-16 weights given by {source} not found: {candidate}")
            return candidate
    if hub_file.is_file():
        return hub_file
    raise FileNotFoundError(
        f"VGG-16 weights for the perceptual loss not found. Put torchvision's "
        f"{VGG16_WEIGHTS_FILE} at {hub_file}, or set {VGG16_WEIGHTS_ENV} (or pass the path). "
        f"For smoke tests only, PerceptualLoss(pretrained=False) skips the weights.")


class VGG16Features(nn.Module):
    """torchvision's ``vgg16.features[:30]`` rebuilt in plain torch (same module indices, so
    the checkpoint's ``features.*`` keys load as they are); returns relu1_2, relu2_2,
    relu3_3, relu4_3 and relu5_3 — the layers LPIPS compares."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []
        in_channels = 3
        for stage, (channels, convs) in enumerate(_VGG16_STAGES):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(convs):
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = channels
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a torchvision VGG-16 checkpoint: missing {missing}, "
                             f"unexpected {unexpected}")

    def forward(self, x: Tensor) -> list[Tensor]:
        taps, out = set(self.taps), []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in taps:
                out.append(x)
        return out


class PerceptualLoss(nn.Module):
    """Eq. 7: ``Σ_layers mean|Ψ(I_out) − Ψ(I_gt)| + mean|Ψ(I_gen) − Ψ(I_gt)|``.

    Ψ: VGG-16 (ImageNet normalisation) at relu1_2 … relu5_3. The network is frozen and
    always in eval mode. ``pretrained=False`` builds it with random weights — only for
    tests and smoke runs; it warns, since the loss is then meaningless.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        self.vgg = VGG16Features()
        if pretrained:
            self.vgg.load_checkpoint(resolve_vgg16_weights(weights_path))
        else:
            warnings.warn("PerceptualLoss(pretrained=False): VGG-16 has RANDOM weights; the "
                          "perceptual loss is meaningless (tests and smoke runs only)",
                          UserWarning, stacklevel=2)
        self.pretrained = pretrained
        self.vgg.requires_grad_(False)
        self.vgg.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vgg.eval()  # frozen feature extractor
        return self

    def _features(self, image: Tensor) -> list[Tensor]:
        return self.vgg((image - self.mean.to(image.dtype)) / self.std.to(image.dtype))

    def forward(self, output: Tensor, composite: Tensor, target: Tensor) -> Tensor:
        batch = output.shape[0]
        # One VGG pass over the three images (output, composite, target).
        features = self._features(torch.cat([output, composite, target.detach()], dim=0))
        loss = output.new_zeros(())
        for f in features:
            f_out, f_gen, f_gt = f.split(batch, dim=0)
            loss = loss + (f_out - f_gt).abs().mean() + (f_gen - f_gt).abs().mean()
        return loss


# ----------------------------------------------------------------------------- Eq. 5
class _LogOfProbabilities(torch.autograd.Function):
    """``ln E`` for probabilities ``E`` with the exact gradient ``1/E``.

    ``log(clamp(E, eps))`` has a zero gradient wherever ``E < eps``: exactly where a
    prediction is confidently wrong (the KL loss then freezes). Here only ``E`` below the
    smallest normal float (≈ 1.2e-38 in float32: an underflowed map entry) is clamped,
    in value and gradient, so ``1/E`` stays finite and ``E · (1/E)`` recovers the factor
    the softmax backward needs.
    """

    @staticmethod
    def forward(ctx, probabilities: Tensor) -> Tensor:
        tiny = torch.finfo(probabilities.dtype).tiny
        representable = probabilities >= tiny
        ctx.save_for_backward(probabilities, representable)
        return probabilities.clamp_min(tiny).log()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        probabilities, representable = ctx.saved_tensors
        return torch.where(representable, grad / probabilities.clamp_min(torch.finfo(grad.dtype).tiny),
                           torch.zeros_like(grad))


def log_of_probabilities(probabilities: Tensor) -> Tensor:
    """``ln E`` of a probability map, elementwise, with the exact gradient ``1/E`` (no
    ``eps`` that zeroes it); entries below the dtype's smallest normal number count as
    that number and get no gradient."""
    return _LogOfProbabilities.apply(probabilities)


def attention_kl_loss(predicted: Mapping[int, Mapping[str, Tensor]],
                      oracle: Mapping[int, Mapping[str, Tensor]], hole_mask: Tensor) -> Tensor:
    """Eq. 5 summed over layers: KL(E_gt‖E) + KL(E'_gt‖E'), each averaged over query×key pairs.

    ``predicted`` and ``oracle``: ``{layer: {"cross": (B,L,L), "self": (B,L,L)}}`` with the
    same layers (maps as returned by the generator; probabilities on valid pairs, 0
    elsewhere). Only valid pairs count: queries are hole pixels at the map's resolution,
    keys the background (cross) or the hole (self). A row without keys contributes 0.
    ``E_gt·ln E_gt`` uses xlogy (0·ln 0 = 0); ``ln E`` is ``log_of_probabilities``, whose
    gradient ``1/E`` is exact for every representable ``E`` (through the softmax this is
    the analytic ``(E − E_gt)/pairs`` per score at any logit gap where the float32 map
    has not underflowed, i.e. below ≈ 87), so a confidently wrong prediction keeps its
    gradient. Never NaN/inf. Computed in float32.
    """
    if set(predicted) != set(oracle) or not predicted:
        raise ValueError(f"predicted and oracle must hold the same non-empty set of layers; got "
                         f"{sorted(predicted)} and {sorted(oracle)}")
    total = None
    for layer in sorted(predicted):
        length = predicted[layer]["cross"].shape[-1]
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"layer {layer}: maps of length {length} are not square feature maps")
        foreground = reduce_hole_mask(hole_mask, (side, side))  # (B, L)
        queries = foreground.sum(1).float()
        keys = {"cross": length - queries, "self": queries}
        for branch in ("cross", "self"):
            p = oracle[layer][branch].float()
            q = predicted[layer][branch].float()
            if p.shape != q.shape:
                raise ValueError(f"layer {layer} {branch}: oracle {tuple(p.shape)} and predicted "
                                 f"{tuple(q.shape)} maps differ in shape")
            divergence = (torch.xlogy(p, p) - p * log_of_probabilities(q)).sum()
            pairs = (queries * keys[branch]).sum().clamp_min(1)
            term = divergence / pairs
            total = term if total is None else total + term
    return total


def streaming_oracle_kl_loss(predicted: Mapping[int, Mapping], oracle: Mapping[int, Mapping], *,
                             backend: str = "auto") -> Tensor:
    """Eq. 5 like ``attention_kl_loss``, streamed: no ``(B, L, L)`` map of either pass.

    ``predicted`` and ``oracle``: ``{layer: {"foreground": (B, L) bool, "scale": float,
    "cross": (q, k), "self": (q, k)}}`` with ``q, k (B, L, Dqk)`` — what
    ``Generator.forward_queries_keys`` and ``Generator.oracle_queries_keys`` return — for
    the same layers. Per layer and branch, ``dsa_ops.attention_kl`` gives KL(E_gt‖E) per
    query row (queries: the foreground; keys: the background (cross) or the foreground
    (self)); their sum is divided by the number of query×key pairs in the batch, as
    ``attention_kl_loss`` does, and the terms are summed. Float32; exact where the dense
    version clamps ln E at 1e-12. The oracle is the target: its q, k must not require
    grad (``dsa_ops.attention_kl`` raises otherwise). Memory O(B·L·Dqk) per layer.
    """
    if set(predicted) != set(oracle) or not predicted:
        raise ValueError(f"predicted and oracle must hold the same non-empty set of layers; got "
                         f"{sorted(predicted)} and {sorted(oracle)}")
    total = None
    for layer in sorted(predicted):
        foreground = predicted[layer]["foreground"]
        queries = foreground.sum(1, dtype=torch.float32)
        keys = {"cross": foreground.shape[1] - queries, "self": queries}
        for branch, key_mask in (("cross", ~foreground), ("self", foreground)):
            kl = attention_kl(*predicted[layer][branch], *oracle[layer][branch], foreground,
                              key_mask, scale=predicted[layer]["scale"], backend=backend)
            term = kl.float().sum() / (queries * keys[branch]).sum().clamp_min(1)
            total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------- Eq. 8–9
def critic_value(scores: Tensor) -> Tensor:
    """A PatchGAN critic's value per input: the mean of its score map ``(N,1,h,w)`` → ``(N,)``."""
    return scores.flatten(1).mean(dim=1)


def gradient_penalty(critic, crops: Tensor, scaler=None) -> Tensor:
    """``E[(‖∇_x D(x)‖₂ − 1)²]`` over the rows of ``crops`` ``(N, C, h, w)`` (WGAN-GP).

    ``critic`` maps crops to score maps. With a ``torch.amp.GradScaler``, the inner
    gradient is taken of the scaled output and unscaled again (PyTorch's AMP recipe),
    so float16 cannot underflow it.
    """
    crops = crops.detach().requires_grad_(True)
    # float32 before reducing: the scaled gradient then enters the float16 graph as
    # scale/(h'·w') per score, not as the bare scale (2^16 by default), which is inf in float16.
    value = critic_value(critic(crops).float()).sum()
    if scaler is not None:
        (grad,) = torch.autograd.grad(scaler.scale(value), crops, create_graph=True)
        grad = grad / scaler.get_scale()
    else:
        (grad,) = torch.autograd.grad(value, crops, create_graph=True)
    norm = grad.float().flatten(1).norm(dim=1)
    return ((norm - 1) ** 2).mean()


def interpolate_crops(real: dict[str, Tensor], fake: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """Random points between real and fake crops, one ε ~ U[0, 1] per image.

    Cropping is linear, so interpolating the crops equals cropping the interpolated
    image Î of Eq. 8; a sample's four subdivision quadrants share its ε.
    """
    any_crop = next(iter(real.values()))
    epsilon = torch.rand(batch, device=any_crop.device, dtype=any_crop.dtype)
    mixed = {}
    for name, r in real.items():
        e = epsilon.repeat_interleave(r.shape[0] // batch).view(-1, 1, 1, 1)
        mixed[name] = e * r + (1 - e) * fake[name]
    return mixed


def discriminator_loss(discriminator, real: Tensor, fake: Tensor, hole_mask: Tensor,
                       boxes: Tensor, gamma: float = 10.0, scaler=None) -> dict[str, Tensor]:
    """Eq. 8 for each of the seven critics of a ``MultiDiscriminator``, and their sum.

    ``fake`` is detached here. The gradient penalty differentiates each critic with
    respect to its own input crop: for exact crops (global, components) that is Eq. 8's
    ∇_Î literally; for the resized local crop and the quadrants it is the critic's own
    1-Lipschitz constraint, which is what WGAN-GP enforces (each quadrant is one critic
    input). Returns ``{"d_<name>": ..., "d_gp": Σ penalties (weighted), "d_wasserstein":
    Σ (E D(fake) − E D(real)), "d_total": ...}``.
    """
    batch = real.shape[0]
    real_crops = discriminator.crop(real.detach(), hole_mask, boxes)
    fake_crops = discriminator.crop(fake.detach(), hole_mask, boxes)
    mixed = interpolate_crops(real_crops, fake_crops, batch)
    terms: dict[str, Tensor] = {}
    wasserstein = penalty = None
    for name, critic in discriminator.critics.items():
        both = critic(torch.cat([real_crops[name], fake_crops[name]], dim=0))
        d_real, d_fake = critic_value(both).chunk(2)
        distance = d_fake.mean() - d_real.mean()
        gp = gradient_penalty(critic, mixed[name], scaler)
        terms[f"d_{name}"] = distance + gamma * gp
        wasserstein = distance if wasserstein is None else wasserstein + distance
        penalty = gp if penalty is None else penalty + gp
    terms["d_wasserstein"] = wasserstein
    terms["d_gp"] = gamma * penalty
    terms["d_total"] = wasserstein + gamma * penalty
    return terms


def generator_adversarial_loss(scores: Mapping[str, Tensor]) -> Tensor:
    """Eq. 9: ``−Σ_i E[D_i(C_i(I_out))]`` from the seven critics' score maps of the output."""
    return -sum(critic_value(s).mean() for s in scores.values())
