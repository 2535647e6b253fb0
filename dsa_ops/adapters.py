"""``DualSpatialAttention`` behind the call signatures of other people's inpainting models.

Each class takes its peer's constructor arguments and call, so swapping it in is one line in
the peer's ``__init__`` plus the ``channels`` the learned projections need; the peer's
patch-matching settings (``ksize``, ``stride``, ``rate``, ``fuse_k``, ``softmax_scale``,
``fuse`` of the matching) are accepted so its line keeps working, and kept as attributes, but
DSA matches learned projections at full feature resolution and does not use them.

- ``DeepFillV1ContextualAttention``: DeepFill v1's ``ContextualAttention(f, b, mask)`` →
  ``(y, flow)`` (the PyTorch port daa233/generative-inpainting-pytorch)::

      self.contextul_attention = DeepFillV1ContextualAttention(cnum*4, ksize=3, stride=1, rate=2,
          fuse_k=3, softmax_scale=10, fuse=True, use_cuda=self.use_cuda, device_ids=self.device_ids)

- ``DeepFillV2ContextualAttention``: DeepFill v2's (nipponjo/deepfillv2-pytorch), same call,
  ``(y, None)`` unless ``return_flow``::

      self.contextual_attention = DeepFillV2ContextualAttention(2*cnum, ksize=3, stride=1, rate=2,
          fuse_k=3, softmax_scale=10, fuse=True, device_ids=None, return_flow=return_flow, n_down=2)

- ``PENNetAtnConv``: PEN-Net's ``AtnConv(x1, x2, mask)`` (researchmm/PEN-Net-for-Inpainting)::

      self.at_conv04 = PENNetAtnConv(cnum*8, cnum*8)          # x2 = x5 has 2·cnum*8 channels
      self.at_conv05 = PENNetAtnConv(cnum*16, cnum*16, ksize=1, fuse=False, guide_channels=cnum*16)

Mask conventions follow the peers: ``mask (B or 1, 1, h, w)`` at image resolution, 1 = missing,
any non-zero value counts as missing (both peers test ``mean == 0`` for an available patch),
``None`` = nothing missing. Unlike DeepFill v1, which reads only ``mask[0]``, every sample
uses its own mask (a batch-1 mask is shared, as there).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops.modules import DualSpatialAttention, reduce_hole_mask

Tensor = torch.Tensor

# Both peers call a patch unavailable when its mask mean is non-zero: any non-zero value.
PEER_MASK_THRESHOLD = 0.0

# The Middlebury optical-flow colour wheel (Baker et al., 2007) that DeepFill's flow_to_image
# uses: hue segments red→yellow→green→cyan→blue→magenta→red with these many steps each.
_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def _colour_wheel() -> Tensor:
    """``(55, 3)`` RGB in 0..255: within each segment one channel is 255, one ramps
    ``floor(255·i/n)`` up or down, the third is 0."""
    # (steady channel, ramping channel, ramps up) per segment: RY, YG, GC, CB, BM, MR.
    plan = ((0, 1, True), (1, 0, False), (1, 2, True), (2, 1, False), (2, 0, True), (0, 2, False))
    rows = []
    for steps, (steady, ramping, up) in zip(_WHEEL_SEGMENTS, plan):
        ramp = torch.floor(255 * torch.arange(steps, dtype=torch.float64) / steps)
        segment = torch.zeros(steps, 3, dtype=torch.float64)
        segment[:, steady] = 255
        segment[:, ramping] = ramp if up else 255 - ramp
        rows.append(segment)
    return torch.cat(rows)


def flow_to_image(offsets: Tensor) -> Tensor:
    """DeepFill's flow visualisation: ``offsets (B, 2, H, W)`` (row, column) → ``(B, 3, H, W)``
    float32 RGB in [0, 1], quantised to 1/255 like the peer's uint8 image.

    Hue gives the direction, saturation the length relative to the sample's longest offset
    (zero offset is white). DeepFill normalises sample i by the longest offset among samples
    0..i; here each sample by its own, so the colours do not depend on the batch order.
    """
    if offsets.dim() != 4 or offsets.shape[1] != 2:
        raise ValueError(f"offsets must have shape (B, 2, H, W); got {tuple(offsets.shape)}")
    rows, cols = offsets.double().unbind(1)  # DeepFill's u (first channel) and v
    radius = torch.sqrt(rows ** 2 + cols ** 2)
    longest = radius.flatten(1).amax(dim=1).view(-1, 1, 1) + torch.finfo(torch.float64).eps
    rows, cols, radius = rows / longest, cols / longest, radius / longest
    wheel = _colour_wheel().to(offsets.device)
    entries = wheel.shape[0]
    position = (torch.atan2(-cols, -rows) / math.pi + 1) / 2 * (entries - 1)
    lower = torch.floor(position).long()
    upper = torch.where(lower + 1 == entries, 0, lower + 1)
    fraction = (position - lower).unsqueeze(-1)
    colour = ((1 - fraction) * wheel[lower] + fraction * wheel[upper]) / 255  # (B, H, W, 3)
    # Every normalised radius is <= 1: desaturate towards white as the offset shrinks.
    colour = 1 - radius.unsqueeze(-1) * (1 - colour)
    return (torch.floor(255 * colour) / 255).permute(0, 3, 1, 2).float().contiguous()


def attend_with_offsets(attention: DualSpatialAttention, x: Tensor, hole_mask: Optional[Tensor],
                        guide: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``attention(x, hole_mask, guide=guide)`` and where each hole pixel attends: the cross
    branch's attention-weighted mean key position minus the pixel's own position,
    ``(B, 2, H, W)`` float32 (row, column) in feature pixels, detached; 0 outside the hole and
    in samples without background.

    The coordinates (and a column of ones, whose mean is 1 exactly where a row attends) ride
    along as three extra values of the cross branch: the same attention pass, no L×L map.
    """
    batch, _, height, width = x.shape
    grid = torch.stack(torch.meshgrid(torch.arange(height, device=x.device),
                                      torch.arange(width, device=x.device), indexing="ij"))
    positions = grid.flatten(1).t().float()  # (L, 2)
    extra_values = torch.cat([positions, torch.ones_like(positions[:, :1])], dim=1)
    y, _, extra = attention.attend(x, hole_mask, guide,
                                   cross_extra_values=extra_values.expand(batch, -1, -1))
    extra = extra.detach().float()
    attends = extra[..., 2:] > 0.5
    offsets = (extra[..., :2] - positions) * attends
    return y, offsets.transpose(1, 2).reshape(batch, 2, height, width)


@torch.no_grad()
def attended_offsets(attention: DualSpatialAttention, x: Tensor, hole_mask: Optional[Tensor],
                     guide: Optional[Tensor] = None) -> Tensor:
    """Only the offsets of ``attend_with_offsets`` ``(B, 2, H, W)``, without gradient."""
    return attend_with_offsets(attention, x, hole_mask, guide)[1]


def _require_feature_maps(owner: nn.Module, **tensors) -> None:
    """One-line error unless every named argument is a ``(B, C, H, W)`` tensor."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{type(owner).__name__}: {name} must have shape (B, C, H, W); got {got}")


def _shared_batch_mask(mask: Optional[Tensor], batch: int) -> Optional[Tensor]:
    """A ``(1, 1, h, w)`` mask serves the whole batch, as in the peers' training code."""
    if mask is not None and mask.dim() == 4 and mask.shape[0] == 1 and batch > 1:
        return mask.expand(batch, -1, -1, -1)
    return mask


class _DeepFillContextualAttention(nn.Module):
    """DeepFill's ``ContextualAttention`` call ``(f, b, mask=None) → (y, flow)`` backed by DSA.

    ``f`` (what is matched) gives the hole pixels' queries and ``b`` (what is matched against)
    the keys and the values: ``f`` and ``b`` are the same tensor in every DeepFill generator,
    and then the module runs as is; if they differ (same shape required) the queries and
    keys come from ``b`` with ``f`` pasted into the hole (a ``guide``), the values from ``b``.
    ``y``: ``(B, C, H, W)``; ``flow``: ``flow_to_image`` of ``attended_offsets``, float32 on
    ``f``'s device, at the peer's size (``_flow_size``); it rides along in the cross branch's
    attention pass (``attend_with_offsets``).

    Args:
        channels: C of ``f`` and ``b`` (the DSA projections need it; the peer has no weights).
        **dsa_options: forwarded to ``DualSpatialAttention`` (``qk_dim``, ``backend``,
            ``fuse_kernel_size``, ``scale``, ``mask_threshold``; default threshold 0, the peers'
            rule).
    """

    def __init__(self, channels: int, ksize: int, stride: int, rate: int, fuse_k: int,
                 softmax_scale: float, fuse: bool, device_ids, **dsa_options):
        super().__init__()
        self.ksize, self.stride, self.rate, self.fuse_k = ksize, stride, rate, fuse_k
        self.softmax_scale, self.fuse, self.device_ids = softmax_scale, fuse, device_ids
        dsa_options.setdefault("mask_threshold", PEER_MASK_THRESHOLD)
        self.attention = DualSpatialAttention(channels, **dsa_options)

    def _flow_size(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def _guide(self, f: Tensor, b: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        if f is b:
            return None
        if f.shape != b.shape:
            raise ValueError(f"{type(self).__name__}: f must have the shape of b {tuple(b.shape)} "
                             f"(DSA attends between positions of one map); got {tuple(f.shape)}")
        if mask is None:
            return b
        hole = self.attention._foreground(b, mask).view(b.shape[0], 1, *b.shape[2:])
        return torch.where(hole, f, b)

    def forward(self, f: Tensor, b: Tensor, mask: Optional[Tensor] = None, *, with_flow: bool = True):
        _require_feature_maps(self, f=f, b=b)
        mask = _shared_batch_mask(mask, b.shape[0])
        guide = self._guide(f, b, mask)
        if not with_flow:
            return self.attention(b, mask, guide=guide), None
        y, offsets = attend_with_offsets(self.attention, b, mask, guide)
        flow = flow_to_image(offsets)
        size = self._flow_size(*b.shape[2:])
        if tuple(flow.shape[2:]) != size:
            flow = F.interpolate(flow, size=size, mode="nearest")
        return y, flow


class DeepFillV1ContextualAttention(_DeepFillContextualAttention):
    """DeepFill v1's ``ContextualAttention`` (daa233/generative-inpainting-pytorch) backed by
    DSA; see ``_DeepFillContextualAttention``. ``mask`` is at image resolution (4× the
    features). ``flow``: ``(B, 3, 4·(H // rate)·rate, …)`` like the port's (``(B, 3, H, W)``
    for ``rate == 1``, which it does not upsample). ``use_cuda`` is accepted and unused: the
    flow is on ``f``'s device.
    """

    def __init__(self, channels: int, ksize: int = 3, stride: int = 1, rate: int = 1,
                 fuse_k: int = 3, softmax_scale: float = 10, fuse: bool = False,
                 use_cuda: bool = False, device_ids=None, **dsa_options):
        super().__init__(channels, ksize, stride, rate, fuse_k, softmax_scale, fuse, device_ids,
                         **dsa_options)
        self.use_cuda = use_cuda

    def _flow_size(self, height: int, width: int) -> tuple[int, int]:
        if self.rate == 1:
            return height, width
        return tuple(size // self.rate * self.rate * 4 for size in (height, width))


class DeepFillV2ContextualAttention(_DeepFillContextualAttention):
    """DeepFill v2's ``ContextualAttention`` (nipponjo/deepfillv2-pytorch) backed by DSA; see
    ``_DeepFillContextualAttention``. ``mask`` is at image resolution (2**n_down × the
    features; any resolution works). Returns ``(y, None)`` unless ``return_flow``; the flow is
    ``(B, 3, (H // rate)·rate, …)`` like the port's.
    """

    def __init__(self, channels: int, ksize: int = 3, stride: int = 1, rate: int = 1,
                 fuse_k: int = 3, softmax_scale: float = 10., n_down: int = 2, fuse: bool = False,
                 return_flow: bool = False, device_ids=None, **dsa_options):
        super().__init__(channels, ksize, stride, rate, fuse_k, softmax_scale, fuse, device_ids,
                         **dsa_options)
        self.n_down, self.return_flow = n_down, return_flow

    def _flow_size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(size // self.rate * self.rate for size in (height, width))

    def forward(self, f: Tensor, b: Tensor, mask: Optional[Tensor] = None):
        return super().forward(f, b, mask, with_flow=self.return_flow)


class PENNetAtnConv(nn.Module):
    """PEN-Net's ``AtnConv(x1, x2, mask=None)`` backed by DSA: cross-scale matching.

    The higher-level ``x2 (B, G, h, w)`` (the next, coarser encoder level) gives queries and
    keys, upsampled to ``x1``'s size with nearest neighbours (each fine pixel matches as its
    coarse parent, as PEN-Net pastes ``rate``×``rate`` patches of ``x1`` per ``x2`` score);
    the low-level ``x1 (B, input_channels, H, W)`` gives the values. The hole is decided at
    ``x2``'s resolution like PEN-Net's: a coarse pixel is missing if any image pixel it covers
    is non-zero. With ``fuse`` the result passes PEN-Net's ``groups`` dilated 3×3
    convolutions (dilations ``rates``, each to ``output_channels // groups`` channels, ReLU),
    concatenated: ``(B, output_channels, H, W)``; else ``(B, input_channels, H, W)``.

    Args:
        input_channels, output_channels, groups, fuse, rates: as PEN-Net's.
        ksize, stride, rate, softmax_scale: PEN-Net's matching settings; accepted, unused.
        guide_channels: G of ``x2``; default ``2 · input_channels`` (PEN-Net's pyramid, where
            channels double per level up to the deepest two levels, which have equal channels:
            pass ``guide_channels`` for ``at_conv05``).
        **dsa_options: forwarded to ``DualSpatialAttention``.
    """

    def __init__(self, input_channels: int = 128, output_channels: int = 64, groups: int = 4,
                 ksize: int = 3, stride: int = 1, rate: int = 2, softmax_scale: float = 10.,
                 fuse: bool = True, rates: Sequence[int] = (1, 2, 4, 8),
                 guide_channels: Optional[int] = None, **dsa_options):
        super().__init__()
        if fuse and (len(rates) < groups or output_channels % groups):
            raise ValueError(f"PENNetAtnConv: fuse needs at least groups={groups} rates (got "
                             f"{len(rates)}) and output_channels divisible by groups (got "
                             f"{output_channels})")
        self.ksize, self.stride, self.rate, self.softmax_scale = ksize, stride, rate, softmax_scale
        self.groups, self.fuse = groups, fuse
        guide_channels = 2 * input_channels if guide_channels is None else guide_channels
        self.attention = DualSpatialAttention(input_channels, guide_channels=guide_channels,
                                              **dsa_options)
        self.fusion = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_channels, output_channels // groups, kernel_size=3,
                                    dilation=dilation, padding=dilation), nn.ReLU(inplace=True))
            for dilation in rates[:groups]) if fuse else None

    def forward(self, x1: Tensor, x2: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        _require_feature_maps(self, x1=x1, x2=x2)
        expected = self.attention.guide_channels
        if x2.shape[1] != expected:
            raise ValueError(f"PENNetAtnConv: x2 has {x2.shape[1]} channels but the module expects "
                             f"{expected}: pass guide_channels={x2.shape[1]} to the constructor")
        guide = F.interpolate(x2, size=tuple(x1.shape[2:]), mode="nearest")
        mask = _shared_batch_mask(mask, x1.shape[0])
        hole = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"PENNetAtnConv: mask must have shape (B, 1, h, w) or be None; got {got}")
            coarse = reduce_hole_mask(mask.to(x2.device), tuple(x2.shape[2:]), PEER_MASK_THRESHOLD)
            hole = coarse.view(mask.shape[0], 1, *x2.shape[2:]).to(x1.dtype)
        y = self.attention(x1, hole, guide=guide)
        if self.fusion is None:
            return y
        return torch.cat([branch(y) for branch in self.fusion], dim=1)
