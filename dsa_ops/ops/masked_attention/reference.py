"""Masked attention in plain PyTorch: the definition of correct (the "reference" backend).

Every fused backend is tested against these functions. They are batched and
vectorised (no loop over samples) and materialise the dense ``(B, L, L)`` score
matrix, so memory is O(B·L²): fine for tests and small maps, not for 256² maps.

Shapes (docs/design.md §2)::

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


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return accumulation_dtype(dtype) if upcast else dtype


def rows_in(t: Tensor, mask: Tensor) -> Tensor:
    """``t (B, L, D)`` with its rows outside ``mask (B, L)`` set to 0, so that what they
    hold (even NaN or inf) reaches no product: 0·NaN would be NaN (non-finite rule)."""
    return torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def masked_scores(q: Tensor, k: Tensor, query_mask: Tensor, key_mask: Tensor,
                   scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scaled scores ``(B, L, L)`` with -inf outside query×key pairs, and the pair mask."""
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(1, 2)) * scale
    pairs = query_mask.unsqueeze(2) & key_mask.unsqueeze(1)
    return scores.masked_fill(~pairs, float("-inf")), pairs


def softmax_and_lse(scores: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Row softmax over valid pairs and its log-sum-exp, safe for rows with no pairs.

    Rows without any pair get probabilities 0 and lse +inf. The shift is detached
    (softmax does not depend on it) and empty rows divide by 1, so neither values
    nor gradients can turn into NaN (a NaN score of a pair makes its row NaN).
    """
    if scores.shape[-1] == 0:  # L = 0: no row has keys (and amax refuses empty rows)
        return scores.clone(), scores.new_full(scores.shape[:-1], float("inf"))
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
    q, k = rows_in(q, query_mask), rows_in(k, key_mask)
    scores, pairs = masked_scores(q, k, query_mask, key_mask, scale,
                                   compute_dtype(q.dtype, upcast))
    return softmax_and_lse(scores, pairs)[0]


def forward(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
            scale: float = 1.0, *, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, L, Dv) in v.dtype, lse (B, L) in the accumulation dtype)``."""
    q, k, v = rows_in(q, query_mask), rows_in(k, key_mask), rows_in(v, key_mask)
    dtype = compute_dtype(q.dtype, upcast)
    scores, pairs = masked_scores(q, k, query_mask, key_mask, scale, dtype)
    probs, lse = softmax_and_lse(scores, pairs)
    # Rows without keys (non-queries included) are 0 even where a key's v is NaN (0·NaN).
    out = rows_in(torch.matmul(probs, v.to(dtype)), pairs.any(dim=-1))
    return out.to(v.dtype), lse.to(accumulation_dtype(q.dtype))


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             query_mask: Tensor, key_mask: Tensor, scale: float = 1.0, *,
             upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` from the probabilities recomputed with the saved lse.

    With P = softmax(S), dP = dO·Vᵀ and Δᵢ = Σ_d dOᵢ_d·Oᵢ_d (= Σⱼ Pᵢⱼ dPᵢⱼ):
    dS = P ⊙ (dP − Δ), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
    Rows outside the query set have P = 0, and what grad_out (or q, k, v, out) holds in
    rows outside the query and key sets is ignored, NaN included.
    """
    q, k, v = rows_in(q, query_mask), rows_in(k, key_mask), rows_in(v, key_mask)
    grad_out, out = rows_in(grad_out, query_mask), rows_in(out, query_mask)
    dtype = compute_dtype(q.dtype, upcast)
    scores, _ = masked_scores(q, k, query_mask, key_mask, scale, dtype)
    probs = torch.exp(scores - lse.to(dtype).unsqueeze(-1))
    grad_out = grad_out.to(dtype)
    grad_v = torch.matmul(probs.transpose(1, 2), grad_out)
    grad_probs = torch.matmul(grad_out, v.to(dtype).transpose(1, 2))
    delta = (grad_out * out.to(dtype)).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = torch.matmul(grad_scores, k.to(dtype))
    grad_k = torch.matmul(grad_scores.transpose(1, 2), q.to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)

