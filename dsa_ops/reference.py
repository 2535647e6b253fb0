"""The masked-attention op in plain PyTorch: the definition of correct.

Every fused backend is tested against these functions. They are batched and
vectorised (no loop over samples) and materialise the dense ``(B, L, L)`` score
matrix, so memory is O(B·L²): fine for tests and small maps, not for 256² maps.

Shapes (DESIGN §2)::

    q, k        (B, L, Dqk)      any strides
    v           (B, L, Dv)
    query_mask  (B, L) bool      rows that attend
    key_mask    (B, L) bool      columns that are attended to
    out         (B, L, Dv)       zero on rows outside query_mask
    lse         (B, L)           log-sum-exp of the scaled scores of each query row over
                                 its keys; +inf where the row has no keys or is no
                                 query, so that exp(score - lse) is 0 there

Softmax statistics are kept in float32 for float16/bfloat16 inputs (float64 for
float64 inputs) unless ``upcast=False``, which runs every step in the input dtype:
the low-precision baseline of FlashAttention-style tolerances.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics and the saved log-sum-exp are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return accumulation_dtype(dtype) if upcast else dtype


def _masked_scores(q: Tensor, k: Tensor, query_mask: Tensor, key_mask: Tensor,
                   scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scaled scores ``(B, L, L)`` with -inf outside query×key pairs, and the pair mask."""
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(1, 2)) * scale
    pairs = query_mask.unsqueeze(2) & key_mask.unsqueeze(1)
    return scores.masked_fill(~pairs, float("-inf")), pairs


def _softmax_and_lse(scores: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Row softmax over valid pairs and its log-sum-exp, safe for rows with no pairs.

    Rows without any pair get probabilities 0 and lse +inf. The shift is detached
    (softmax does not depend on it) and empty rows divide by 1, so neither values
    nor gradients can turn into NaN.
    """
    row_has_keys = pairs.any(dim=-1, keepdim=True)
    shift = scores.amax(dim=-1, keepdim=True).masked_fill(~row_has_keys, 0).detach()
    weights = torch.exp(scores - shift)
    denominator = weights.sum(dim=-1, keepdim=True).masked_fill(~row_has_keys, 1)
    probs = weights / denominator
    lse = (shift + denominator.log()).masked_fill(~row_has_keys, float("inf"))
    return probs, lse.squeeze(-1)


def attention_probs(q: Tensor, k: Tensor, query_mask: Tensor, key_mask: Tensor,
                    scale: float = 1.0, *, upcast: bool = True) -> Tensor:
    """Dense attention map ``(B, L, L)``: softmax probabilities on query×key pairs, 0 elsewhere.

    Differentiable with respect to q and k through ordinary autograd (the oracle KL
    loss needs that). Returned in the accumulation dtype (float32 for half inputs).
    """
    scores, pairs = _masked_scores(q, k, query_mask, key_mask, scale,
                                   _compute_dtype(q.dtype, upcast))
    return _softmax_and_lse(scores, pairs)[0]


def forward(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
            scale: float = 1.0, *, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, L, Dv) in v.dtype, lse (B, L) in the accumulation dtype)``."""
    dtype = _compute_dtype(q.dtype, upcast)
    scores, pairs = _masked_scores(q, k, query_mask, key_mask, scale, dtype)
    probs, lse = _softmax_and_lse(scores, pairs)
    out = torch.matmul(probs, v.to(dtype))
    return out.to(v.dtype), lse.to(accumulation_dtype(q.dtype))


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             query_mask: Tensor, key_mask: Tensor, scale: float = 1.0, *,
             upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` from the probabilities recomputed with the saved lse.

    With P = softmax(S), dP = dO·Vᵀ and Δᵢ = Σ_d dOᵢ_d·Oᵢ_d (= Σⱼ Pᵢⱼ dPᵢⱼ):
    dS = P ⊙ (dP − Δ), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
    Rows outside the query set have P = 0, so whatever grad_out holds there is ignored.
    """
    dtype = _compute_dtype(q.dtype, upcast)
    scores, _ = _masked_scores(q, k, query_mask, key_mask, scale, dtype)
    probs = torch.exp(scores - lse.to(dtype).unsqueeze(-1))
    grad_out = grad_out.to(dtype)
    grad_v = torch.matmul(probs.transpose(1, 2), grad_out)
    grad_probs = torch.matmul(grad_out, v.to(dtype).transpose(1, 2))
    delta = (grad_out * out.to(dtype)).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = torch.matmul(grad_scores, k.to(dtype))
    grad_k = torch.matmul(grad_scores.transpose(1, 2), q.to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def partition_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of each row's positions: ``(index (B, L) int32, count (B,) int32)``.

    ``index[b, :count[b]]`` lists the positions where ``mask[b]`` is true in increasing
    order, ``index[b, count[b]:]`` the others, also increasing. One partition of the hole
    mask thus yields both the foreground and the background lists. This is the
    compaction every fused backend starts from; ``csrc/partition.cu`` is its CUDA kernel.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32), mask.sum(dim=1, dtype=torch.int32)


# ============================================================================= attention KL
# KL(E_oracle‖E) per query row (DESIGN §2, "Streaming oracle KL"), from the scores of two
# passes over the same query/key sets: s = scale·q·kᵀ (prediction), s° = scale·q°·k°ᵀ
# (oracle), p = softmax(s), p° = softmax(s°) over the row's keys:
#     KL_i = Σ_j p°_ij (s°_ij − s_ij) − lse°_i + lse_i,     ∂KL_i/∂s_ij = p_ij − p°_ij.
# Log-probabilities enter only as s − lse, never as log(p), so the value stays exact when
# p underflows (large logit gaps). The functions below work on one tile of query rows
# against all keys; ``attention_kl_forward``/``attention_kl_backward`` loop over tiles,
# so memory is O(B·tile·L), never O(B·L²). The "cpu" backend (``dsa_ops.attention_kl_cpu``)
# runs the same tile functions on compacted rows.
KL_QUERY_TILE = 128


def attention_kl_tile(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
                      query_mask: Tensor, key_mask: Tensor, scale: float,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse, lse_oracle)``, each ``(B, M)`` in ``dtype``, for a tile of M query rows.

    q, q_oracle ``(B, M, D)``, query_mask ``(B, M)``; k, k_oracle ``(B, N, D)``,
    key_mask ``(B, N)``. Rows without a query×key pair get kl 0 and lse +inf.
    """
    scores, pairs = _masked_scores(q, k, query_mask, key_mask, scale, dtype)
    oracle_scores, _ = _masked_scores(q_oracle, k_oracle, query_mask, key_mask, scale, dtype)
    lse = _softmax_and_lse(scores, pairs)[1]
    oracle_probs, oracle_lse = _softmax_and_lse(oracle_scores, pairs)
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
    scores, _ = _masked_scores(q, k, query_mask, key_mask, scale, dtype)
    oracle_scores, _ = _masked_scores(q_oracle, k_oracle, query_mask, key_mask, scale, dtype)
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
    dtype = _compute_dtype(q.dtype, upcast)
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
    dtype = _compute_dtype(q.dtype, upcast)
    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
    for rows in query_tiles(q.shape[1], tile):
        grad_scores = attention_kl_grad_scores(
            grad_kl[:, rows], q[:, rows], k, q_oracle[:, rows], k_oracle, lse[:, rows],
            oracle_lse[:, rows], query_mask[:, rows], key_mask, scale, dtype)
        grad_q[:, rows] = torch.matmul(grad_scores, k.to(dtype))
        grad_k += torch.matmul(grad_scores.transpose(1, 2), q[:, rows].to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype)
