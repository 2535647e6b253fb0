"""Facial-component boxes: the contract between the data pipeline and the model.

A batch carries ``boxes``: an int64 tensor ``(B, 4, 4)`` of ``(x0, y0, x1, y1)`` pixel
boxes (x1, y1 exclusive), one row per component in ``COMPONENTS`` order. Boxes have a
fixed size per component (the component discriminators see crops of one size), are
centred on the landmark groups and clamped inside the image.
"""
from __future__ import annotations

import torch

COMPONENTS = ("left_eye", "right_eye", "nose", "mouth")

# (width, height) at 256×256; scaled linearly with the image side. The paper does not
# give sizes: these cover the component with a margin on aligned CelebA-HQ/FFHQ faces
# and stay multiples of 16 so the PatchGAN discriminators see whole patches.
DEFAULT_BOX_SIZES_256 = {
    "left_eye": (48, 48),
    "right_eye": (48, 48),
    "nose": (48, 48),
    "mouth": (64, 48),
}


def box_sizes(image_size: int, sizes_256: dict | None = None) -> dict[str, tuple[int, int]]:
    """Box (width, height) per component for a square image of side ``image_size``."""
    sizes_256 = sizes_256 or DEFAULT_BOX_SIZES_256
    return {name: (max(1, round(w * image_size / 256)), max(1, round(h * image_size / 256)))
            for name, (w, h) in sizes_256.items()}


def component_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Indicator masks ``(B, 4, H, W)`` float32: 1 inside each component's box, 0 outside."""
    if boxes.dim() != 3 or boxes.shape[1:] != (len(COMPONENTS), 4):
        raise ValueError(f"boxes must have shape (B, {len(COMPONENTS)}, 4); got {tuple(boxes.shape)}")
    ys = torch.arange(height, device=boxes.device).view(1, 1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, 1, width)
    x0, y0, x1, y1 = (boxes[..., i].view(*boxes.shape[:2], 1, 1) for i in range(4))
    return ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)).float()


def mirror_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """The boxes ``(..., 4, 4)`` of the horizontally flipped image of width ``width``: x is
    mirrored, and the eyes swap rows (the flipped image's left eye is the original's right)."""
    if boxes.shape[-2:] != (len(COMPONENTS), 4):
        raise ValueError(f"boxes must have shape (..., {len(COMPONENTS)}, 4); got {tuple(boxes.shape)}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    mirrored = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    order = [COMPONENTS.index(name) for name in _MIRRORED_COMPONENTS]
    return mirrored[..., order, :]


# Which original component each component of the flipped image is.
_MIRRORED_COMPONENTS = {"left_eye": "right_eye", "right_eye": "left_eye", "nose": "nose", "mouth": "mouth"}
_MIRRORED_COMPONENTS = tuple(_MIRRORED_COMPONENTS[name] for name in COMPONENTS)
