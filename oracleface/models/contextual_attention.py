"""Contextual attention (Yu et al., CVPR 2018), the baseline of the Table 3 ablation.

Each hole pixel is rebuilt from background patches:

1. The background's ``p×p`` patches (p = 3) become convolution kernels; a patch is a
   usable key only if it contains no hole pixel.
2. Matching is cosine similarity between the ``p×p`` patch around every query pixel and
   every background patch (both L2-normalised, ε = 1e-4 as in Yu et al.).
3. Attention propagation: the score of (query i, key j) is summed with the scores of
   the neighbouring pairs (i + d, j + d), |d| ≤ propagate_size // 2, first along x
   then along y — Yu et al.'s identity-kernel convolution over the score map. Yu et al.
   run it on row-major flattened indices, which wraps around at row ends; here the
   shift is two-dimensional, so neighbours are true spatial neighbours (zero beyond the
   border).
4. ``softmax(softmax_scale · score)`` over the usable keys (none usable → all zeros).
5. Deconvolution with the raw background patches pastes them back (overlaps averaged
   by ``p²``).

The module is parameter-free (the paper's network convolves around it). Hole pixels
take the pasted features; valid pixels keep their input features, so the module is a
drop-in replacement for DSA at the same place in the decoder. Memory is O(B·L²)
(the score map), like the original.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsa_ops import reduce_hole_mask

Tensor = torch.Tensor

_NORM_EPS = 1e-4


def _propagate(scores: Tensor, size: int, height: int, width: int) -> Tensor:
    """Sum scores ``(B, H, W, H, W)`` over pairs shifted together along x, then along y."""
    if size <= 1:
        return scores
    radius = size // 2
    for query_dim, key_dim, extent in ((2, 4, width), (1, 3, height)):
        # Zero-pad query and key axes, then add the (d, d) diagonal shifts.
        pad = [0] * (2 * scores.dim())
        for dim in (query_dim, key_dim):
            pad[2 * (scores.dim() - 1 - dim)] = radius
            pad[2 * (scores.dim() - 1 - dim) + 1] = radius
        padded = F.pad(scores, pad)
        total = torch.zeros_like(scores)
        for d in range(size):
            total = total + padded.narrow(query_dim, d, extent).narrow(key_dim, d, extent)
        scores = total
    return scores


class ContextualAttention(nn.Module):
    """Contextual attention of Yu et al. 2018 (see the module docstring).

    Args:
        channels: C of the feature map (checked on input).
        patch_size: side of the matched and pasted patches (odd; 3 in Yu et al.).
        softmax_scale: multiplies the cosine similarities before the softmax (10).
        propagate_size: window of attention propagation (odd; 1 disables it).

    Shapes: ``x (B, C, H, W)``, ``hole_mask (B, 1, h, w)`` with 1 = missing at any
    resolution (reduced like DSA, ``dsa_ops.reduce_hole_mask``) → ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, patch_size: int = 3, softmax_scale: float = 10.0,
                 propagate_size: int = 3):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}")
        for name, value in (("patch_size", patch_size), ("propagate_size", propagate_size)):
            if value <= 0 or value % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer; got {value}")
        self.channels = channels
        self.patch_size = patch_size
        self.softmax_scale = float(softmax_scale)
        self.propagate_size = propagate_size

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, patch_size={self.patch_size}, "
                f"softmax_scale={self.softmax_scale}, propagate_size={self.propagate_size}")

    def forward(self, x: Tensor, hole_mask: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        if hole_mask.dim() != 4 or hole_mask.shape[0] != x.shape[0]:
            raise ValueError(f"hole_mask must have shape ({x.shape[0]}, 1, h, w); "
                             f"got {tuple(hole_mask.shape)}")
        batch, channels, height, width = x.shape
        length, p = height * width, self.patch_size
        hole = reduce_hole_mask(hole_mask.to(x.device), (height, width))  # (B, L) bool
        hole_map = hole.view(batch, 1, height, width).to(x.dtype)

        # Background patches (B, L, C·p²); a key is usable if its patch has no hole pixel.
        patches = F.unfold(x, p, padding=p // 2).transpose(1, 2)
        usable = F.unfold(hole_map, p, padding=p // 2).sum(1) == 0  # (B, L)
        # Queries and keys are patches of the same map: normalise once.
        normed = patches / patches.norm(dim=2, keepdim=True).clamp_min(_NORM_EPS)
        # The matching convolution with per-sample kernels is one batched GEMM.
        scores = torch.bmm(normed, normed.transpose(1, 2))  # (B, L queries, L keys)
        scores = _propagate(scores.view(batch, height, width, height, width),
                            self.propagate_size, height, width).view(batch, length, length)

        scores = (self.softmax_scale * scores).masked_fill(~usable.unsqueeze(1), float("-inf"))
        has_keys = usable.any(dim=1).view(batch, 1, 1)
        # No usable key: softmax of all -inf would be NaN; those rows attend to nothing.
        attention = torch.softmax(scores.masked_fill(~has_keys, 0.0), dim=2)
        attention = attention * (usable.unsqueeze(1) & has_keys).to(attention.dtype)

        # Paste: each query gets the attention-weighted sum of raw patches, then the
        # overlapping p×p patches are folded back (the transposed convolution) and averaged.
        pasted = torch.bmm(attention, patches)  # (B, L, C·p²)
        pasted = F.fold(pasted.transpose(1, 2), (height, width), p, padding=p // 2) / (p * p)
        return torch.where(hole_map.bool(), pasted, x)
