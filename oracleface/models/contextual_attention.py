"""Contextual attention (Yu et al., CVPR 2018; DeepFill v1), the baseline of the Table 3 ablation.

Each hole pixel is rebuilt from background patches. With DeepFill v1's published settings
(``generative_inpainting``'s ``contextual_attention``: ksize 3, stride 1, rate 2, fuse_k 3,
softmax_scale 10, fuse True; this module's defaults), matching runs on the map
downsampled by ``rate`` and pasting uses full-resolution patches:

1. Downsample the features and the hole by ``rate`` (nearest neighbour: every rate-th
   pixel; the hole by max-pooling, like DSA). The background's ``p×p`` patches (p =
   ``patch_size`` = ksize = 3) of that map are the keys; a patch is usable only if it
   contains no hole pixel.
2. Matching is cosine similarity between the ``p×p`` patch around every query pixel and
   every background patch (both L2-normalised, ε = 1e-4 as in Yu et al.).
3. Attention propagation (fuse): the score of (query i, key j) is summed with the scores
   of the neighbouring pairs (i + d, j + d), |d| ≤ propagate_size // 2 (fuse_k), first
   along x then along y — Yu et al.'s identity-kernel convolution over the score map.
   Yu et al. run it on row-major flattened indices, which wraps around at row ends; here
   the shift is two-dimensional, so neighbours are true spatial neighbours (zero beyond
   the border).
4. ``softmax(softmax_scale · score)`` over the usable keys (none usable → all zeros).
5. Paste: a transposed convolution with raw full-resolution patches. With ``rate`` r > 1
   key j's patch is the ``2r×2r`` patch of the input around the pixel j stands for
   (stride r, as DeepFill's ``kernel = 2·rate``), so every output pixel sums 4 patches,
   averaged. With ``rate = 1`` matching runs on the input itself and the pasted patches
   are the matched ``p×p`` ones, averaged by ``p²`` (this module's behaviour before
   ``rate`` existed).

The module is parameter-free (the paper's network convolves around it). Hole pixels
take the pasted features; valid pixels keep their input features, so the module is a
drop-in replacement for DSA at the same place in the decoder. Memory is O(B·(L/rate²)²)
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

    Args (DeepFill v1's names in brackets; the defaults are its published settings):
        channels: C of the feature map (checked on input).
        patch_size: side of the matched patches (odd; ksize 3). Matching stride is 1.
        softmax_scale: multiplies the cosine similarities before the softmax (10).
        propagate_size: window of attention propagation (odd; fuse_k 3; 1 disables it,
            DeepFill's fuse=False).
        rate: matching runs on the map downsampled by ``rate`` and pastes ``2·rate``-wide
            full-resolution patches (rate 2). ``rate=1`` matches on the map itself and
            pastes the matched ``p×p`` patches. H and W must be multiples of ``rate``;
            ``rate`` is 1 or even (the raw patches are centred on the pixel a key stands for).

    Shapes: ``x (B, C, H, W)``, ``hole_mask (B, 1, h, w)`` with 1 = missing at any
    resolution (reduced like DSA, ``dsa_ops.reduce_hole_mask``) → ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, patch_size: int = 3, softmax_scale: float = 10.0,
                 propagate_size: int = 3, rate: int = 2):
        super().__init__()
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}")
        for name, value in (("patch_size", patch_size), ("propagate_size", propagate_size)):
            if value <= 0 or value % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer; got {value}")
        if rate <= 0 or (rate > 1 and rate % 2):
            raise ValueError(f"rate must be 1 or a positive even integer; got {rate}")
        self.channels = channels
        self.patch_size = patch_size
        self.softmax_scale = float(softmax_scale)
        self.propagate_size = propagate_size
        self.rate = rate

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, patch_size={self.patch_size}, "
                f"softmax_scale={self.softmax_scale}, propagate_size={self.propagate_size}, "
                f"rate={self.rate}")

    def forward(self, x: Tensor, hole_mask: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        if hole_mask.dim() != 4 or hole_mask.shape[0] != x.shape[0]:
            raise ValueError(f"hole_mask must have shape ({x.shape[0]}, 1, h, w); "
                             f"got {tuple(hole_mask.shape)}")
        batch, _, height, width = x.shape
        rate = self.rate
        if height % rate or width % rate:
            raise ValueError(f"x's height and width must be multiples of rate ({rate}); "
                             f"got {height}×{width}")
        hole_mask = hole_mask.to(x.device)
        hole = reduce_hole_mask(hole_mask, (height, width)).view(batch, 1, height, width)
        if rate == 1:
            attention, patches = self._attention(x, hole)
            kernel, stride = self.patch_size, 1  # paste the matched patches themselves
        else:
            small = (height // rate, width // rate)
            attention, _ = self._attention(x[:, :, ::rate, ::rate],
                                           reduce_hole_mask(hole_mask, small).view(batch, 1, *small))
            kernel, stride = 2 * rate, rate
            patches = F.unfold(x, kernel, padding=kernel // 2 - stride // 2, stride=stride).transpose(1, 2)
        # Paste: each query gets the attention-weighted sum of raw patches, then the
        # overlapping patches are folded back (the transposed convolution) and averaged.
        pasted = torch.bmm(attention, patches)  # (B, l, C·kernel²)
        pasted = F.fold(pasted.transpose(1, 2), (height, width), kernel,
                        padding=kernel // 2 - stride // 2, stride=stride)
        return torch.where(hole, pasted / (kernel // stride) ** 2, x)

    def _attention(self, x: Tensor, hole: Tensor) -> tuple[Tensor, Tensor]:
        """Attention ``(B, l, l)`` of every pixel of ``x (B, C, h, w)`` over the usable
        background patches (``hole (B, 1, h, w)`` bool), and the raw ``p×p`` patches
        ``(B, l, C·p²)``."""
        batch, _, height, width = x.shape
        length, p = height * width, self.patch_size
        # Background patches (B, l, C·p²); a key is usable if its patch has no hole pixel.
        patches = F.unfold(x, p, padding=p // 2).transpose(1, 2)
        usable = F.unfold(hole.to(x.dtype), p, padding=p // 2).sum(1) == 0  # (B, l)
        # Queries and keys are patches of the same map: normalise once.
        normed = patches / patches.norm(dim=2, keepdim=True).clamp_min(_NORM_EPS)
        # The matching convolution with per-sample kernels is one batched GEMM.
        scores = torch.bmm(normed, normed.transpose(1, 2))  # (B, l queries, l keys)
        scores = _propagate(scores.view(batch, height, width, height, width),
                            self.propagate_size, height, width).view(batch, length, length)

        scores = (self.softmax_scale * scores).masked_fill(~usable.unsqueeze(1), float("-inf"))
        has_keys = usable.any(dim=1).view(batch, 1, 1)
        # No usable key: softmax of all -inf would be NaN; those rows attend to nothing.
        attention = torch.softmax(scores.masked_fill(~has_keys, 0.0), dim=2)
        # Probabilities below the smallest normal float are flushed to zero, as TensorFlow's
        # CPU kernels (DeepFill's) do: the sharp softmax (scale 10 over summed similarities)
        # leaves many denormals, which make the paste GEMM ~20× slower on x86 CPUs.
        keep = usable.unsqueeze(1) & has_keys & (attention >= torch.finfo(attention.dtype).tiny)
        return attention * keep.to(attention.dtype), patches
