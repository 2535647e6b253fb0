"""The U-Net generator of Table 6 (256×256) and Table 8 (1024×1024), with DSA in the decoder.

The architecture is written down once, as a machine-readable layer table
(``generator_layer_table``); the module is built from that table, so tests can compare
the built network against the paper row by row.

Input convention: the caller passes the *unmasked* image ``x`` in [0, 1] and the hole
mask (1 = missing). The generator masks the image itself, ``x · (1 − mask)``, and feeds
``concat(masked image, mask)`` (4 channels) to layer 1, so hole pixels never leak into
the network whatever the caller put there. The oracle pass (Section 3.1, ``oracle_attention``)
feeds the *unmasked* ground truth with the same mask channel, so its attention is
partitioned by the same hole but computed from the true content.

Oracle supervision at any DSA layer (``oracle_layers``): ``forward_queries_keys`` and
``oracle_queries_keys`` give each supervised layer's foreground and per-branch (q, k) for
the prediction and the oracle pass, which ``dsa_ops.attention_kl`` (through
``oracleface.losses.streaming_oracle_kl_loss``) compares without L×L maps; the dense maps
(``return_attention``, ``oracle_attention``) stay for visualisation at small sizes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops import BACKENDS, DualSpatialAttention
from oracleface.models.contextual_attention import ContextualAttention

Tensor = torch.Tensor

RESOLUTIONS = (256, 1024)
ATTENTION_TYPES = ("dsa", "ca", "none")
LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class GeneratorLayerSpec:
    """One row of Table 6 / Table 8.

    ``kind`` is ``"down"`` (strided conv of the encoder) or ``"up"`` (nearest ×2 upsampling,
    concatenation with layer ``skip`` — 0 is the 4-channel input — then a stride-1 conv).
    ``attention`` marks the layers followed by the attention module (DSA in the paper).
    ``resolution`` is the side of the layer's output feature map.
    """

    index: int
    kind: str
    kernel: int
    stride: int
    out_channels: int
    batch_norm: bool
    activation: str  # "relu", "lrelu" or "sigmoid"
    skip: Optional[int]
    attention: bool
    resolution: int


def scaled_channels(channels: int, width: float) -> int:
    """``channels × width`` rounded, at least 8 (``width`` < 1: narrow models for smoke runs)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ValueError(f"width must be a number in (0, 1]; got {width!r}")
    return channels if width == 1 else max(8, round(channels * width))


def _encoder_channels(depth: int, width: float = 1.0) -> list[int]:
    # 64, 128, 256, then 512 down to the 1×1 bottleneck (Tables 6 and 8 differ only in depth).
    return [scaled_channels(c, width) for c in [64, 128, 256] + [512] * (depth - 3)]


def generator_layer_table(resolution: int = 256, width: float = 1.0) -> list[GeneratorLayerSpec]:
    """The paper's generator, one spec per layer: Table 6 (256) or Table 8 (1024).
    ``width`` < 1 scales every hidden layer's channels (not the paper; for smoke runs)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}; got {resolution!r}")
    depth = 8 if resolution == 256 else 10  # stride-2 layers down to 1×1
    encoder = _encoder_channels(depth, width)
    kernels = [7, 5] + [3] * (depth - 2)
    table = []
    for i in range(depth):
        table.append(GeneratorLayerSpec(
            index=i + 1, kind="down", kernel=kernels[i], stride=2, out_channels=encoder[i],
            batch_norm=i > 0, activation="relu", skip=None, attention=False,
            resolution=resolution >> (i + 1)))
    # The decoder mirrors the encoder: layer depth + j upsamples to the resolution of
    # layer depth − j and concatenates it; its width is that layer's width, except the last
    # layer, which outputs RGB. DSA follows decoder layers 4, 5, 6 (16², 32², 64² maps).
    for j in range(1, depth + 1):
        skip = depth - j
        last = j == depth
        table.append(GeneratorLayerSpec(
            index=depth + j, kind="up", kernel=3, stride=1,
            out_channels=3 if last else encoder[skip - 1], batch_norm=not last,
            activation="sigmoid" if last else "lrelu", skip=skip, attention=j in (4, 5, 6),
            resolution=resolution >> skip))
    return table


class ConvBlock(nn.Sequential):
    """``Conv → [BN] → activation`` built from one ``GeneratorLayerSpec``."""

    def __init__(self, spec: GeneratorLayerSpec, in_channels: int):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, spec.out_channels, spec.kernel,
                                             stride=spec.stride, padding=spec.kernel // 2,
                                             bias=not spec.batch_norm)]
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(spec.out_channels))
        layers.append({"relu": nn.ReLU(inplace=True),
                       "lrelu": nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                       "sigmoid": nn.Sigmoid()}[spec.activation])
        super().__init__(*layers)
        self.spec = spec


class NoAttention(nn.Module):
    """``attention="none"``: the identity where the attention module would be."""

    def forward(self, x: Tensor, hole_mask: Tensor) -> Tensor:
        return x


@contextlib.contextmanager
def batchnorm_statistics_frozen(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without touching any BatchNorm running statistics.

    Normalisation itself is unchanged: in training mode BN still normalises with the
    statistics of the current batch, in eval mode with the running ones. Only the
    running-average update is suppressed (momentum 0), and ``num_batches_tracked`` is
    restored on exit, so the module's state is exactly as before.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class Generator(nn.Module):
    """U-Net generator with attention after three decoder layers (Tables 6 and 8).

    Args:
        resolution: 256 (Table 6; DSA after layers 12, 13, 14 at 16², 32², 64²) or
            1024 (Table 8; DSA after layers 14, 15, 16 at the same map sizes).
        attention: ``"dsa"`` (the paper), ``"ca"`` (contextual attention, Table 3
            ablation) or ``"none"`` (identity).
        dsa_backend: forwarded to ``dsa_ops.DualSpatialAttention``.
        width: channel multiplier in (0, 1]; 1 is the paper (narrower: smoke runs, demos).
        oracle_layers: DSA layers with oracle supervision; default the first DSA layer
            (12 at 256², 14 at 1024²: the paper's), ``()`` none; always ``()`` without DSA.

    ``forward(x (B,3,R,R) in [0,1], hole_mask (B,1,R,R) 1 = missing)`` → ``(B,3,R,R)`` in
    [0, 1]; ``R = resolution``. In training mode the batch must hold at least two samples:
    BatchNorm at the 1×1 bottleneck has one value per channel and sample.
    """

    def __init__(self, resolution: int = 256, attention: str = "dsa", dsa_backend: str = "auto",
                 width: float = 1.0, oracle_layers=None):
        super().__init__()
        if attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}; got {attention!r}")
        if dsa_backend != "auto" and dsa_backend not in BACKENDS:
            raise ValueError(f"dsa_backend must be 'auto' or one of {BACKENDS}; got {dsa_backend!r}")
        self.resolution = resolution
        self.attention_type = attention
        self.width = width
        self.table = generator_layer_table(resolution, width)
        self.depth = len(self.table) // 2
        self.attention_layers = tuple(s.index for s in self.table if s.attention)
        self.last_layer = self.table[-1].index

        widths = {0: 4}  # layer 0 is the input: masked RGB + mask
        self.layers = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        for spec in self.table:
            in_channels = widths[spec.index - 1]
            if spec.kind == "up":
                in_channels += widths[spec.skip]
            self.layers[str(spec.index)] = ConvBlock(spec, in_channels)
            widths[spec.index] = spec.out_channels
            if spec.attention:
                self.attention[str(spec.index)] = self._attention_module(
                    attention, spec.out_channels, dsa_backend)
        self.oracle_layers = self._resolve_oracle_layers(oracle_layers)

    def _resolve_oracle_layers(self, layers) -> tuple:
        if layers is None:
            return self.attention_layers[:1] if self.attention_type == "dsa" else ()
        layers = tuple(layers)
        if layers and self.attention_type != "dsa":
            raise ValueError(f"oracle layers need attention='dsa'; got attention="
                             f"{self.attention_type!r} and layers {layers}")
        if any(layer not in self.attention_layers for layer in layers):
            raise ValueError(f"oracle layers must be DSA layers {self.attention_layers}; got {layers}")
        return tuple(sorted(set(layers)))

    @staticmethod
    def _attention_module(kind: str, channels: int, backend: str) -> nn.Module:
        if kind == "dsa":
            return DualSpatialAttention(channels, backend=backend)
        if kind == "ca":
            return ContextualAttention(channels)
        return NoAttention()

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, attention={self.attention_type!r}, width={self.width}"

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x: Tensor, hole_mask: Tensor) -> None:
        size = (self.resolution, self.resolution)
        if not isinstance(x, torch.Tensor) or not isinstance(hole_mask, torch.Tensor):
            raise TypeError("x and hole_mask must be torch.Tensors")
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != size:
            raise ValueError(f"x must have shape (B, 3, {size[0]}, {size[1]}); got {tuple(x.shape)}")
        if hole_mask.shape != (x.shape[0], 1, *size):
            raise ValueError(f"hole_mask must have shape ({x.shape[0]}, 1, {size[0]}, {size[1]}) "
                             f"like x; got {tuple(hole_mask.shape)}")
        if self.training and x.shape[0] < 2:
            raise ValueError("in training mode the batch needs at least 2 samples (BatchNorm at "
                             "the 1×1 bottleneck); call .eval() for single-sample inference")

    # ------------------------------------------------------------------ forward
    def run_until(self, x: Tensor, hole_mask: Tensor, until_layer: int, attention_layers=(),
                  mask_input: bool = True):
        """Layers 1..``until_layer`` only: ``(feature map after that layer (and its attention
        module), {layer: maps} for attention_layers)``.

        ``mask_input=False`` feeds ``concat(x, mask)`` without zeroing the hole: the oracle
        pass, where the network sees the ground truth but partitions the attention with
        the same mask.
        """
        self._check_inputs(x, hole_mask)
        if not 1 <= until_layer <= self.last_layer:
            raise ValueError(f"until_layer must be in 1..{self.last_layer}; got {until_layer!r}")
        map_layers = self._check_map_layers(attention_layers) if attention_layers else ()
        if map_layers and max(map_layers) > until_layer:
            raise ValueError(f"attention_layers {map_layers} go beyond until_layer={until_layer}")
        return self._run(x, hole_mask, until_layer, map_layers, mask_input=mask_input)[:2]

    def _run(self, x: Tensor, hole_mask: Tensor, until_layer: int, map_layers=(), qk_layers=(),
             mask_input: bool = True, attend_last: bool = True):
        """Layers 1..until_layer: ``(features, {layer: maps}, {layer: queries/keys})`` (see
        ``forward_queries_keys``). ``attend_last=False``: the last layer is a DSA layer of
        which only q, k are needed, so its attention does not run (the oracle pass)."""
        hole_mask = hole_mask.to(x.dtype)
        image = x * (1 - hole_mask) if mask_input else x
        features = {0: torch.cat([image, hole_mask], dim=1)}
        maps: dict[int, dict[str, Tensor]] = {}
        queries_keys: dict[int, dict] = {}
        h = features[0]
        for spec in self.table[:until_layer]:
            if spec.kind == "up":
                h = torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"),
                               features[spec.skip]], dim=1)
            h = self.layers[str(spec.index)](h)
            if spec.attention:
                module = self.attention[str(spec.index)]
                if spec.index in qk_layers:
                    foreground, branches = module.queries_keys(h, hole_mask)
                    queries_keys[spec.index] = {"foreground": foreground, "scale": module.scale,
                                                **branches}
                if spec.index == until_layer and not attend_last:
                    break
                # Dense maps are O(L²): only build those that are asked for.
                if spec.index in map_layers:
                    h, maps[spec.index] = module(h, hole_mask, return_attention=True)
                else:
                    h = module(h, hole_mask)
            # Encoder outputs are kept for the skip connections; decoder outputs are not needed.
            if spec.kind == "down":
                features[spec.index] = h
        return h, maps, queries_keys

    def forward(self, x: Tensor, hole_mask: Tensor, return_attention: bool = False,
                attention_layers=None):
        """``(B,3,R,R)``; with ``return_attention`` also ``{layer: {"cross": E, "self": E'}}``
        (each ``(B, L, L)`` float32, ``L`` = pixels of that layer's map; DSA only) for
        ``attention_layers`` (default: every DSA layer; the maps are O(L²), so ask only
        for the supervised ones in training)."""
        map_layers = ()
        if return_attention:
            map_layers = self.attention_layers if attention_layers is None else attention_layers
            if not map_layers:
                raise ValueError("attention_layers must name at least one DSA layer")
        out, maps = self.run_until(x, hole_mask, self.last_layer, map_layers)
        return (out, maps) if return_attention else out

    def _check_map_layers(self, layers) -> tuple:
        if self.attention_type != "dsa":
            raise ValueError(f"attention maps need attention='dsa'; this generator uses "
                             f"{self.attention_type!r}")
        layers = tuple(layers)
        unknown = [layer for layer in layers if layer not in self.attention_layers]
        if not layers or unknown:
            raise ValueError(f"attention layers must be a non-empty subset of the DSA layers "
                             f"{self.attention_layers}; got {layers}")
        return layers

    def forward_attention(self, x: Tensor, hole_mask: Tensor, until_layer: int,
                          attention_layers=None, mask_input: bool = True) -> dict:
        """Maps ``{layer: {"cross", "self"}}`` of ``attention_layers`` (default: every DSA
        layer ≤ ``until_layer``), running only layers 1..until_layer.

        The oracle pass (Section 3.1) needs the maps of the supervised layers only, so the
        decoder stops there instead of running to the output.
        """
        if until_layer not in self.attention_layers:
            raise ValueError(f"until_layer must be one of the DSA layers {self.attention_layers}; "
                             f"got {until_layer!r}")
        if attention_layers is None:
            attention_layers = [layer for layer in self.attention_layers if layer <= until_layer]
        if not attention_layers:
            raise ValueError("attention_layers must name at least one DSA layer")
        return self.run_until(x, hole_mask, until_layer, attention_layers, mask_input)[1]

    def oracle_attention(self, ground_truth: Tensor, hole_mask: Tensor, layers, *,
                         detach: bool = True) -> dict:
        """Oracle maps ``{layer: {"cross": E_gt, "self": E'_gt}}`` for ``layers`` (Eq. 5).

        The ground truth runs through this same network with the same mask, up to the
        last supervised layer only. BatchNorm: the pass normalises exactly like the
        prediction pass it is compared with (batch statistics in training mode, running
        statistics in eval mode), so E_gt and E come from the same function; it never
        updates the running statistics, because at inference the network only ever sees
        masked images and the oracle's unmasked statistics would skew them. With
        ``detach`` (the default) the pass runs without autograd: the maps are targets.
        """
        layers = self._check_map_layers(layers)
        with self._oracle_pass(detach):
            return self.forward_attention(ground_truth, hole_mask, max(layers), layers,
                                          mask_input=False)

    @contextlib.contextmanager
    def _oracle_pass(self, detach: bool) -> Iterator[None]:
        grad = contextlib.nullcontext() if not detach else torch.no_grad()
        with grad, batchnorm_statistics_frozen(self):
            yield

    # ------------------------------------------------------------------ streaming oracle loss
    def forward_queries_keys(self, x: Tensor, hole_mask: Tensor, layers=None):
        """The output ``(B,3,R,R)`` and what the streaming oracle loss needs of the
        prediction at ``layers`` (default ``oracle_layers``)::

            {layer: {"foreground": (B, L) bool, "scale": float,
                     "cross": (q, k), "self": (q, k)}}      # q, k: (B, L, Dqk)

        O(B·L·Dqk) per layer: no attention map is built.
        """
        layers = self._check_map_layers(self.oracle_layers if layers is None else layers)
        self._check_inputs(x, hole_mask)
        output, _, queries_keys = self._run(x, hole_mask, self.last_layer, qk_layers=layers)
        return output, queries_keys

    def oracle_queries_keys(self, ground_truth: Tensor, hole_mask: Tensor, layers=None, *,
                            detach: bool = True) -> dict:
        """The oracle side of ``forward_queries_keys`` (same structure, default layers
        ``oracle_layers``): the unmasked ground truth, BatchNorm and ``detach`` as in
        ``oracle_attention``. The pass stops after the projection of the last supervised
        layer: neither its attention nor any later layer runs."""
        layers = self._check_map_layers(self.oracle_layers if layers is None else layers)
        self._check_inputs(ground_truth, hole_mask)
        with self._oracle_pass(detach):
            return self._run(ground_truth, hole_mask, max(layers), qk_layers=layers,
                             mask_input=False, attend_last=False)[2]
