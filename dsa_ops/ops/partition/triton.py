"""The "triton" backend's ``partition_indices``: one launch, one program per sample."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_ops.ops.triton_common import device_guard, wrap_triton

Tensor = torch.Tensor


@triton.jit
def _partition_kernel(mask, index, count, length, stride_mb, stride_ml, BLOCK: tl.constexpr):
    """The stable partition of one sample's mask row (``reference.partition_indices``):
    a first sweep counts the true positions, a second writes every position to its slot,
    ranks within a block from an exclusive prefix sum. One program per sample."""
    sample = tl.program_id(0).to(tl.int64)
    row = mask + sample * stride_mb
    offsets = tl.arange(0, BLOCK)
    trues = tl.zeros((), dtype=tl.int32)
    for start in range(0, length, BLOCK):
        positions = start + offsets
        flags = tl.load(row + positions * stride_ml, mask=positions < length, other=0) != 0
        trues += tl.sum(flags.to(tl.int32), axis=0)
    trues_before = tl.zeros((), dtype=tl.int32)
    for start in range(0, length, BLOCK):
        positions = start + offsets
        inside = positions < length
        flags = (tl.load(row + positions * stride_ml, mask=inside, other=0) != 0).to(tl.int32)
        true_slots = trues_before + tl.cumsum(flags, axis=0) - flags
        # The false positions before this one: all positions before it minus the true ones.
        false_slots = trues + positions - true_slots
        slots = tl.where(flags != 0, true_slots, false_slots)
        tl.store(index + sample * length + slots, positions.to(tl.int32), mask=inside)
        trues_before += tl.sum(flags, axis=0)
    tl.store(count + sample, trues)


# ----------------------------------------------------------------------------- launchers
_PARTITION_BLOCK = 1024


def partition_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(index (B, L) int32, count (B,) int32)`` of ``mask (B, L)`` bool, as
    ``reference.partition_indices``, in one launch: the Triton backend's compaction."""
    batch, length = mask.shape
    index = torch.empty((batch, length), dtype=torch.int32, device=mask.device)
    count = torch.empty((batch,), dtype=torch.int32, device=mask.device)
    if batch == 0:
        return index, count
    if length == 0:
        return index, count.zero_()
    flags = mask.view(torch.uint8)  # same bytes; Triton loads bytes, not i1
    with device_guard(mask):
        wrap_triton(_partition_kernel)[(batch,)](
            flags, index, count, length, *flags.stride(), BLOCK=_PARTITION_BLOCK)
    return index, count

