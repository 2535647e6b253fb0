"""``partition_indices`` in plain PyTorch: the compaction every fused backend starts from.

The reference and cpu backends use it on every device; ``csrc/partition/partition.cu`` is its CUDA
kernel and ``dsa_ops.ops.partition.triton`` the triton backend's.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def partition_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of each row's positions: ``(index (B, L) int32, count (B,) int32)``.

    ``index[b, :count[b]]`` lists the positions where ``mask[b]`` is true in increasing
    order, ``index[b, count[b]:]`` the others, also increasing. One partition of the hole
    mask thus yields both the foreground and the background lists.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32), mask.sum(dim=1, dtype=torch.int32)
