"""The "triton" backend of ``attention_kl``: fused forward and backward kernels.

KL(E_oracle‖E) per query row and its gradient (docs/design.md §2, "Streaming oracle KL").
Same structure as the masked-attention kernels: compacted query/key lists, gathered
strided loads, float32 statistics in log2 units. These functions know nothing of
autograd or validation (``op`` registers them as ``triton_op``s).

* Forward, one program per tile of compacted query rows, one pass over key tiles: the
  prediction keeps an online (max, sum) for lse; the oracle keeps its (max, sum) and
  acc = Σ_j exp2(s°_j − max°)·(s°_j − s_j), rescaled like the attention accumulator, so
  KL = ln2·(acc/sum° − lse°₂ + lse₂). The log-probabilities never go through log(p):
  exact at any logit gap.
* Backward, dS = g_i·(p_ij − p°_ij) from both saved lse's, one kernel launched twice:
  dQ per query tile over key tiles, dK per key tile over query tiles (each output
  written by one program: no atomics, deterministic).
* Under the interpreter (CPU) tl.dot on bfloat16 is unreliable, so the operands are
  converted to float32 there (DOT_FLOAT32); on GPUs 16-bit operands feed the tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsa_ops.ops import triton_common as common
from dsa_ops.ops.partition import triton as partition
from dsa_ops.ops.triton_common import LN_2, LOG2_E, gather

Tensor = torch.Tensor


@triton.jit
def _kl_dot(a, b, INPUT_PRECISION: tl.constexpr, DOT_FLOAT32: tl.constexpr):
    """``a·b`` accumulated in float32; a is cast to b's dtype (or both to float32)."""
    if DOT_FLOAT32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
    return tl.dot(a.to(b.dtype), b, input_precision=INPUT_PRECISION)


@triton.jit
def _kl_program(q_count, k_count):
    """``(tile, sample, number of queries, number of keys)`` of this program."""
    batch = tl.program_id(1).to(tl.int64)
    return tl.program_id(0), batch, tl.load(q_count + batch), tl.load(k_count + batch)


@triton.jit
def _kl_tile_rows(index, count, batch, length, start, BLOCK: tl.constexpr):
    """Rows (int64) of compacted slots ``start ..+BLOCK`` of one sample, and which are valid."""
    slots = start + tl.arange(0, BLOCK)
    valid = slots < count
    return tl.load(index + batch * length + slots, mask=valid, other=0).to(tl.int64), valid


@triton.jit
def _kl_load_pair(prediction, oracle, rows, valid, cols_d, qk_dim, stride_pl, stride_pd,
                  stride_ol, stride_od):
    """The same rows of the prediction's and the oracle's q (or k) of one sample."""
    return (gather(prediction, rows, valid, stride_pl, cols_d, qk_dim, stride_pd, False, False),
            gather(oracle, rows, valid, stride_ol, cols_d, qk_dim, stride_od, False, False))


@triton.jit
def _kl_row_statistics(lse, lse_oracle, grad_kl, rows, valid, stride_gl):
    """Both lse's in log2 units and the incoming gradient of the rows (one sample's base
    pointers); padding rows read lse +inf and gradient 0, so their dS is 0."""
    lse2 = tl.load(lse + rows, mask=valid, other=float("inf")) * LOG2_E
    oracle_lse2 = tl.load(lse_oracle + rows, mask=valid, other=float("inf")) * LOG2_E
    grad = tl.load(grad_kl + rows * stride_gl, mask=valid, other=0.0).to(tl.float32)
    return lse2, oracle_lse2, grad


@triton.jit
def _kl_forward_kernel(
    q, k, q_oracle, k_oracle, kl, lse, lse_oracle,
    q_index, q_count, k_index, k_count,
    stride_qb, stride_ql, stride_qd, stride_kb, stride_kl, stride_kd,
    stride_qob, stride_qol, stride_qod, stride_kob, stride_kol, stride_kod,
    stride_out_b,
    length, qk_dim, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FLOAT32: tl.constexpr,
):
    """One program: one tile of compacted query rows of one sample, all its key tiles."""
    tile, batch, num_queries, num_keys = _kl_program(q_count, k_count)
    # Rows past the queries, or without keys, keep the kl 0 / lse +inf the caller set.
    if (tile * BLOCK_M >= num_queries) | (num_keys == 0):
        return
    rows, row_valid = _kl_tile_rows(q_index, num_queries, batch, length, tile * BLOCK_M, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_QK)
    q_tile, qo_tile = _kl_load_pair(q + batch * stride_qb, q_oracle + batch * stride_qob, rows,
                                    row_valid, cols_d, qk_dim, stride_ql, stride_qd, stride_qol,
                                    stride_qod)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    oracle_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    oracle_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    cross = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ exp2(s° − max°)·(s° − s)
    for start in range(0, num_keys, BLOCK_N):
        cols, col_valid = _kl_tile_rows(k_index, num_keys, batch, length, start, BLOCK_N)
        k_tile, ko_tile = _kl_load_pair(k + batch * stride_kb, k_oracle + batch * stride_kob, cols,
                                        col_valid, cols_d, qk_dim, stride_kl, stride_kd,
                                        stride_kol, stride_kod)
        scores = _kl_dot(q_tile, tl.trans(k_tile), INPUT_PRECISION, DOT_FLOAT32) * qk_scale_log2
        oracle_scores = (_kl_dot(qo_tile, tl.trans(ko_tile), INPUT_PRECISION, DOT_FLOAT32)
                         * qk_scale_log2)
        gap = tl.where(col_valid[None, :], oracle_scores - scores, 0.0)
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        oracle_scores = tl.where(col_valid[None, :], oracle_scores, float("-inf"))
        # Every tile holds a valid key, so the new maxima are finite.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(
            tl.exp2(scores - new_max[:, None]), axis=1)
        row_max = new_max
        new_oracle_max = tl.maximum(oracle_max, tl.max(oracle_scores, axis=1))
        correction = tl.exp2(oracle_max - new_oracle_max)
        oracle_weights = tl.exp2(oracle_scores - new_oracle_max[:, None])
        oracle_sum = oracle_sum * correction + tl.sum(oracle_weights, axis=1)
        cross = cross * correction + tl.sum(oracle_weights * gap, axis=1)
        oracle_max = new_oracle_max

    row_lse2 = row_max + tl.log2(row_sum)
    oracle_lse2 = oracle_max + tl.log2(oracle_sum)
    out_offsets = batch * stride_out_b + rows
    tl.store(kl + out_offsets, (cross / oracle_sum - oracle_lse2 + row_lse2) * LN_2, mask=row_valid)
    tl.store(lse + out_offsets, row_lse2 * LN_2, mask=row_valid)
    tl.store(lse_oracle + out_offsets, oracle_lse2 * LN_2, mask=row_valid)


@triton.jit
def _kl_grad_scores(q_tile, qo_tile, k_tile, ko_tile, lse2, oracle_lse2, grad, col_valid,
                    qk_scale_log2, INPUT_PRECISION: tl.constexpr, DOT_FLOAT32: tl.constexpr):
    """``g_i·(p_ij − p°_ij)`` for a (query tile, key tile) pair; 0 on padding."""
    scores = _kl_dot(q_tile, tl.trans(k_tile), INPUT_PRECISION, DOT_FLOAT32) * qk_scale_log2
    oracle_scores = _kl_dot(qo_tile, tl.trans(ko_tile), INPUT_PRECISION, DOT_FLOAT32) * qk_scale_log2
    probs = tl.exp2(scores - lse2[:, None]) - tl.exp2(oracle_scores - oracle_lse2[:, None])
    return tl.where(col_valid[None, :], probs * grad[:, None], 0.0)


@triton.jit
def _kl_backward_kernel(
    grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle, grad,
    q_index, q_count, k_index, k_count,
    stride_gb, stride_gl,
    stride_qb, stride_ql, stride_qd, stride_kb, stride_kl, stride_kd,
    stride_qob, stride_qol, stride_qod, stride_kob, stride_kol, stride_kod,
    stride_lse_b, stride_db, stride_dl, stride_dd,
    length, qk_dim, scale, qk_scale_log2,
    GRAD_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FLOAT32: tl.constexpr,
):
    """One program, one tile of one sample's compacted rows; dS = g·(p − p°) recomputed.

    ``GRAD_K`` false: a query tile, dQ = scale·dS·K over all key tiles. ``GRAD_K`` true:
    a key tile, dK = scale·dSᵀ·Q over all query tiles. ``grad`` is dQ or dK.
    """
    tile, batch, num_queries, num_keys = _kl_program(q_count, k_count)
    # Rows no pair reaches keep the zero gradient the caller allocated.
    if ((tile * (BLOCK_N if GRAD_K else BLOCK_M) >= (num_keys if GRAD_K else num_queries))
            | (num_keys == 0) | (num_queries == 0)):
        return
    cols_d = tl.arange(0, BLOCK_QK)
    q_b, qo_b = q + batch * stride_qb, q_oracle + batch * stride_qob
    k_b, ko_b = k + batch * stride_kb, k_oracle + batch * stride_kob
    lse_b, lse_oracle_b = lse + batch * stride_lse_b, lse_oracle + batch * stride_lse_b
    grad_kl_b = grad_kl + batch * stride_gb
    if GRAD_K:
        own, own_valid = _kl_tile_rows(k_index, num_keys, batch, length, tile * BLOCK_N, BLOCK_N)
        k_tile, ko_tile = _kl_load_pair(k_b, ko_b, own, own_valid, cols_d, qk_dim, stride_kl,
                                        stride_kd, stride_kol, stride_kod)
        acc = tl.zeros([BLOCK_N, BLOCK_QK], dtype=tl.float32)
        for start in range(0, num_queries, BLOCK_M):
            rows, row_valid = _kl_tile_rows(q_index, num_queries, batch, length, start, BLOCK_M)
            q_tile, qo_tile = _kl_load_pair(q_b, qo_b, rows, row_valid, cols_d, qk_dim, stride_ql,
                                            stride_qd, stride_qol, stride_qod)
            lse2, oracle_lse2, g = _kl_row_statistics(lse_b, lse_oracle_b, grad_kl_b, rows,
                                                      row_valid, stride_gl)
            d_scores = _kl_grad_scores(q_tile, qo_tile, k_tile, ko_tile, lse2, oracle_lse2, g,
                                       own_valid, qk_scale_log2, INPUT_PRECISION, DOT_FLOAT32)
            acc += _kl_dot(tl.trans(d_scores), q_tile, INPUT_PRECISION, DOT_FLOAT32)
    else:
        own, own_valid = _kl_tile_rows(q_index, num_queries, batch, length, tile * BLOCK_M, BLOCK_M)
        q_tile, qo_tile = _kl_load_pair(q_b, qo_b, own, own_valid, cols_d, qk_dim, stride_ql,
                                        stride_qd, stride_qol, stride_qod)
        lse2, oracle_lse2, g = _kl_row_statistics(lse_b, lse_oracle_b, grad_kl_b, own, own_valid,
                                                  stride_gl)
        acc = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
        for start in range(0, num_keys, BLOCK_N):
            cols, col_valid = _kl_tile_rows(k_index, num_keys, batch, length, start, BLOCK_N)
            k_tile, ko_tile = _kl_load_pair(k_b, ko_b, cols, col_valid, cols_d, qk_dim, stride_kl,
                                            stride_kd, stride_kol, stride_kod)
            d_scores = _kl_grad_scores(q_tile, qo_tile, k_tile, ko_tile, lse2, oracle_lse2, g,
                                       col_valid, qk_scale_log2, INPUT_PRECISION, DOT_FLOAT32)
            acc += _kl_dot(d_scores, k_tile, INPUT_PRECISION, DOT_FLOAT32)
    pointers = grad + batch * stride_db + own[:, None] * stride_dl + cols_d[None, :] * stride_dd
    tl.store(pointers, (acc * scale).to(grad.dtype.element_ty),
             mask=own_valid[:, None] & (cols_d[None, :] < qk_dim))


def _kl_launch_options(q: Tensor) -> dict:
    config = common.kl_block_config(q.device, q.shape[2])
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_QK=config.block_qk,
                INPUT_PRECISION=common.dot_precision(q.dtype),
                DOT_FLOAT32=q.device.type != "cuda" and q.dtype == torch.bfloat16,
                num_warps=config.num_warps, num_stages=config.num_stages)


def attention_kl_forward(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
                         query_mask: Tensor, key_mask: Tensor,
                         scale: float) -> tuple[Tensor, ...]:
    """``(kl, lse, lse_oracle)``, each ``(B, L)`` float32, and the masks' partitions
    ``(query_index, query_count, key_index, key_count)``; inputs ``(B, L, Dqk)`` any strides."""
    batch, length, qk_dim = q.shape
    kl = torch.zeros((batch, length), dtype=torch.float32, device=q.device)
    lse = torch.full((batch, length), float("inf"), dtype=torch.float32, device=q.device)
    lse_oracle = torch.full_like(lse, float("inf"))
    partitions = (*partition.partition_indices(query_mask), *partition.partition_indices(key_mask))
    if batch == 0 or length == 0:
        return kl, lse, lse_oracle, *partitions
    options = _kl_launch_options(q)
    grid = (triton.cdiv(length, options["BLOCK_M"]), batch)
    common.wrap_triton(_kl_forward_kernel)[grid](
        q, k, q_oracle, k_oracle, kl, lse, lse_oracle, *partitions,
        *q.stride(), *k.stride(), *q_oracle.stride(), *k_oracle.stride(), kl.stride(0),
        length, qk_dim, scale * LOG2_E, **options)
    return kl, lse, lse_oracle, *partitions


def attention_kl_backward(grad_kl: Tensor, q: Tensor, k: Tensor, q_oracle: Tensor,
                          k_oracle: Tensor, lse: Tensor, lse_oracle: Tensor,
                          query_mask: Tensor, key_mask: Tensor, query_index: Tensor,
                          query_count: Tensor, key_index: Tensor, key_count: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    """``(grad_q, grad_k)`` shaped like q, k; ``grad_kl`` ``(B, L)`` any strides; lse's and
    partitions from the forward (contiguous, as it allocates them)."""
    batch, length, qk_dim = q.shape
    grad_q = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    if batch == 0 or length == 0:
        return grad_q, grad_k
    options = _kl_launch_options(q)
    inputs = (grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle)
    strides = (*grad_kl.stride(), *q.stride(), *k.stride(), *q_oracle.stride(),
               *k_oracle.stride(), lse.stride(0))
    indices = (query_index, query_count, key_index, key_count)
    for grad_k_pass, grad, block in ((False, grad_q, options["BLOCK_M"]),
                                     (True, grad_k, options["BLOCK_N"])):
        common.wrap_triton(_kl_backward_kernel)[(triton.cdiv(length, block), batch)](
            *inputs, grad, *indices, *strides, *grad.stride(),
            length, qk_dim, scale, scale * LOG2_E, GRAD_K=grad_k_pass, **options)
    return grad_q, grad_k
