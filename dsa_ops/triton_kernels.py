"""Triton kernels for masked attention: fused forward and backward (the "triton" backend).

These functions know nothing of autograd or validation: ``dsa_ops.ops`` registers
``forward`` and ``backward`` as ``torch.library.triton_op``s, validates inputs and wires
the backward op into autograd. Semantics are those of ``dsa_ops.reference``.

How it works (flash-attention style, DESIGN §2):

* **Compaction.** ``partition_indices`` turns each mask into a per-sample index list
  (true positions first) and a count. Programs work on tiles of the *compacted* lists,
  so no work is spent on non-query rows or non-key columns beyond the last partial
  tile. The grid covers ``cdiv(L, BLOCK)`` tiles per sample (counts live on the device,
  so the host cannot size the grid exactly); tiles past ``count[b]`` exit at once.
* **Gathered loads.** Q/K/V/dO rows are loaded straight from the caller's strided
  tensors through the index lists; outputs are scattered back the same way. Rows that
  are no query (and, in backward, no key) are zero because outputs start zero-filled.
* **Online softmax** over key tiles with float32 statistics; ``log2(e)`` is folded into
  the scale so the kernels use ``exp2``. The log-sum-exp (natural log, +inf for rows
  without keys or no query) is saved for backward, which recomputes the probabilities
  from Q, K and it: no ``L×L`` buffer anywhere.
* **Head sizes.** Dqk and Dv need not be equal or powers of two: tiles are padded to the
  next power of two (at least 16, ``tl.dot``'s minimum) with masked loads. A wide V is
  split across a grid dimension in chunks of ``BLOCK_DV`` when the accumulator would not
  fit; each chunk recomputes QKᵀ, which is cheap since Dqk ≪ Dv.
* **Backward** is three kernels: ``delta = rowsum(dO∘O)``; dK/dV per key tile looping
  over query tiles; dQ per query tile looping over key tiles. Every output element is
  written by exactly one program with a fixed summation order, so the backward is
  **deterministic** (no atomics) — the only mode this module offers.
* **Precision.** float32 inputs use IEEE float32 ``tl.dot`` unless the user enabled TF32
  the PyTorch way (``torch.backends.cuda.matmul.allow_tf32 = True``); float16/bfloat16
  inputs feed the tensor cores in their dtype and accumulate in float32.

Block sizes come from a fixed, documented table (``_block_config``) rather than
autotuning: launches stay deterministic and cheap to trace under ``torch.compile``.
Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) small fixed blocks
keep the tests fast.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

LOG2_E = math.log2(math.e)
# tl.dot needs every dimension to be at least 16.
_MIN_DOT_SIZE = 16


# ----------------------------------------------------------------------------- block table
@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel launch.

    ``block_m``: query rows per tile; ``block_n``: key rows per tile; ``block_qk`` /
    ``block_dv``: padded Q/K head size and the V chunk width (Dv is split into
    ``cdiv(Dv, block_dv)`` chunks).
    """
    block_m: int
    block_n: int
    block_qk: int
    block_dv: int
    num_warps: int
    num_stages: int

    def dv_chunks(self, v_dim: int) -> int:
        return triton.cdiv(v_dim, self.block_dv)


def _padded(size: int) -> int:
    return max(_MIN_DOT_SIZE, triton.next_power_of_2(size))


@functools.lru_cache(maxsize=None)
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _block_config(pass_name: str, device: torch.device, qk_dim: int, v_dim: int,
                  dtype: torch.dtype) -> BlockConfig:
    """The launch table (Dqk ≤ 64 always fits one tile; the V width decides the rest).

    ============  ===========  ===============================  =====================
    pass          V chunk      Hopper (sm90) / Ampere (sm80+)   why
    ============  ===========  ===============================  =====================
    forward       ≤ 64         M 64, N 64, 4 warps, 3 stages    small accumulator
    forward       128          M 64, N 64, 4 warps, 2 stages    acc 64×128 fp32
    forward       256          M 64, N 32, 8 warps, 2 stages    acc 64×256 fp32 over 8 warps
    backward      ≤ 64         M 32, N 64, 4 warps, 2 stages    dK, dV accumulators
    backward      128          M 32, N 64, 8 warps, 2 stages    dV acc 64×128 fp32
    backward      256          M 16, N 64, 8 warps, 1 stage     dV acc 64×256 fp32
    ============  ===========  ===============================  =====================

    The V chunk is ``next_pow2(Dv)`` capped at 256 for 16-bit inputs; float32 inputs
    (IEEE products on the FMA units, operands staged in shared memory) cap it at 128 in
    the forward and 64 in the backward, which keeps every kernel within the shared memory
    of an A100 (checked by compiling for sm_80 and sm_90 at Dqk/Dv = 64/512, 32/256,
    16/128, 8/12). Dv = 512 thus runs as 2 (16-bit) or 4/8 (float32) chunks.
    Pre-Ampere GPUs get the same tiles with one pipeline stage. Under the interpreter
    (CPU) every tile is 16 wide (V chunks 64): fast, and still exercises multi-tile
    loops and partial tiles at L ≈ 35..100.
    """
    # Head sizes pick the tile shapes (constexprs), so they are specialised even when
    # torch.compile traces with symbolic shapes; B and L stay symbolic in the grid.
    qk_dim, v_dim = int(qk_dim), int(v_dim)
    block_qk = _padded(qk_dim)
    if device.type != "cuda":
        return BlockConfig(16, 16, block_qk, min(_padded(v_dim), 64), num_warps=1, num_stages=1)
    if dtype == torch.float32:  # IEEE products run on FMA units and stage operands in smem
        max_chunk = 128 if pass_name == "forward" else 64
    else:
        max_chunk = 256
    block_dv = min(_padded(v_dim), max_chunk)
    if pass_name == "forward":
        if block_dv <= 64:
            config = BlockConfig(64, 64, block_qk, block_dv, num_warps=4, num_stages=3)
        elif block_dv <= 128:
            config = BlockConfig(64, 64, block_qk, block_dv, num_warps=4, num_stages=2)
        else:
            config = BlockConfig(64, 32, block_qk, block_dv, num_warps=8, num_stages=2)
    else:
        if block_dv <= 64:
            config = BlockConfig(32, 64, block_qk, block_dv, num_warps=4, num_stages=2)
        elif block_dv <= 128:
            config = BlockConfig(32, 64, block_qk, block_dv, num_warps=8, num_stages=2)
        else:
            config = BlockConfig(16, 64, block_qk, block_dv, num_warps=8, num_stages=1)
    if _compute_capability(device.index if device.index is not None
                           else torch.cuda.current_device())[0] < 8:
        config = dataclasses.replace(config, num_stages=1)
    return config


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products unless the user allowed TF32 the PyTorch way."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9: reading the legacy allow_tf32 raises once the new fp32_precision API
    # was used; fp32_precision also reflects the legacy flag, so read it when it exists.
    precision = getattr(matmul, "fp32_precision", None)
    allow_tf32 = matmul.allow_tf32 if precision is None else precision == "tf32"
    return "tf32" if allow_tf32 else "ieee"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_rows(base, rows, row_valid, stride_row, cols, num_cols, stride_col):
    """Gather a (len(rows), len(cols)) tile; padding rows/columns read as 0."""
    pointers = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(pointers, mask=row_valid[:, None] & (cols[None, :] < num_cols), other=0.0)


@triton.jit
def _forward_kernel(
    q, k, v, out, lse,
    q_index, q_count, k_index, k_count,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_ob, stride_ol, stride_od,
    stride_lse_b,
    length, qk_dim, v_dim, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one tile of compacted query rows × one V chunk of one sample."""
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    num_queries = tl.load(q_count + batch)
    num_keys = tl.load(k_count + batch)
    # Tiles past the sample's queries have nothing to do; rows without keys stay at the
    # zero output and +inf lse the caller allocated.
    if (tile * BLOCK_M >= num_queries) | (num_keys == 0):
        return

    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = slots < num_queries
    rows = tl.load(q_index + batch * length + slots, mask=row_valid, other=0).to(tl.int64)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_tile = _load_rows(q + batch * stride_qb, rows, row_valid, stride_ql, qk_cols, qk_dim,
                        stride_qd)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # in log2 units
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_N):
        key_slots = start + tl.arange(0, BLOCK_N)
        col_valid = key_slots < num_keys
        cols = tl.load(k_index + batch * length + key_slots, mask=col_valid, other=0).to(tl.int64)
        k_tile = _load_rows(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                            stride_kd)
        v_tile = _load_rows(v + batch * stride_vb, cols, col_valid, stride_vl, v_cols, v_dim,
                            stride_vd)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION) * qk_scale_log2
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        # Every tile holds at least one valid key, so the new maximum is finite.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile,
                                                 input_precision=INPUT_PRECISION)
        row_max = new_max

    acc = acc / row_sum[:, None]
    out_pointers = (out + batch * stride_ob + rows[:, None] * stride_ol
                    + v_cols[None, :] * stride_od)
    tl.store(out_pointers, acc.to(out.dtype.element_ty),
             mask=row_valid[:, None] & (v_cols[None, :] < v_dim))
    # Natural-log lse, written once per row (by the first V chunk).
    row_lse = (row_max + tl.log2(row_sum)) / 1.4426950408889634
    tl.store(lse + batch * stride_lse_b + rows, row_lse, mask=row_valid & (chunk == 0))


@triton.jit
def _delta_kernel(
    grad_out, out, delta, q_index, q_count,
    stride_gb, stride_gl, stride_gd,
    stride_ob, stride_ol, stride_od,
    length, v_dim,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, slot] = Σ_d dO·O for the query row at compacted ``slot`` (float32)."""
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_queries = tl.load(q_count + batch)
    if tile * BLOCK_M >= num_queries:
        return
    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = slots < num_queries
    rows = tl.load(q_index + batch * length + slots, mask=row_valid, other=0).to(tl.int64)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, v_dim, BLOCK_DV):
        cols = start + tl.arange(0, BLOCK_DV)
        d_out = _load_rows(grad_out + batch * stride_gb, rows, row_valid, stride_gl, cols, v_dim,
                           stride_gd).to(tl.float32)
        o = _load_rows(out + batch * stride_ob, rows, row_valid, stride_ol, cols, v_dim,
                       stride_od).to(tl.float32)
        total += tl.sum(d_out * o, axis=1)
    tl.store(delta + batch * length + slots, total, mask=row_valid)


@triton.jit
def _grad_probs(d_out_tile, v_tile, grad_out_b, v_b, rows, row_valid, cols, col_valid,
                stride_gl, stride_gd, stride_vl, stride_vd, v_dim,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                NUM_DV_CHUNKS: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dP = dO·Vᵀ (BLOCK_M, BLOCK_N) over the full V width.

    With one chunk the caller's resident tiles are used; otherwise the chunks are
    streamed (from L2) and accumulated.
    """
    if NUM_DV_CHUNKS == 1:
        d_probs = tl.dot(d_out_tile, tl.trans(v_tile), input_precision=INPUT_PRECISION)
    else:
        d_probs = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # A loop, not unrolled: one chunk's tiles live at a time.
        for chunk in range(NUM_DV_CHUNKS):
            v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
            d_out_chunk = _load_rows(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim,
                                     stride_gd)
            v_chunk = _load_rows(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd)
            d_probs += tl.dot(d_out_chunk, tl.trans(v_chunk), input_precision=INPUT_PRECISION)
    return d_probs


@triton.jit
def _grad_kv_kernel(
    grad_out, q, k, v, lse, delta, grad_k, grad_v,
    q_index, q_count, k_index, k_count,
    stride_gb, stride_gl, stride_gd,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_dkb, stride_dkl, stride_dkd,
    stride_dvb, stride_dvl, stride_dvd,
    stride_lse_b,
    length, qk_dim, v_dim, scale, qk_scale_log2,
    FIRST_CHUNK: tl.constexpr, COMPUTE_GRAD_K: tl.constexpr, NUM_DV_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one tile of compacted key rows of one sample; loops over query tiles.

    dV = Pᵀ·dO for V chunk ``FIRST_CHUNK + program_id(2)``; with ``COMPUTE_GRAD_K`` also
    dK = scale·dSᵀ·Q, dS = P∘(dP − delta), which needs dP over the full V width.
    """
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    chunk = FIRST_CHUNK + tl.program_id(2)
    num_keys = tl.load(k_count + batch)
    num_queries = tl.load(q_count + batch)
    # Keys that no query sees keep the zero gradient the caller allocated.
    if (tile * BLOCK_N >= num_keys) | (num_queries == 0):
        return

    key_slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = key_slots < num_keys
    cols = tl.load(k_index + batch * length + key_slots, mask=col_valid, other=0).to(tl.int64)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    grad_out_b = grad_out + batch * stride_gb
    q_b = q + batch * stride_qb
    v_b = v + batch * stride_vb
    k_tile = _load_rows(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                        stride_kd)
    v_tile = _load_rows(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd)

    acc_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_N, BLOCK_QK], dtype=tl.float32)
    for start in range(0, num_queries, BLOCK_M):
        slots = start + tl.arange(0, BLOCK_M)
        row_valid = slots < num_queries
        rows = tl.load(q_index + batch * length + slots, mask=row_valid, other=0).to(tl.int64)
        q_tile = _load_rows(q_b, rows, row_valid, stride_ql, qk_cols, qk_dim, stride_qd)
        d_out_tile = _load_rows(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd)
        # Every query row here has keys (num_keys > 0), so its lse is finite; padding rows
        # read +inf and get probability 0.
        row_lse = tl.load(lse + batch * stride_lse_b + rows, mask=row_valid, other=float("inf"))
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION) * qk_scale_log2
        probs = tl.exp2(scores - (row_lse * 1.4426950408889634)[:, None])
        probs = tl.where(col_valid[None, :], probs, 0.0)
        acc_v += tl.dot(tl.trans(probs.to(d_out_tile.dtype)), d_out_tile,
                        input_precision=INPUT_PRECISION)
        if COMPUTE_GRAD_K:
            row_delta = tl.load(delta + batch * length + slots, mask=row_valid, other=0.0)
            d_probs = _grad_probs(d_out_tile, v_tile, grad_out_b, v_b, rows, row_valid, cols,
                                  col_valid, stride_gl, stride_gd, stride_vl, stride_vd, v_dim,
                                  BLOCK_M, BLOCK_N, BLOCK_DV, NUM_DV_CHUNKS, INPUT_PRECISION)
            d_scores = probs * (d_probs - row_delta[:, None])
            acc_k += tl.dot(tl.trans(d_scores.to(q_tile.dtype)), q_tile,
                            input_precision=INPUT_PRECISION)

    v_pointers = (grad_v + batch * stride_dvb + cols[:, None] * stride_dvl
                  + v_cols[None, :] * stride_dvd)
    tl.store(v_pointers, acc_v.to(grad_v.dtype.element_ty),
             mask=col_valid[:, None] & (v_cols[None, :] < v_dim))
    if COMPUTE_GRAD_K:
        k_pointers = (grad_k + batch * stride_dkb + cols[:, None] * stride_dkl
                      + qk_cols[None, :] * stride_dkd)
        tl.store(k_pointers, (acc_k * scale).to(grad_k.dtype.element_ty),
                 mask=col_valid[:, None] & (qk_cols[None, :] < qk_dim))


@triton.jit
def _grad_q_kernel(
    grad_out, q, k, v, lse, delta, grad_q,
    q_index, q_count, k_index, k_count,
    stride_gb, stride_gl, stride_gd,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_dqb, stride_dql, stride_dqd,
    stride_lse_b,
    length, qk_dim, v_dim, scale, qk_scale_log2,
    NUM_DV_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_QK: tl.constexpr,
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program: one tile of compacted query rows; dQ = scale·dS·K over all key tiles."""
    tile = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_queries = tl.load(q_count + batch)
    num_keys = tl.load(k_count + batch)
    if (tile * BLOCK_M >= num_queries) | (num_keys == 0):
        return

    slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = slots < num_queries
    rows = tl.load(q_index + batch * length + slots, mask=row_valid, other=0).to(tl.int64)
    qk_cols = tl.arange(0, BLOCK_QK)
    v_cols = tl.arange(0, BLOCK_DV)
    grad_out_b = grad_out + batch * stride_gb
    k_b = k + batch * stride_kb
    v_b = v + batch * stride_vb
    q_tile = _load_rows(q + batch * stride_qb, rows, row_valid, stride_ql, qk_cols, qk_dim,
                        stride_qd)
    d_out_tile = _load_rows(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd)
    row_lse_log2 = tl.load(lse + batch * stride_lse_b + rows, mask=row_valid,
                           other=float("inf")) * 1.4426950408889634
    row_delta = tl.load(delta + batch * length + slots, mask=row_valid, other=0.0)

    acc_q = tl.zeros([BLOCK_M, BLOCK_QK], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_N):
        key_slots = start + tl.arange(0, BLOCK_N)
        col_valid = key_slots < num_keys
        cols = tl.load(k_index + batch * length + key_slots, mask=col_valid, other=0).to(tl.int64)
        k_tile = _load_rows(k_b, cols, col_valid, stride_kl, qk_cols, qk_dim, stride_kd)
        v_tile = _load_rows(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=INPUT_PRECISION) * qk_scale_log2
        probs = tl.exp2(scores - row_lse_log2[:, None])
        probs = tl.where(col_valid[None, :], probs, 0.0)
        d_probs = _grad_probs(d_out_tile, v_tile, grad_out_b, v_b, rows, row_valid, cols,
                              col_valid, stride_gl, stride_gd, stride_vl, stride_vd, v_dim,
                              BLOCK_M, BLOCK_N, BLOCK_DV, NUM_DV_CHUNKS, INPUT_PRECISION)
        d_scores = probs * (d_probs - row_delta[:, None])
        acc_q += tl.dot(d_scores.to(k_tile.dtype), k_tile, input_precision=INPUT_PRECISION)

    q_pointers = (grad_q + batch * stride_dqb + rows[:, None] * stride_dql
                  + qk_cols[None, :] * stride_dqd)
    tl.store(q_pointers, (acc_q * scale).to(grad_q.dtype.element_ty),
             mask=row_valid[:, None] & (qk_cols[None, :] < qk_dim))


# ----------------------------------------------------------------------------- launchers
def _partition(mask: Tensor) -> tuple[Tensor, Tensor]:
    # Through the registered op, so CUDA tensors use the compiled partition kernel when the
    # extension is built (dsa_ops.ops defines it before it imports this module).
    return torch.ops.dsa_ops.partition_indices(mask)


def forward(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
            scale: float) -> tuple[Tensor, Tensor]:
    """Fused forward: ``(out (B, L, Dv) in v.dtype, lse (B, L) float32)``.

    q, k ``(B, L, Dqk)``, v ``(B, L, Dv)`` with any strides; masks ``(B, L)`` bool.
    """
    batch, length, qk_dim = q.shape
    v_dim = v.shape[2]
    out = torch.zeros((batch, length, v_dim), dtype=v.dtype, device=v.device)
    lse = torch.full((batch, length), float("inf"), dtype=torch.float32, device=q.device)
    if batch == 0 or length == 0:
        return out, lse
    q_index, q_count = _partition(query_mask)
    k_index, k_count = _partition(key_mask)
    config = _block_config("forward", q.device, qk_dim, v_dim, q.dtype)
    grid = (triton.cdiv(length, config.block_m), batch, config.dv_chunks(int(v_dim)))
    torch.library.wrap_triton(_forward_kernel)[grid](
        q, k, v, out, lse,
        q_index, q_count, k_index, k_count,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), lse.stride(0),
        length, qk_dim, v_dim, scale * LOG2_E,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_QK=config.block_qk,
        BLOCK_DV=config.block_dv, INPUT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             query_mask: Tensor, key_mask: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fused, deterministic backward: ``(grad_q, grad_k, grad_v)`` shaped like q, k, v.

    ``out`` and ``lse`` are the forward's outputs; ``grad_out`` ``(B, L, Dv)`` any strides.
    Gradients are exactly zero outside the query rows (dQ) and key rows (dK, dV).
    """
    batch, length, qk_dim = q.shape
    v_dim = v.shape[2]
    grad_q = torch.zeros((batch, length, qk_dim), dtype=q.dtype, device=q.device)
    grad_k = torch.zeros((batch, length, qk_dim), dtype=k.dtype, device=k.device)
    grad_v = torch.zeros((batch, length, v_dim), dtype=v.dtype, device=v.device)
    if batch == 0 or length == 0:
        return grad_q, grad_k, grad_v
    q_index, q_count = _partition(query_mask)
    k_index, k_count = _partition(key_mask)
    config = _block_config("backward", q.device, qk_dim, v_dim, q.dtype)
    num_chunks = config.dv_chunks(int(v_dim))
    precision = _dot_precision(q.dtype)
    # delta in compacted order: slot s of sample b belongs to query row q_index[b, s].
    delta = torch.empty((batch, length), dtype=torch.float32, device=q.device)

    torch.library.wrap_triton(_delta_kernel)[(triton.cdiv(length, config.block_m), batch)](
        grad_out, out, delta, q_index, q_count,
        *grad_out.stride(), *out.stride(),
        length, v_dim,
        BLOCK_M=config.block_m, BLOCK_DV=config.block_dv,
    )
    common = (*grad_out.stride(), *q.stride(), *k.stride(), *v.stride())
    blocks = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_QK=config.block_qk,
                  BLOCK_DV=config.block_dv, INPUT_PRECISION=precision,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    key_tiles = triton.cdiv(length, config.block_n)
    # dK with dV of the first V chunk; the other chunks' dV need only P, not dP.
    launches = [(0, True, 1)]
    if num_chunks > 1:
        launches.append((1, False, num_chunks - 1))
    for first_chunk, compute_grad_k, chunks in launches:
        torch.library.wrap_triton(_grad_kv_kernel)[(key_tiles, batch, chunks)](
            grad_out, q, k, v, lse, delta, grad_k, grad_v,
            q_index, q_count, k_index, k_count,
            *common, *grad_k.stride(), *grad_v.stride(), lse.stride(0),
            length, qk_dim, v_dim, scale, scale * LOG2_E,
            FIRST_CHUNK=first_chunk, COMPUTE_GRAD_K=compute_grad_k, NUM_DV_CHUNKS=num_chunks,
            **blocks,
        )
    torch.library.wrap_triton(_grad_q_kernel)[(triton.cdiv(length, config.block_m), batch)](
        grad_out, q, k, v, lse, delta, grad_q,
        q_index, q_count, k_index, k_count,
        *common, *grad_q.stride(), lse.stride(0),
        length, qk_dim, v_dim, scale, scale * LOG2_E,
        NUM_DV_CHUNKS=num_chunks, **blocks,
    )
    return grad_q, grad_k, grad_v


# ============================================================================= attention KL
# KL(E_oracle‖E) per query row and its gradient (DESIGN §2, "Streaming oracle KL"), for
# dsa_ops.attention_kl's "triton" backend. Same structure as the attention kernels above:
# compacted query/key lists, gathered strided loads, float32 statistics in log2 units.
#
# * Forward, one program per tile of compacted query rows, one pass over key tiles: the
#   prediction keeps an online (max, sum) for lse; the oracle keeps its (max, sum) and
#   acc = Σ_j exp2(s°_j − max°)·(s°_j − s_j), rescaled like the attention accumulator, so
#   KL = ln2·(acc/sum° − lse°₂ + lse₂). The log-probabilities never go through log(p):
#   exact at any logit gap.
# * Backward, dS = g_i·(p_ij − p°_ij) from both saved lse's, one kernel launched twice:
#   dQ per query tile over key tiles, dK per key tile over query tiles (each output
#   written by one program: no atomics, deterministic).
# * Under the interpreter (CPU) tl.dot on bfloat16 is unreliable, so the operands are
#   converted to float32 there (DOT_FLOAT32); on GPUs 16-bit operands feed the tensor cores.
@dataclasses.dataclass(frozen=True)
class KLBlockConfig:
    """Tiles of the KL kernels: ``block_m`` query rows × ``block_n`` key rows, Dqk padded
    to ``block_qk`` (Dqk ≤ 64 is one tile)."""
    block_m: int
    block_n: int
    block_qk: int
    num_warps: int
    num_stages: int


def _kl_block_config(device: torch.device, qk_dim: int) -> KLBlockConfig:
    """Two (tile × Dqk) dots per tile pair in the forward, three in the backward, no V:
    64 × 64 tiles, 4 warps, 2 stages (compiled for sm_80 and sm_90 at Dqk 64: at most
    81 KiB of shared memory, float32); the interpreter uses 16 × 16."""
    block_qk = _padded(int(qk_dim))
    if device.type != "cuda":
        return KLBlockConfig(16, 16, block_qk, num_warps=1, num_stages=1)
    return KLBlockConfig(64, 64, block_qk, num_warps=4, num_stages=2)


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
    return (_load_rows(prediction, rows, valid, stride_pl, cols_d, qk_dim, stride_pd),
            _load_rows(oracle, rows, valid, stride_ol, cols_d, qk_dim, stride_od))


@triton.jit
def _kl_row_statistics(lse, lse_oracle, grad_kl, rows, valid, stride_gl):
    """Both lse's in log2 units and the incoming gradient of the rows (one sample's base
    pointers); padding rows read lse +inf and gradient 0, so their dS is 0."""
    lse2 = tl.load(lse + rows, mask=valid, other=float("inf")) * 1.4426950408889634
    oracle_lse2 = tl.load(lse_oracle + rows, mask=valid, other=float("inf")) * 1.4426950408889634
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
    ln2 = 0.6931471805599453
    out_offsets = batch * stride_out_b + rows
    tl.store(kl + out_offsets, (cross / oracle_sum - oracle_lse2 + row_lse2) * ln2, mask=row_valid)
    tl.store(lse + out_offsets, row_lse2 * ln2, mask=row_valid)
    tl.store(lse_oracle + out_offsets, oracle_lse2 * ln2, mask=row_valid)


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
    config = _kl_block_config(q.device, q.shape[2])
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_QK=config.block_qk,
                INPUT_PRECISION=_dot_precision(q.dtype),
                DOT_FLOAT32=q.device.type != "cuda" and q.dtype == torch.bfloat16,
                num_warps=config.num_warps, num_stages=config.num_stages)


def attention_kl_forward(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor,
                         query_mask: Tensor, key_mask: Tensor,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(kl, lse, lse_oracle)``, each ``(B, L)`` float32; inputs ``(B, L, Dqk)`` any strides."""
    batch, length, qk_dim = q.shape
    kl = torch.zeros((batch, length), dtype=torch.float32, device=q.device)
    lse = torch.full((batch, length), float("inf"), dtype=torch.float32, device=q.device)
    lse_oracle = torch.full_like(lse, float("inf"))
    if batch == 0 or length == 0:
        return kl, lse, lse_oracle
    q_index, q_count = _partition(query_mask)
    k_index, k_count = _partition(key_mask)
    options = _kl_launch_options(q)
    grid = (triton.cdiv(length, options["BLOCK_M"]), batch)
    torch.library.wrap_triton(_kl_forward_kernel)[grid](
        q, k, q_oracle, k_oracle, kl, lse, lse_oracle,
        q_index, q_count, k_index, k_count,
        *q.stride(), *k.stride(), *q_oracle.stride(), *k_oracle.stride(), kl.stride(0),
        length, qk_dim, scale * LOG2_E, **options)
    return kl, lse, lse_oracle


def attention_kl_backward(grad_kl: Tensor, q: Tensor, k: Tensor, q_oracle: Tensor,
                          k_oracle: Tensor, lse: Tensor, lse_oracle: Tensor,
                          query_mask: Tensor, key_mask: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    """``(grad_q, grad_k)`` shaped like q, k; ``grad_kl`` ``(B, L)`` any strides; lse's
    from the forward (contiguous, as it allocates them)."""
    batch, length, qk_dim = q.shape
    grad_q = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    if batch == 0 or length == 0:
        return grad_q, grad_k
    q_index, q_count = _partition(query_mask)
    k_index, k_count = _partition(key_mask)
    options = _kl_launch_options(q)
    inputs = (grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle)
    strides = (*grad_kl.stride(), *q.stride(), *k.stride(), *q_oracle.stride(),
               *k_oracle.stride(), lse.stride(0))
    indices = (q_index, q_count, k_index, k_count)
    for grad_k_pass, grad, block in ((False, grad_q, options["BLOCK_M"]),
                                     (True, grad_k, options["BLOCK_N"])):
        torch.library.wrap_triton(_kl_backward_kernel)[(triton.cdiv(length, block), batch)](
            *inputs, grad, *indices, *strides, *grad.stride(),
            length, qk_dim, scale, scale * LOG2_E, GRAD_K=grad_k_pass, **options)
    return grad_q, grad_k
