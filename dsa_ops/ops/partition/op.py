"""The ``dsa_ops::partition_indices`` op: one dispatcher op, no autograd.

Every device gets the PyTorch implementation (``reference``); the CUDA kernel from
``csrc/`` (``TORCH_LIBRARY_IMPL``) wins on CUDA tensors. Backends do not call this op:
each uses its own partition (reference/cpu: ``reference.partition_indices``, triton:
``triton.partition_indices``, cuda: the kernel inside its bindings).
"""
from __future__ import annotations

import torch

from dsa_ops.ops import registry
from dsa_ops.ops.partition import reference

Tensor = torch.Tensor

SCHEMA = "(Tensor mask) -> (Tensor index, Tensor count)"


def fake_partition(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes of a partition of ``mask (B, L)``: ``(index (B, L), count (B,))`` int32."""
    return (mask.new_empty(mask.shape, dtype=torch.int32),
            mask.new_empty(mask.shape[:1], dtype=torch.int32))


registry.register_op_family(
    "partition_indices", forward_schema=SCHEMA, fake_forward=fake_partition,
    implementations={"reference": registry.Implementation(
        reference.partition_indices, dispatch_key="CompositeExplicitAutograd")},
    names=lambda family, backend: (family, None))


def partition_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of ``mask`` ``(B, L)`` bool: ``(index (B, L) int32, count (B,) int32)``,
    true positions first (see ``reference.partition_indices``)."""
    return torch.ops.dsa_ops.partition_indices(mask)
