"""The "cpu" backend of ``dsa_ops.attention_kl``: compacted rows and chunked matmuls.

Each sample's query and key positions are compacted with ``partition_indices`` (its
query rows first, its key rows first), so the score tiles are ``(B, tile, K_max)`` with
``K_max`` the largest key count in the batch, instead of ``(B, tile, L)`` over every
position: no work on non-query rows, and at the paper's centre hole the cross branch
does 3/16 of the dense work. The per-tile math is ``reference``'s (one
definition); slots past a sample's count are masked out like non-keys there.

These functions know nothing of autograd or validation (``op`` registers them).
"""
from __future__ import annotations

import torch

from dsa_ops.ops.attention_kl import reference
from dsa_ops.ops.partition.reference import partition_indices

Tensor = torch.Tensor


def _compact(index: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """``(index (B, n) int64, valid (B, n) bool)``: the first ``n = max count`` entries of
    each sample's partition ``(index (B, L), count (B,))`` of a mask and which of them are
    true positions."""
    size = int(count.max()) if count.numel() else 0
    slots = torch.arange(size, device=index.device)
    return index[:, :size].long(), slots < count.unsqueeze(1)


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[2]))


def forward(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor, query_mask: Tensor,
            key_mask: Tensor, scale: float) -> tuple[Tensor, ...]:
    """``(kl, lse, lse_oracle)`` ``(B, L)`` like ``reference.attention_kl_forward``, and the
    masks' partitions ``(query_index, query_count, key_index, key_count)``."""
    dtype = reference.accumulation_dtype(q.dtype)
    batch, length, _ = q.shape
    kl = torch.zeros((batch, length), dtype=dtype, device=q.device)
    lse = torch.full((batch, length), float("inf"), dtype=dtype, device=q.device)
    oracle_lse = lse.clone()
    partitions = (*partition_indices(query_mask), *partition_indices(key_mask))
    q_index, q_valid = _compact(*partitions[:2])
    k_index, k_valid = _compact(*partitions[2:])
    if q_index.shape[1] == 0 or k_index.shape[1] == 0:
        return kl, lse, oracle_lse, *partitions
    keys, oracle_keys = _gather_rows(k, k_index), _gather_rows(k_oracle, k_index)
    # Padding slots read as rows without keys: kl 0 and lse +inf, what their positions
    # (non-queries) must hold, so the scatter may write them too.
    for rows in reference.query_tiles(q_index.shape[1], reference.KL_QUERY_TILE):
        index = q_index[:, rows]
        values = reference.attention_kl_tile(
            _gather_rows(q, index), keys, _gather_rows(q_oracle, index), oracle_keys,
            q_valid[:, rows], k_valid, scale, dtype)
        for out, value in zip((kl, lse, oracle_lse), values):
            out.scatter_(1, index, value)
    return kl, lse, oracle_lse, *partitions


def backward(grad_kl: Tensor, q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
             lse: Tensor, oracle_lse: Tensor, query_mask: Tensor, key_mask: Tensor,
             query_index: Tensor, query_count: Tensor, key_index: Tensor, key_count: Tensor,
             scale: float) -> tuple[Tensor, Tensor]:
    """``(grad_q, grad_k)`` like ``reference.attention_kl_backward``, on the forward's
    partitions."""
    dtype = reference.accumulation_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
    q_index, q_valid = _compact(query_index, query_count)
    k_index, k_valid = _compact(key_index, key_count)
    if q_index.shape[1] == 0 or k_index.shape[1] == 0:
        return grad_q.to(q.dtype), grad_k.to(k.dtype)
    keys, oracle_keys = _gather_rows(k, k_index), _gather_rows(k_oracle, k_index)
    compact_grad_k = torch.zeros(keys.shape, dtype=dtype, device=k.device)
    for rows in reference.query_tiles(q_index.shape[1], reference.KL_QUERY_TILE):
        index = q_index[:, rows]
        queries = _gather_rows(q, index)
        grad_scores = reference.attention_kl_grad_scores(
            grad_kl.gather(1, index), queries, keys, _gather_rows(q_oracle, index), oracle_keys,
            lse.gather(1, index), oracle_lse.gather(1, index), q_valid[:, rows], k_valid,
            scale, dtype)
        grad_q.scatter_(1, index.unsqueeze(-1).expand(-1, -1, q.shape[2]),
                        torch.matmul(grad_scores, keys.to(dtype)))
        compact_grad_k += torch.matmul(grad_scores.transpose(1, 2), queries.to(dtype))
    grad_k.scatter_(1, k_index.unsqueeze(-1).expand(-1, -1, k.shape[2]), compact_grad_k)
    return grad_q.to(q.dtype), grad_k.to(k.dtype)
