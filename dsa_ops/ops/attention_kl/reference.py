"""Attention KL in plain PyTorch: the definition of correct (the "reference" backend).

KL(E_oracle‖E) per query row (docs/design.md §2, "Streaming oracle KL"), from the scores of two
passes over the same query/key sets: s = scale·q·kᵀ (prediction), s° = scale·q°·k°ᵀ
(oracle), p = softmax(s), p° = softmax(s°) over the row's keys:
    KL_i = Σ_j p°_ij (s°_ij − s_ij) − lse°_i + lse_i,     ∂KL_i/∂s_ij = p_ij − p°_ij.
Log-probabilities enter only as s − lse, never as log(p), so the value stays exact when
p underflows (large logit gaps). The functions below work on one tile of query rows
against all keys; ``attention_kl_forward``/``attention_kl_backward`` loop over tiles,
so memory is O(B·tile·L), never O(B·L²). The "cpu" backend (``dsa_ops.ops.attention_kl.cpu``)
runs the same tile functions on compacted rows.
"""
from __future__ import annotations

import torch

from dsa_ops.ops.masked_attention.reference import (
    accumulation_dtype,
    compute_dtype,
    masked_scores,
    rows_in,
    softmax_and_lse,
)

Tensor = torch.Tensor

KL_QUERY_TILE = 128


def attention_kl_tile(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
                      query_mask: Tensor, key_mask: Tensor, scale: float,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse, lse_oracle)``, each ``(B, M)`` in ``dtype``, for a tile of M query rows.

    q, q_oracle ``(B, M, D)``, query_mask ``(B, M)``; k, k_oracle ``(B, N, D)``,
    key_mask ``(B, N)``. Rows without a query×key pair get kl 0 and lse +inf.
    """
    scores, pairs = masked_scores(q, k, query_mask, key_mask, scale, dtype)
    oracle_scores, _ = masked_scores(q_oracle, k_oracle, query_mask, key_mask, scale, dtype)
    lse = softmax_and_lse(scores, pairs)[1]
    oracle_probs, oracle_lse = softmax_and_lse(oracle_scores, pairs)
    # Outside pairs both scores are -inf: select before the probabilities multiply.
    cross = (oracle_probs * torch.where(pairs, oracle_scores - scores, 0)).sum(dim=-1)
    kl = torch.where(torch.isfinite(lse), cross - oracle_lse + lse, 0)
    return kl, lse, oracle_lse


def attention_kl_grad_scores(grad_kl: Tensor, q: Tensor, k: Tensor, q_oracle: Tensor,
                             k_oracle: Tensor, lse: Tensor, oracle_lse: Tensor,
                             query_mask: Tensor, key_mask: Tensor, scale: float,
                             dtype: torch.dtype) -> Tensor:
    """``scale·∂(Σ_i grad_kl_i·KL_i)/∂s = scale·grad_kl_i·(p_ij − p°_ij)`` ``(B, M, N)`` for a
    tile (shapes as ``attention_kl_tile``; grad_kl, lse, oracle_lse ``(B, M)``): dq = it·k,
    dk = itᵀ·q. Probabilities come from the saved lse's (0 where lse is +inf)."""
    scores, _ = masked_scores(q, k, query_mask, key_mask, scale, dtype)
    oracle_scores, _ = masked_scores(q_oracle, k_oracle, query_mask, key_mask, scale, dtype)
    probs = torch.exp(scores - lse.to(dtype).unsqueeze(-1))
    oracle_probs = torch.exp(oracle_scores - oracle_lse.to(dtype).unsqueeze(-1))
    return (probs - oracle_probs) * (grad_kl.to(dtype).unsqueeze(-1) * scale)


def query_tiles(length: int, tile: int):
    """Slices of at most ``tile`` consecutive rows covering ``0..length``."""
    return (slice(start, start + tile) for start in range(0, length, tile))


def attention_kl_forward(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
                         query_mask: Tensor, key_mask: Tensor, scale: float = 1.0, *,
                         upcast: bool = True, tile: int = KL_QUERY_TILE
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse, lse_oracle)``, each ``(B, L)`` in the accumulation dtype (the input dtype
    with ``upcast=False``): KL(E_oracle‖E) per row, 0 on rows that are no query or have no
    keys (lse +inf there). Inputs ``(B, L, D)`` any strides, masks ``(B, L)`` bool."""
    q, q_oracle = rows_in(q, query_mask), rows_in(q_oracle, query_mask)
    k, k_oracle = rows_in(k, key_mask), rows_in(k_oracle, key_mask)
    dtype = compute_dtype(q.dtype, upcast)
    batch, length, _ = q.shape
    kl, lse, oracle_lse = (q.new_empty((batch, length), dtype=dtype) for _ in range(3))
    for rows in query_tiles(length, tile):
        kl[:, rows], lse[:, rows], oracle_lse[:, rows] = attention_kl_tile(
            q[:, rows], k, q_oracle[:, rows], k_oracle, query_mask[:, rows], key_mask, scale,
            dtype)
    out_dtype = accumulation_dtype(q.dtype) if upcast else q.dtype
    return kl.to(out_dtype), lse.to(accumulation_dtype(q.dtype)), oracle_lse.to(accumulation_dtype(q.dtype))


def attention_kl_backward(grad_kl: Tensor, q: Tensor, k: Tensor, q_oracle: Tensor,
                          k_oracle: Tensor, lse: Tensor, oracle_lse: Tensor,
                          query_mask: Tensor, key_mask: Tensor, scale: float = 1.0, *,
                          upcast: bool = True, tile: int = KL_QUERY_TILE
                          ) -> tuple[Tensor, Tensor]:
    """``(grad_q, grad_k)`` shaped like q, k from ``grad_kl`` ``(B, L)`` and the forward's
    lse's; the oracle gets no gradient (it is the target)."""
    q, q_oracle = rows_in(q, query_mask), rows_in(q_oracle, query_mask)
    k, k_oracle = rows_in(k, key_mask), rows_in(k_oracle, key_mask)
    grad_kl = torch.where(query_mask, grad_kl, torch.zeros((), dtype=grad_kl.dtype))
    dtype = compute_dtype(q.dtype, upcast)
    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
    for rows in query_tiles(q.shape[1], tile):
        grad_scores = attention_kl_grad_scores(
            grad_kl[:, rows], q[:, rows], k, q_oracle[:, rows], k_oracle, lse[:, rows],
            oracle_lse[:, rows], query_mask[:, rows], key_mask, scale, dtype)
        grad_q[:, rows] = torch.matmul(grad_scores, k.to(dtype))
        grad_k += torch.matmul(grad_scores.transpose(1, 2), q[:, rows].to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype)
