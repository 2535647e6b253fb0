"""Triton kernels of masked attention: fused forward and backward (the "triton" backend).

``triton.py`` launches them; semantics are those of ``reference``.

How it works (flash-attention style, docs/design.md §2):

* **Compaction.** ``partition_indices`` turns a mask into a per-sample index list (true
  positions first, then the others) and a count. A program works on a tile of *slots*
  of such a list. The grid covers all ``L`` slots of every sample (counts live on the
  device, so the host cannot size it exactly): slots past the count are the rows that
  get no attention, and the same program writes their zeros (and ``+inf`` lse), so no
  output is zero-filled beforehand. Batch and tile share grid axis 0, so any batch fits.
* **Key lists as rotations.** A key list is a partition read from slot ``offset`` on,
  wrapping around. The single op reads its own key partition from slot 0; the dual op
  reads both key lists from the foreground's partition: the self branch from slot 0
  (foreground), the cross branch from slot ``count`` (background first, then the
  foreground rows, which are its non-keys). One partition serves both branches and one
  launch per kernel computes both (program axis 2 picks the branch).
* **Gathered loads for both layouts.** Q/K/V/dO rows are gathered straight from the
  caller's strided tensors. Rows ``(B, L, D)`` with unit-stride channels are loaded as
  ``rows × channels`` tiles (threads along the channels: vector loads); tensors whose
  *rows* are unit-stride (a conv output seen as ``(B, L, C)``) are loaded as
  ``channels × rows`` tiles so that neighbouring threads read neighbouring rows
  (``ROWS_UNIT_STRIDE_*``); either way no copy is made.
* **Online softmax** over key tiles with float32 statistics kept in *natural-log units*:
  scores are ``scale·q·k`` rounded as the reference rounds them, the running maximum and
  the saved ``lse = max + log(sum)`` are in the same units, and only the small
  differences ``score − max`` / ``score − lse`` are multiplied by ``log2(e)`` for
  ``exp2``. So the natural-log lse that crosses the op boundary (the convention of every
  backend) is used by the backward exactly as the forward produced it: no large value
  is ever converted between bases, which is where a log2 ↔ ln round trip loses
  precision at large score magnitudes (scale 10, |q·k| ~ 100).
* **Head sizes.** Dqk and Dv need not be equal or powers of two: tiles are padded to the
  next power of two (at least 16, ``tl.dot``'s minimum) with masked loads. A wide V is
  split in chunks of ``BLOCK_DV`` over grid axis 1; each chunk recomputes QKᵀ, cheap
  since Dqk ≪ Dv.
* **Backward** is three kernels: ``delta = rowsum(dO∘O)``; dK/dV per 128-row key tile
  looping over query tiles in the Triton tutorial's transposed form (``Sᵀ = K·Qᵀ``,
  ``dV += Pᵀ·dO``, ``dK += dSᵀ·Q``), where the programs of the first V chunk also
  compute dK (it needs dP over the full V width, streamed chunk by chunk); dQ per query
  tile looping over key tiles. Each output element is written by exactly one program
  with a fixed summation order: **deterministic** (no atomics).
* **Precision.** float16/bfloat16 feed the tensor cores in their dtype and accumulate in
  float32. float32 follows ``torch.get_float32_matmul_precision()``: ``"highest"`` →
  IEEE float32 products (FMA units, smaller tiles that do not spill), ``"high"`` →
  ``tf32x3`` (three TF32 products, about float32 accuracy on the tensor cores),
  ``"medium"`` → ``tf32``.

Block sizes come from the fixed, documented table ``triton_common.block_config``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from dsa_ops.ops.triton_common import LOG2_E, gather


@triton.jit
def _rows_at(index_b, slots, offset, length):
    """Rows at ``slots`` of a list that starts at slot ``offset`` of a partition and wraps."""
    at = slots + offset
    at = tl.where(at >= length, at - length, at)
    return tl.load(index_b + at, mask=slots < length, other=0).to(tl.int64)


@triton.jit
def _pick(branch, first, second, TWO_BRANCHES: tl.constexpr):
    """Branch 0's or branch 1's pointer (single-branch launches pass None as the second)."""
    if TWO_BRANCHES:
        pointer = first if branch == 0 else second
    else:
        pointer = first
    return pointer


@triton.jit
def _key_list(batch, branch, num_queries, k_count, length, DUAL: tl.constexpr):
    """(first slot, count) of a sample's key list; see "Key lists as rotations".
    ``branch``: 0 = cross, 1 = self for the dual op."""
    if DUAL:  # branch 0 = cross: the background; branch 1 = self: the foreground
        offset = tl.where(branch == 0, num_queries, 0)
        num_keys = tl.where(branch == 0, length - num_queries, num_queries)
    else:
        offset = num_queries * 0
        num_keys = tl.load(k_count + batch)
    return offset, num_keys


@triton.jit
def _exp(x):
    """exp(x) for small x in natural units (a difference of scaled scores) via exp2."""
    return tl.exp2(x * LOG2_E)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(
    q0, k0, v0, out0, lse0, q1, k1, v1, out1, lse1,
    q_index, q_count, k_index, k_count,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_ob, stride_ol, stride_od,
    stride_lse_b,
    length, qk_dim, v_dim, scale, first_branch,
    DUAL: tl.constexpr, TWO_BRANCHES: tl.constexpr,
    ROWS_UNIT_STRIDE_Q: tl.constexpr, ROWS_UNIT_STRIDE_K: tl.constexpr,
    ROWS_UNIT_STRIDE_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one tile of query slots × one V chunk of one sample and branch."""
    tiles = tl.cdiv(length, BLOCK_M)
    batch = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    chunk = tl.program_id(1)
    branch = tl.program_id(2)
    q, k, v = _pick(branch, q0, q1, TWO_BRANCHES), _pick(branch, k0, k1, TWO_BRANCHES), \
        _pick(branch, v0, v1, TWO_BRANCHES)
    out, lse = _pick(branch, out0, out1, TWO_BRANCHES), _pick(branch, lse0, lse1, TWO_BRANCHES)
    num_queries = tl.load(q_count + batch)
    key_offset, num_keys = _key_list(batch, first_branch + branch, num_queries, k_count,
                                      length, DUAL)
    keys_b = (q_index if DUAL else k_index) + batch * length

    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = _rows_at(q_index + batch * length, slots, 0, length)
    has_output = (slots < num_queries) & (num_keys > 0)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_tile = gather(q + batch * stride_qb, rows, has_output, stride_ql, qk_cols, qk_dim,
                     stride_qd, ROWS_UNIT_STRIDE_Q, False)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # natural units
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Tiles without queries (or samples without keys) skip the loop and write zeros.
    key_end = tl.where(tile * BLOCK_M < num_queries, num_keys, 0)
    for start in range(0, key_end, BLOCK_N):
        key_slots = start + tl.arange(0, BLOCK_N)
        col_valid = key_slots < num_keys
        cols = _rows_at(keys_b, key_slots, key_offset, length)
        k_tile = gather(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                         stride_kd, ROWS_UNIT_STRIDE_K, True)
        v_tile = gather(v + batch * stride_vb, cols, col_valid, stride_vl, v_cols, v_dim,
                         stride_vd, ROWS_UNIT_STRIDE_V, False)
        # Scaled like the reference (dot, then × scale) so both round the same values.
        scores = tl.dot(q_tile, k_tile, input_precision=INPUT_PRECISION) * scale
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        # Every tile holds at least one valid key, so the new maximum is finite.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = _exp(row_max - new_max)
        probs = _exp(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile,
                                                 input_precision=INPUT_PRECISION)
        row_max = new_max

    acc = tl.where(has_output[:, None], acc / tl.where(has_output, row_sum, 1.0)[:, None], 0.0)
    row_valid = slots < length
    tl.store(out + batch * stride_ob + rows[:, None] * stride_ol + v_cols[None, :] * stride_od,
             acc.to(out.dtype.element_ty), mask=row_valid[:, None] & (v_cols[None, :] < v_dim))
    # Natural-log lse (+inf without keys), written once per row by the first V chunk.
    row_lse = tl.where(has_output, row_max + tl.log(tl.where(has_output, row_sum, 1.0)),
                       float("inf"))
    tl.store(lse + batch * stride_lse_b + rows, row_lse, mask=row_valid & (chunk == 0))


@triton.jit
def _delta_kernel(
    grad_out0, out0, grad_out1, out1, delta, q_index, q_count,
    stride_gb, stride_gl, stride_gd,
    stride_ob, stride_ol, stride_od,
    length, v_dim,
    TWO_BRANCHES: tl.constexpr, ROWS_UNIT_STRIDE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[branch, b, slot] = Σ_d dO·O of the query row at ``slot`` (float32)."""
    tiles = tl.cdiv(length, BLOCK_M)
    batch = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    branch = tl.program_id(1)
    grad_out = _pick(branch, grad_out0, grad_out1, TWO_BRANCHES)
    out = _pick(branch, out0, out1, TWO_BRANCHES)
    num_queries = tl.load(q_count + batch)
    if tile * BLOCK_M >= num_queries:
        return
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = slots < num_queries
    rows = _rows_at(q_index + batch * length, slots, 0, length)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, v_dim, BLOCK_DV):
        cols = start + tl.arange(0, BLOCK_DV)
        d_out = gather(grad_out + batch * stride_gb, rows, row_valid, stride_gl, cols, v_dim,
                        stride_gd, ROWS_UNIT_STRIDE_G, False).to(tl.float32)
        o = gather(out + batch * stride_ob, rows, row_valid, stride_ol, cols, v_dim,
                    stride_od, False, False).to(tl.float32)
        total += tl.sum(d_out * o, axis=1)
    tl.store(delta + (branch * (tl.num_programs(0) // tiles) + batch) * length + slots, total,
             mask=row_valid)


@triton.jit
def _grad_probs_t(v_tile, d_out_t, v_b, d_out_b, cols, col_valid, rows, row_valid,
                  stride_vl, stride_vd, stride_gl, stride_gd, v_dim,
                  ROWS_UNIT_STRIDE_V: tl.constexpr, ROWS_UNIT_STRIDE_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                  NUM_DV_CHUNKS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dPᵀ = V·dOᵀ (keys × queries) over the full V width.

    With one chunk the caller's resident tiles are used; otherwise the chunks are
    streamed (from L2) and accumulated, one chunk's tiles live at a time.
    """
    if NUM_DV_CHUNKS == 1:
        d_probs_t = tl.dot(v_tile, d_out_t, input_precision=INPUT_PRECISION)
    else:
        d_probs_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for chunk in range(NUM_DV_CHUNKS):
            v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
            v_chunk = gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
                              ROWS_UNIT_STRIDE_V, False)
            d_out_chunk = gather(d_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
                                  ROWS_UNIT_STRIDE_G, True)
            d_probs_t += tl.dot(v_chunk, d_out_chunk, input_precision=INPUT_PRECISION)
    return d_probs_t


@triton.jit
def _grad_kv_kernel(
    grad_out0, q0, k0, v0, lse0, grad_k0, grad_v0,
    grad_out1, q1, k1, v1, lse1, grad_k1, grad_v1,
    delta, q_index, q_count, k_index, k_count,
    stride_gb, stride_gl, stride_gd,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_dkb, stride_dkl, stride_dkd,
    stride_dvb, stride_dvl, stride_dvd,
    stride_lse_b,
    length, qk_dim, v_dim, scale, num_chunks, first_branch,
    DUAL: tl.constexpr, TWO_BRANCHES: tl.constexpr,
    ROWS_UNIT_STRIDE_G: tl.constexpr, ROWS_UNIT_STRIDE_Q: tl.constexpr,
    ROWS_UNIT_STRIDE_K: tl.constexpr, ROWS_UNIT_STRIDE_V: tl.constexpr,
    NUM_DV_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCORES_AS_FORWARD: tl.constexpr,
):
    """One program: one tile of key slots × one V chunk of one sample and branch, looping
    over query tiles: dV = Pᵀ·dO for its chunk; the first chunk's programs also compute
    dK = scale·dSᵀ·Q, dS = P∘(dP − delta), which needs dP over the full V width."""
    tiles = tl.cdiv(length, BLOCK_N)
    batch = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    chunk = tl.program_id(1) % num_chunks
    branch = tl.program_id(1) // num_chunks
    grad_out, q = _pick(branch, grad_out0, grad_out1, TWO_BRANCHES), _pick(branch, q0, q1, TWO_BRANCHES)
    k, v = _pick(branch, k0, k1, TWO_BRANCHES), _pick(branch, v0, v1, TWO_BRANCHES)
    lse = _pick(branch, lse0, lse1, TWO_BRANCHES)
    grad_k, grad_v = _pick(branch, grad_k0, grad_k1, TWO_BRANCHES), \
        _pick(branch, grad_v0, grad_v1, TWO_BRANCHES)
    num_queries = tl.load(q_count + batch)
    key_offset, num_keys = _key_list(batch, first_branch + branch, num_queries, k_count,
                                      length, DUAL)
    keys_b = (q_index if DUAL else k_index) + batch * length
    queries_b = q_index + batch * length
    delta_b = delta + (branch * (tl.num_programs(0) // tiles) + batch) * length

    key_slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = key_slots < num_keys
    cols = _rows_at(keys_b, key_slots, key_offset, length)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    grad_out_b = grad_out + batch * stride_gb
    q_b = q + batch * stride_qb
    v_b = v + batch * stride_vb
    # float32 (SCORES_AS_FORWARD) loads K as Kᵀ and Q as rows, the forward's operands, so
    # that S = Q·Kᵀ rounds exactly as in the forward (see the scores below); 16-bit keeps the
    # Sᵀ = K·Qᵀ form, whose operands reach the tensor cores untransposed (wgmma on sm_90, no
    # spills on sm_80) and whose rounding differences lie far inside the 16-bit tolerance.
    if SCORES_AS_FORWARD:
        k_operand = gather(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                           stride_kd, ROWS_UNIT_STRIDE_K, True)
    else:
        k_operand = gather(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                           stride_kd, ROWS_UNIT_STRIDE_K, False)
    v_tile = gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
                     ROWS_UNIT_STRIDE_V, False)
    computes_grad_k = chunk == 0

    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_N, BLOCK_QK], dtype=tl.float32)
    # Key tiles without keys (or samples without queries) skip the loop and write zeros.
    query_end = tl.where(tile * BLOCK_N < num_keys, num_queries, 0)
    for start in range(0, query_end, BLOCK_M):
        slots = start + tl.arange(0, BLOCK_M)
        row_valid = slots < num_queries
        rows = _rows_at(queries_b, slots, 0, length)
        if SCORES_AS_FORWARD:
            q_rows = gather(q_b, rows, row_valid, stride_ql, qk_cols, qk_dim, stride_qd,
                            ROWS_UNIT_STRIDE_Q, False)
        else:
            q_operand = gather(q_b, rows, row_valid, stride_ql, qk_cols, qk_dim, stride_qd,
                               ROWS_UNIT_STRIDE_Q, True)
            q_rows = tl.trans(q_operand)
        d_out_tile = gather(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
                             ROWS_UNIT_STRIDE_G, False)
        # Every query row here has keys (num_keys > 0), so its lse is finite; padding rows
        # read +inf and get probability 0.
        row_lse = tl.load(lse + batch * stride_lse_b + rows, mask=row_valid, other=float("inf"))
        # P = exp(S − lse) is normalised only if S rounds exactly as in the forward, which
        # computed lse from it: at |S| ~ 1000 a one-ulp difference shifts a whole row of P
        # by ~1e-4. So S = Q·Kᵀ from the forward's operands, transposed afterwards; Kᵀ·Qᵀ
        # sums the same products in another order on some BLAS kernels (OpenBLAS's Haswell
        # sgemm under the interpreter: dV 25× the float32 reference's error).
        if SCORES_AS_FORWARD:
            scores_t = tl.trans(tl.dot(q_rows, k_operand, input_precision=INPUT_PRECISION) * scale)
        else:
            scores_t = tl.dot(k_operand, q_operand, input_precision=INPUT_PRECISION) * scale
        probs_t = tl.where(col_valid[:, None], _exp(scores_t - row_lse[None, :]), 0.0)
        acc_v += tl.dot(probs_t.to(d_out_tile.dtype), d_out_tile, input_precision=INPUT_PRECISION)
        if computes_grad_k:
            row_delta = tl.load(delta_b + slots, mask=row_valid, other=0.0)
            d_probs_t = _grad_probs_t(v_tile, tl.trans(d_out_tile), v_b, grad_out_b, cols,
                                      col_valid, rows, row_valid, stride_vl, stride_vd,
                                      stride_gl, stride_gd, v_dim, ROWS_UNIT_STRIDE_V,
                                      ROWS_UNIT_STRIDE_G, BLOCK_N, BLOCK_M, BLOCK_DV,
                                      NUM_DV_CHUNKS, INPUT_PRECISION)
            d_scores_t = probs_t * (d_probs_t - row_delta[None, :])
            acc_k += tl.dot(d_scores_t.to(q_rows.dtype), q_rows, input_precision=INPUT_PRECISION)

    row_valid_k = key_slots < length
    tl.store(grad_v + batch * stride_dvb + cols[:, None] * stride_dvl + v_cols[None, :] * stride_dvd,
             acc_v.to(grad_v.dtype.element_ty),
             mask=row_valid_k[:, None] & (v_cols[None, :] < v_dim))
    tl.store(grad_k + batch * stride_dkb + cols[:, None] * stride_dkl + qk_cols[None, :] * stride_dkd,
             (acc_k * scale).to(grad_k.dtype.element_ty),
             mask=(row_valid_k & computes_grad_k)[:, None] & (qk_cols[None, :] < qk_dim))


@triton.jit
def _grad_q_kernel(
    grad_out0, q0, k0, v0, lse0, grad_q0,
    grad_out1, q1, k1, v1, lse1, grad_q1,
    delta, q_index, q_count, k_index, k_count,
    stride_gb, stride_gl, stride_gd,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_dqb, stride_dql, stride_dqd,
    stride_lse_b,
    length, qk_dim, v_dim, scale, first_branch,
    DUAL: tl.constexpr, TWO_BRANCHES: tl.constexpr,
    ROWS_UNIT_STRIDE_G: tl.constexpr, ROWS_UNIT_STRIDE_Q: tl.constexpr,
    ROWS_UNIT_STRIDE_K: tl.constexpr, ROWS_UNIT_STRIDE_V: tl.constexpr,
    NUM_DV_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one tile of query slots of one sample and branch;
    dQ = scale·dS·K over all key tiles (zeros for non-query rows)."""
    tiles = tl.cdiv(length, BLOCK_M)
    batch = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    branch = tl.program_id(1)
    grad_out, q = _pick(branch, grad_out0, grad_out1, TWO_BRANCHES), _pick(branch, q0, q1, TWO_BRANCHES)
    k, v = _pick(branch, k0, k1, TWO_BRANCHES), _pick(branch, v0, v1, TWO_BRANCHES)
    lse, grad_q = _pick(branch, lse0, lse1, TWO_BRANCHES), _pick(branch, grad_q0, grad_q1, TWO_BRANCHES)
    num_queries = tl.load(q_count + batch)
    key_offset, num_keys = _key_list(batch, first_branch + branch, num_queries, k_count,
                                      length, DUAL)
    keys_b = (q_index if DUAL else k_index) + batch * length

    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = slots < num_queries
    rows = _rows_at(q_index + batch * length, slots, 0, length)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = tl.arange(0, BLOCK_DV)
    grad_out_b = grad_out + batch * stride_gb
    k_b = k + batch * stride_kb
    v_b = v + batch * stride_vb
    q_tile = gather(q + batch * stride_qb, rows, row_valid, stride_ql, qk_cols, qk_dim,
                     stride_qd, ROWS_UNIT_STRIDE_Q, False)
    d_out_t = gather(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
                      ROWS_UNIT_STRIDE_G, True)
    row_lse = tl.load(lse + batch * stride_lse_b + rows, mask=row_valid, other=float("inf"))
    delta_b = delta + (branch * (tl.num_programs(0) // tiles) + batch) * length
    row_delta = tl.load(delta_b + slots, mask=row_valid, other=0.0)

    acc_q = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
    key_end = tl.where(tile * BLOCK_M < num_queries, num_keys, 0)
    for start in range(0, key_end, BLOCK_N):
        key_slots = start + tl.arange(0, BLOCK_N)
        col_valid = key_slots < num_keys
        cols = _rows_at(keys_b, key_slots, key_offset, length)
        k_tile = gather(k_b, cols, col_valid, stride_kl, qk_cols, qk_dim, stride_kd,
                         ROWS_UNIT_STRIDE_K, False)
        v_tile = gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
                         ROWS_UNIT_STRIDE_V, False)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION) * scale
        probs = tl.where(col_valid[None, :], _exp(scores - row_lse[:, None]), 0.0)
        d_probs = tl.trans(_grad_probs_t(v_tile, d_out_t, v_b, grad_out_b, cols, col_valid, rows,
                                         row_valid, stride_vl, stride_vd, stride_gl, stride_gd,
                                         v_dim, ROWS_UNIT_STRIDE_V, ROWS_UNIT_STRIDE_G, BLOCK_N,
                                         BLOCK_M, BLOCK_DV, NUM_DV_CHUNKS, INPUT_PRECISION))
        d_scores = probs * (d_probs - row_delta[:, None])
        acc_q += tl.dot(d_scores.to(k_tile.dtype), k_tile, input_precision=INPUT_PRECISION)

    tl.store(grad_q + batch * stride_dqb + rows[:, None] * stride_dql + qk_cols[None, :] * stride_dqd,
             (acc_q * scale).to(grad_q.dtype.element_ty),
             mask=(slots < length)[:, None] & (qk_cols[None, :] < qk_dim))

