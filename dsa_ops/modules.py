"""``DualSpatialAttention``: the paper's DSA module (Section 3.1, Fig. 3) as a drop-in layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops.ops import BACKENDS, dual_masked_attention

Tensor = torch.Tensor


def reduce_hole_mask(hole_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Foreground (hole) mask at feature resolution: ``(B, 1, h, w)`` → ``(B, H·W)`` bool.

    A mask at a higher resolution is reduced by adaptive max-pooling: a feature pixel is
    foreground if any image pixel it covers is missing (non-divisible sizes use PyTorch's
    adaptive windows, which overlap rather than drop pixels). A mask at a lower
    resolution is upsampled with nearest neighbours. Values > 0.5 count as missing.
    """
    if hole_mask.dim() != 4 or hole_mask.shape[1] != 1:
        raise ValueError(f"hole_mask must have shape (B, 1, h, w); got {tuple(hole_mask.shape)}")
    mask = hole_mask.float()
    if mask.shape[-2:] != size:
        if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1]:
            mask = F.adaptive_max_pool2d(mask, size)
        else:
            mask = F.interpolate(mask, size=size, mode="nearest")
    return (mask > 0.5).flatten(1)


class DualSpatialAttention(nn.Module):
    """Cross (foreground → background) and self (foreground → foreground) attention.

    ``Y = α·Pad(cross) + X``, ``Y' = β·Pad(self) + X``, output ``fuse(Y + Y')`` with
    α = β = 0 at initialisation (the module starts as ``fuse(2·X)``).

    Args:
        channels: C of the feature map; V has C channels.
        qk_dim: channels of Q and K (default ``max(C // 8, 8)``).
        fuse_kernel_size: kernel size of the fusion convolution (the paper does not say; 1).
        scale: multiplies ``q·k`` before the softmax (the paper uses 1).
        backend: forwarded to ``dsa_ops.masked_attention``.

    Shapes: ``x (B, C, H, W)``, ``hole_mask (B, 1, h, w)`` with 1 = missing at any
    resolution (see ``reduce_hole_mask``) → ``(B, C, H, W)``; with ``return_attention``
    also ``{"cross": (B, L, L), "self": (B, L, L)}`` with ``L = H·W``.
    """

    def __init__(self, channels: int, qk_dim: int | None = None, fuse_kernel_size: int = 1,
                 scale: float = 1.0, backend: str = "auto"):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}")
        if fuse_kernel_size <= 0 or fuse_kernel_size % 2 == 0:
            raise ValueError(f"fuse_kernel_size must be a positive odd integer; got {fuse_kernel_size}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}; got {backend!r}")
        self.channels = channels
        self.qk_dim = qk_dim if qk_dim is not None else max(channels // 8, 8)
        self.scale = scale
        self.backend = backend
        # One 1×1 convolution (one GEMM) projects Q, K, V of both branches:
        # [q_cross, k_cross, v_cross, q_self, k_self, v_self].
        self.projection = nn.Conv2d(channels, 2 * (2 * self.qk_dim + channels), kernel_size=1)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))
        self.fuse = nn.Conv2d(channels, channels, fuse_kernel_size, padding=fuse_kernel_size // 2)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, qk_dim={self.qk_dim}, scale={self.scale}, "
                f"backend={self.backend!r}")

    def _project(self, x: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """``((q, k, v) cross, (q, k, v) self)`` from ``x (B, C, H, W)``: q, k ``(B, L, Dqk)``,
        v ``(B, L, C)``, with unit-stride channels.

        The 1×1 convolution runs as one batched GEMM ``Xᵀ·Wᵀ`` that writes ``(B, L, 2·(2·Dqk
        + C))`` directly (channels last), so the attention kernels gather whole rows with
        vector loads; the conv layout would make every row a strided gather. No copy.
        """
        batch = x.shape[0]
        weight = self.projection.weight.flatten(1)  # (outputs, C)
        pixels = x.flatten(2).transpose(1, 2)  # (B, L, C), a view
        features = torch.baddbmm(self.projection.bias, pixels, weight.t().expand(batch, -1, -1))
        q_cross, k_cross, v_cross, q_self, k_self, v_self = features.split(
            [self.qk_dim, self.qk_dim, self.channels] * 2, dim=2)
        return (q_cross, k_cross, v_cross), (q_self, k_self, v_self)

    def forward(self, x: Tensor, hole_mask: Tensor, return_attention: bool = False):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        if hole_mask.shape[0] != x.shape[0]:
            raise ValueError(f"hole_mask must have batch size {x.shape[0]} like x; "
                             f"got {tuple(hole_mask.shape)}")
        batch, channels, height, width = x.shape
        foreground = reduce_hole_mask(hole_mask.to(x.device), (height, width))
        cross, self_ = self._project(x)
        # Both branches in one call: on "cuda" and "triton" one fused launch per kernel.
        branches = dual_masked_attention(*cross, *self_, foreground, scale=self.scale,
                                         return_attention=return_attention, backend=self.backend)
        cross, self_ = branches[:2]
        attended = self.alpha * cross + self.beta * self_
        attended = attended.transpose(1, 2).reshape(batch, channels, height, width)
        y = self.fuse(2 * x + attended)
        if return_attention:
            return y, branches[2]
        return y

    def queries_keys(self, x: Tensor, hole_mask: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """What the attention compares, without attending: the foreground ``(B, L)`` bool
        and each branch's ``(q, k)`` ``(B, L, Dqk)`` (views of ``forward``'s projection, unit-stride
        channels). The cross branch's queries/keys are foreground/background,
        the self branch's foreground/foreground; scores are ``self.scale·q·kᵀ``. With those,
        ``dsa_ops.attention_kl`` compares two passes' attention without any L×L map.
        """
        foreground = reduce_hole_mask(hole_mask.to(x.device), tuple(x.shape[-2:]))
        (q_cross, k_cross, _), (q_self, k_self, _) = self._project(x)
        return foreground, {"cross": (q_cross, k_cross), "self": (q_self, k_self)}
