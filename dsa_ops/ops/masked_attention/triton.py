"""The "triton" backend of masked attention: launchers of ``triton_kernels``' kernels.

These functions know nothing of autograd or validation: ``op`` and ``dual`` register
``forward``/``backward`` (one attention) and ``dual_forward``/``dual_backward`` (the two
DSA branches) as ``torch.library.triton_op``s. Semantics are those of ``reference``; how
the kernels work is described in ``triton_kernels``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton

from dsa_ops.ops import triton_common as common
from dsa_ops.ops.masked_attention.triton_kernels import (
    _delta_kernel,
    _forward_kernel,
    _grad_kv_kernel,
    _grad_q_kernel,
)
from dsa_ops.ops.partition import triton as partition

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Lists:
    """The compacted lists a launch reads: the query partition, and the key partition
    (None for the dual op, whose key lists are rotations of the query partition)."""
    q_index: Tensor
    q_count: Tensor
    k_index: Optional[Tensor] = None
    k_count: Optional[Tensor] = None

    @property
    def dual(self) -> bool:
        return self.k_index is None

    def args(self) -> tuple:
        if self.dual:  # unused by the kernels; any tensors of the right kind
            return self.q_index, self.q_count, self.q_index, self.q_count
        return self.q_index, self.q_count, self.k_index, self.k_count


def single_lists(query_mask: Tensor, key_mask: Tensor) -> Lists:
    return Lists(*partition.partition_indices(query_mask), *partition.partition_indices(key_mask))


def dual_lists(foreground: Tensor) -> Lists:
    return Lists(*partition.partition_indices(foreground))


def _rows_unit_stride(t: Tensor) -> bool:
    """Whether ``t (B, L, D)`` has unit-stride rows and strided channels (a conv output)."""
    return t.stride(1) == 1 and t.shape[2] > 1 and t.stride(2) != 1


def _same_strides(*pairs: tuple[Tensor, Tensor]) -> bool:
    return all(a.stride() == b.stride() for a, b in pairs)



def _second(branches: Sequence[tuple]) -> tuple:
    """Branch 1's tensors, or Nones for single-branch launches."""
    return branches[1] if len(branches) == 2 else (None,) * len(branches[0])


def _launch_forward(branches: Sequence[tuple[Tensor, Tensor, Tensor]], lists: Lists,
                    scale: float, first_branch: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Forward of one or two branches ``(q, k, v)`` of equal shapes and strides in one
    launch; returns ``(out, lse)`` per branch. ``first_branch``: the dual branch (0 cross,
    1 self) of ``branches[0]``."""
    q, k, v = branches[0]
    batch, length, qk_dim = q.shape
    v_dim = v.shape[2]
    results = [(torch.empty((batch, length, v_dim), dtype=v.dtype, device=v.device),
                torch.empty((batch, length), dtype=torch.float32, device=q.device))
               for _ in branches]
    if batch == 0 or length == 0:
        return [(out.zero_(), lse.fill_(float("inf"))) for out, lse in results]
    precision = common.dot_precision(q.dtype)
    config = common.block_config("forward", common.capability(q.device), qk_dim, v_dim, q.dtype, precision)
    out, lse = results[0]
    grid = (common.tiles(batch, length, config.block_m), config.dv_chunks(int(v_dim)), len(branches))
    with common.device_guard(q):
        common.wrap_triton(_forward_kernel)[grid](
            q, k, v, out, lse, *_second(branches), *_second(results),
            *lists.args(),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
            length, qk_dim, v_dim, scale, first_branch,
            DUAL=lists.dual, TWO_BRANCHES=len(branches) == 2,
            ROWS_UNIT_STRIDE_Q=_rows_unit_stride(q), ROWS_UNIT_STRIDE_K=_rows_unit_stride(k),
            ROWS_UNIT_STRIDE_V=_rows_unit_stride(v),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_QK=config.block_qk,
            BLOCK_DV=config.block_dv, INPUT_PRECISION=precision,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return results


def _launch_backward(branches: Sequence[tuple[Tensor, ...]], lists: Lists, scale: float,
                     first_branch: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Backward of one or two branches ``(grad_out, q, k, v, out, lse)`` of equal shapes
    and strides in one launch per kernel; returns ``(grad_q, grad_k, grad_v)`` per branch."""
    grad_out, q, k, v, out, lse = branches[0]
    batch, length, qk_dim = q.shape
    v_dim = v.shape[2]
    grads = [(torch.empty_like(q, memory_format=torch.contiguous_format),
              torch.empty_like(k, memory_format=torch.contiguous_format),
              torch.empty_like(v, memory_format=torch.contiguous_format)) for _ in branches]
    if batch == 0 or length == 0:
        return grads
    precision = common.dot_precision(q.dtype)
    capability = common.capability(q.device)
    kv_config = common.block_config("grad_kv", capability, qk_dim, v_dim, q.dtype, precision)
    q_config = common.block_config("grad_q", capability, qk_dim, v_dim, q.dtype, precision)
    num_branches = len(branches)
    layout = dict(ROWS_UNIT_STRIDE_G=_rows_unit_stride(grad_out),
                  ROWS_UNIT_STRIDE_Q=_rows_unit_stride(q), ROWS_UNIT_STRIDE_K=_rows_unit_stride(k),
                  ROWS_UNIT_STRIDE_V=_rows_unit_stride(v))
    flags = dict(DUAL=lists.dual, TWO_BRANCHES=num_branches == 2, INPUT_PRECISION=precision)
    strides = (*grad_out.stride(), *q.stride(), *k.stride(), *v.stride())
    # delta in compacted order: slot s of sample b belongs to query row q_index[b, s].
    delta = torch.empty((num_branches, batch, length), dtype=torch.float32, device=q.device)
    grad_q, grad_k, grad_v = grads[0]
    inputs1 = _second(branches)
    grads1 = _second(grads)
    with common.device_guard(q):
        common.wrap_triton(_delta_kernel)[
            (common.tiles(batch, length, kv_config.block_m), num_branches)](
            grad_out, out, inputs1[0], inputs1[4], delta, lists.q_index, lists.q_count,
            *grad_out.stride(), *out.stride(), length, v_dim,
            TWO_BRANCHES=num_branches == 2, ROWS_UNIT_STRIDE_G=layout["ROWS_UNIT_STRIDE_G"],
            BLOCK_M=kv_config.block_m, BLOCK_DV=q_config.block_dv,
        )
        num_chunks = kv_config.dv_chunks(int(v_dim))
        common.wrap_triton(_grad_kv_kernel)[
            (common.tiles(batch, length, kv_config.block_n), num_chunks * num_branches)](
            grad_out, q, k, v, lse, grad_k, grad_v,
            *inputs1[:4], inputs1[5], *grads1[1:],
            delta, *lists.args(), *strides, *grad_k.stride(), *grad_v.stride(), lse.stride(0),
            length, qk_dim, v_dim, scale, num_chunks, first_branch,
            **flags, **layout, NUM_DV_CHUNKS=num_chunks,
            BLOCK_M=kv_config.block_m, BLOCK_N=kv_config.block_n, BLOCK_QK=kv_config.block_qk,
            BLOCK_DV=kv_config.block_dv, SCORES_AS_FORWARD=q.dtype == torch.float32,
            num_warps=kv_config.num_warps, num_stages=kv_config.num_stages,
        )
        common.wrap_triton(_grad_q_kernel)[
            (common.tiles(batch, length, q_config.block_m), num_branches)](
            grad_out, q, k, v, lse, grad_q,
            *inputs1[:4], inputs1[5], grads1[0],
            delta, *lists.args(), *strides, *grad_q.stride(), lse.stride(0),
            length, qk_dim, v_dim, scale, first_branch,
            **flags, **layout, NUM_DV_CHUNKS=q_config.dv_chunks(int(v_dim)),
            BLOCK_M=q_config.block_m, BLOCK_N=q_config.block_n, BLOCK_QK=q_config.block_qk,
            BLOCK_DV=q_config.block_dv,
            num_warps=q_config.num_warps, num_stages=q_config.num_stages,
        )
    return grads


def forward(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
            scale: float) -> tuple[Tensor, ...]:
    """Fused forward: ``(out (B, L, Dv) in v.dtype, lse (B, L) float32, natural log)`` and
    the masks' partitions ``(query_index, query_count, key_index, key_count)``, which the
    backward takes back.

    q, k ``(B, L, Dqk)``, v ``(B, L, Dv)`` with any strides; masks ``(B, L)`` bool.
    """
    lists = single_lists(query_mask, key_mask)
    return (*_launch_forward([(q, k, v)], lists, scale)[0], *lists.args())


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             query_mask: Tensor, key_mask: Tensor, query_index: Tensor, query_count: Tensor,
             key_index: Tensor, key_count: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fused, deterministic backward: ``(grad_q, grad_k, grad_v)`` shaped like q, k, v.

    ``out``, ``lse`` and the partitions are the forward's outputs; ``grad_out`` ``(B, L, Dv)``
    any strides. Gradients are exactly zero outside the query rows (dQ) and key rows (dK, dV).
    """
    lists = Lists(query_index, query_count, key_index, key_count)
    return _launch_backward([(grad_out, q, k, v, out, lse)], lists, scale)[0]


def dual_forward(q_cross: Tensor, k_cross: Tensor, v_cross: Tensor, q_self: Tensor,
                 k_self: Tensor, v_self: Tensor, foreground: Tensor,
                 scale: float) -> tuple[Tensor, ...]:
    """Both DSA branches from one partition of ``foreground (B, L)``:
    ``(out_cross, lse_cross, out_self, lse_self, foreground_index, foreground_count)``; one
    launch when the branches' tensors have equal strides (as ``DualSpatialAttention``
    produces them), else one per branch."""
    lists = dual_lists(foreground)
    cross, self_ = (q_cross, k_cross, v_cross), (q_self, k_self, v_self)
    if _same_strides(*zip(cross, self_)):
        results = _launch_forward([cross, self_], lists, scale)
    else:
        results = [_launch_forward([branch], lists, scale, first_branch)[0]
                   for first_branch, branch in enumerate((cross, self_))]
    return (*results[0], *results[1], lists.q_index, lists.q_count)


def dual_backward(grad_out_cross: Tensor, grad_out_self: Tensor, q_cross: Tensor,
                  k_cross: Tensor, v_cross: Tensor, q_self: Tensor, k_self: Tensor,
                  v_self: Tensor, out_cross: Tensor, lse_cross: Tensor, out_self: Tensor,
                  lse_self: Tensor, foreground: Tensor, foreground_index: Tensor,
                  foreground_count: Tensor, scale: float) -> tuple[Tensor, ...]:
    """Gradients of both branches: ``(dq, dk, dv)`` of cross, then of self, on the
    forward's partition of the foreground."""
    lists = Lists(foreground_index, foreground_count)
    cross = (grad_out_cross, q_cross, k_cross, v_cross, out_cross, lse_cross)
    self_ = (grad_out_self, q_self, k_self, v_self, out_self, lse_self)
    grads = _launch_backward([cross, self_], lists, scale) if _same_strides(*zip(cross, self_)) \
        else [_launch_backward([branch], lists, scale, first_branch)[0]
              for first_branch, branch in enumerate((cross, self_))]
    return (*grads[0], *grads[1])

