"""Triton kernels for masked attention: fused forward and backward (the "triton" backend).

These functions know nothing of autograd or validation: ``dsa_ops.ops`` registers
``forward``/``backward`` (one attention) and ``dual_forward``/``dual_backward`` (the two
DSA branches) as ``torch.library.triton_op``s, validates inputs and wires the backward
ops into autograd. Semantics are those of ``dsa_ops.reference``.

How it works (flash-attention style, DESIGN §2):

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

Block sizes come from a fixed, documented table (``_block_config``) rather than
autotuning: launches stay deterministic and cheap to trace under ``torch.compile``.
Under the Triton interpreter (CPU tensors, ``TRITON_INTERPRET=1``) small fixed tiles
keep the tests fast; ``_capability`` decides which table applies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

LOG2_E = tl.constexpr(math.log2(math.e))
LN_2 = tl.constexpr(math.log(2.0))
# tl.dot needs every dimension to be at least 16.
_MIN_DOT_SIZE = 16
# The most shared memory any launch of the GPU table may need per block (checked by
# tests/test_triton_compile.py on sm_80 and sm_90). GPUs that cannot give a block this
# much (sm_75: 64 KiB; sm_86/sm_89 give 99 KiB) are not served: "auto" skips Triton
# there with the reason.
SHARED_MEMORY_PER_BLOCK = 96 * 1024
MIN_CAPABILITY = (8, 0)
# Grid axis 0 holds batch × tiles; its limit is 2³¹ − 1 programs.
_MAX_GRID_X = 2 ** 31 - 1


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


def _wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` (traceable by ``torch.compile``). Under the
    interpreter (``TRITON_INTERPRET=1``) ``triton.jit`` gives an ``InterpretedFunction``,
    which newer torch returns unwrapped and torch 2.11 rejects: launch it directly."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if isinstance(kernel, (JITFunction, Autotuner)):
            raise
        return kernel


def _padded(size: int) -> int:
    return max(_MIN_DOT_SIZE, triton.next_power_of_2(size))


@functools.lru_cache(maxsize=None)
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The GPU generation the tile table is chosen for; None under the interpreter."""
    if device.type != "cuda":
        return None
    return _compute_capability(device.index if device.index is not None
                               else torch.cuda.current_device())


def unsupported_device_reason(device: torch.device) -> Optional[str]:
    """Why the GPU table cannot run on this CUDA device, or None."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _compute_capability(index)
    properties = torch.cuda.get_device_properties(index)
    shared = getattr(properties, "shared_memory_per_block_optin", SHARED_MEMORY_PER_BLOCK)
    if capability < MIN_CAPABILITY or shared < SHARED_MEMORY_PER_BLOCK:
        return (f"the Triton kernels need compute capability >= 8.0 and "
                f"{SHARED_MEMORY_PER_BLOCK // 1024} KiB of shared memory per block; "
                f"{properties.name} is sm_{capability[0]}{capability[1]} with "
                f"{shared // 1024} KiB")
    return None


# (pass, operands) → {V chunk width: (block_m, block_n, warps, stages)}. Operands:
# "16bit" (tensor cores), "tf32" (tensor cores, float32 in shared memory; also tf32x3),
# "ieee" (float32 products on the FMA units). A V wider than the widest chunk runs in
# chunks of that width, or as _SPLIT_TABLE says where streaming the other chunks (dK
# needs dP over the full width) costs registers. Every entry was compiled for sm_80 and
# sm_90 on the paper shapes: no spills for 16-bit and IEEE kernels, shared memory below
# SHARED_MEMORY_PER_BLOCK (tests/test_triton_compile.py).
_GPU_TABLE = {
    ("forward", "16bit"): {64: (64, 64, 4, 3), 128: (64, 64, 4, 2), 256: (64, 32, 8, 2)},
    ("forward", "tf32"): {64: (32, 32, 4, 2)},
    ("forward", "ieee"): {64: (32, 32, 4, 1)},
    # The tutorial's dK/dV shape: 128 key rows per program; the query tiles shrink as the
    # resident dV accumulator grows.
    ("grad_kv", "16bit"): {64: (32, 128, 4, 2), 128: (16, 128, 8, 2)},
    ("grad_kv", "tf32"): {32: (16, 32, 4, 1)},
    ("grad_kv", "ieee"): {32: (16, 64, 4, 1)},
    ("grad_q", "16bit"): {64: (64, 32, 4, 2), 128: (64, 32, 8, 2)},
    ("grad_q", "tf32"): {32: (32, 32, 4, 1)},
    ("grad_q", "ieee"): {32: (16, 32, 4, 1)},
}
_SPLIT_TABLE = {
    ("grad_kv", "16bit"): (64, (16, 128, 8, 2)),
}


def _operands(dtype: torch.dtype, precision: str) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if precision == "ieee" else "tf32"


def _block_config(pass_name: str, capability: Optional[tuple[int, int]], qk_dim: int,
                  v_dim: int, dtype: torch.dtype, precision: str) -> BlockConfig:
    """Tiles of ``pass_name`` ("forward", "grad_kv", "grad_q") from ``_GPU_TABLE``.

    The V chunk is ``next_pow2(Dv)`` (at least the table's smallest entry); wider V is
    split (``_SPLIT_TABLE`` or the widest entry); Dqk ≤ 64 always fits one tile.
    ``capability`` None (the interpreter) gives 16-wide tiles with 64-wide V chunks: fast, and still multi-tile at L ≈ 35..100.
    """
    # Head sizes pick the tile shapes (constexprs), so they are specialised even when
    # torch.compile traces with symbolic shapes; B and L stay symbolic in the grid.
    qk_dim, v_dim = int(qk_dim), int(v_dim)
    block_qk = _padded(qk_dim)
    if capability is None:
        return BlockConfig(16, 16, block_qk, min(_padded(v_dim), 64), num_warps=1, num_stages=1)
    key = (pass_name, _operands(dtype, precision))
    by_chunk = _GPU_TABLE[key]
    block_dv = max(_padded(v_dim), min(by_chunk))
    if block_dv in by_chunk:
        block_m, block_n, num_warps, num_stages = by_chunk[block_dv]
    elif key in _SPLIT_TABLE:
        block_dv, (block_m, block_n, num_warps, num_stages) = _SPLIT_TABLE[key]
    else:
        block_dv = max(by_chunk)
        block_m, block_n, num_warps, num_stages = by_chunk[block_dv]
    return BlockConfig(block_m, block_n, block_qk, block_dv, num_warps, num_stages)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for float32 from PyTorch's float32 matmul setting:
    "highest" → "ieee", "high" → "tf32x3", "medium" → "tf32"."""
    if dtype != torch.float32:
        return "ieee"  # ignored for 16-bit operands
    try:
        setting = torch.get_float32_matmul_precision()
    except RuntimeError:
        # torch >= 2.9 refuses the global query once the legacy and per-backend APIs were
        # mixed; the CUDA matmul setting is then the one that applies.
        setting = "medium" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[setting]


# ----------------------------------------------------------------------------- kernel helpers
@triton.jit
def _gather(base, rows, row_valid, stride_row, cols, num_cols, stride_col,
            ROWS_UNIT_STRIDE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Gather rows × cols of a strided tensor (``TRANSPOSED``: as cols × rows); padding
    reads 0. The pointer tile runs along the unit-stride dimension, so neighbouring
    threads read neighbouring addresses whichever of rows or channels is unit-stride."""
    if ROWS_UNIT_STRIDE:
        tile = tl.load(base + cols[:, None] * stride_col + rows[None, :] * stride_row,
                       mask=(cols[:, None] < num_cols) & row_valid[None, :], other=0.0)
        if not TRANSPOSED:
            tile = tl.trans(tile)
    else:
        tile = tl.load(base + rows[:, None] * stride_row + cols[None, :] * stride_col,
                       mask=row_valid[:, None] & (cols[None, :] < num_cols), other=0.0)
        if TRANSPOSED:
            tile = tl.trans(tile)
    return tile


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
    q_tile = _gather(q + batch * stride_qb, rows, has_output, stride_ql, qk_cols, qk_dim,
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
        k_tile = _gather(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                         stride_kd, ROWS_UNIT_STRIDE_K, True)
        v_tile = _gather(v + batch * stride_vb, cols, col_valid, stride_vl, v_cols, v_dim,
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
        d_out = _gather(grad_out + batch * stride_gb, rows, row_valid, stride_gl, cols, v_dim,
                        stride_gd, ROWS_UNIT_STRIDE_G, False).to(tl.float32)
        o = _gather(out + batch * stride_ob, rows, row_valid, stride_ol, cols, v_dim,
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
            v_chunk = _gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
                              ROWS_UNIT_STRIDE_V, False)
            d_out_chunk = _gather(d_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
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
    BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    # K as Kᵀ and Q as rows, the forward's operands, so that S = Q·Kᵀ rounds exactly as in
    # the forward (see the scores below).
    k_t = _gather(k + batch * stride_kb, cols, col_valid, stride_kl, qk_cols, qk_dim,
                  stride_kd, ROWS_UNIT_STRIDE_K, True)
    v_tile = _gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
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
        q_tile = _gather(q_b, rows, row_valid, stride_ql, qk_cols, qk_dim, stride_qd,
                         ROWS_UNIT_STRIDE_Q, False)
        d_out_tile = _gather(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
                             ROWS_UNIT_STRIDE_G, False)
        # Every query row here has keys (num_keys > 0), so its lse is finite; padding rows
        # read +inf and get probability 0.
        row_lse = tl.load(lse + batch * stride_lse_b + rows, mask=row_valid, other=float("inf"))
        # P = exp(S − lse) is normalised only if S rounds exactly as in the forward, which
        # computed lse from it: at |S| ~ 1000 a one-ulp difference shifts a whole row of P
        # by ~1e-4. So S = Q·Kᵀ from the forward's operands, transposed afterwards; Kᵀ·Qᵀ
        # sums the same products in another order on some BLAS kernels (OpenBLAS's Haswell
        # sgemm under the interpreter: dV 25× the float32 reference's error).
        scores = tl.dot(q_tile, k_t, input_precision=INPUT_PRECISION) * scale
        probs_t = tl.where(col_valid[:, None], _exp(tl.trans(scores) - row_lse[None, :]), 0.0)
        acc_v += tl.dot(probs_t.to(d_out_tile.dtype), d_out_tile, input_precision=INPUT_PRECISION)
        if computes_grad_k:
            row_delta = tl.load(delta_b + slots, mask=row_valid, other=0.0)
            d_probs_t = _grad_probs_t(v_tile, tl.trans(d_out_tile), v_b, grad_out_b, cols,
                                      col_valid, rows, row_valid, stride_vl, stride_vd,
                                      stride_gl, stride_gd, v_dim, ROWS_UNIT_STRIDE_V,
                                      ROWS_UNIT_STRIDE_G, BLOCK_N, BLOCK_M, BLOCK_DV,
                                      NUM_DV_CHUNKS, INPUT_PRECISION)
            d_scores_t = probs_t * (d_probs_t - row_delta[None, :])
            acc_k += tl.dot(d_scores_t.to(q_tile.dtype), q_tile, input_precision=INPUT_PRECISION)

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
    q_tile = _gather(q + batch * stride_qb, rows, row_valid, stride_ql, qk_cols, qk_dim,
                     stride_qd, ROWS_UNIT_STRIDE_Q, False)
    d_out_t = _gather(grad_out_b, rows, row_valid, stride_gl, v_cols, v_dim, stride_gd,
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
        k_tile = _gather(k_b, cols, col_valid, stride_kl, qk_cols, qk_dim, stride_kd,
                         ROWS_UNIT_STRIDE_K, False)
        v_tile = _gather(v_b, cols, col_valid, stride_vl, v_cols, v_dim, stride_vd,
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
    with _device_guard(mask):
        _wrap_triton(_partition_kernel)[(batch,)](
            flags, index, count, length, *flags.stride(), BLOCK=_PARTITION_BLOCK)
    return index, count


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
    return Lists(*partition_indices(query_mask), *partition_indices(key_mask))


def dual_lists(foreground: Tensor) -> Lists:
    return Lists(*partition_indices(foreground))


def _rows_unit_stride(t: Tensor) -> bool:
    """Whether ``t (B, L, D)`` has unit-stride rows and strided channels (a conv output)."""
    return t.stride(1) == 1 and t.shape[2] > 1 and t.stride(2) != 1


def _same_strides(*pairs: tuple[Tensor, Tensor]) -> bool:
    return all(a.stride() == b.stride() for a, b in pairs)


def _tiles(batch: int, length: int, block: int) -> int:
    programs = batch * triton.cdiv(length, block)
    if isinstance(programs, int) and programs > _MAX_GRID_X:
        raise ValueError(f"batch × cdiv(L, {block}) = {programs} programs exceed the grid limit "
                         f"{_MAX_GRID_X}; split the batch (B = {batch}, L = {length})")
    return programs


def _device_guard(t: Tensor):
    """Launch on the tensors' device, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


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
    precision = _dot_precision(q.dtype)
    config = _block_config("forward", _capability(q.device), qk_dim, v_dim, q.dtype, precision)
    out, lse = results[0]
    grid = (_tiles(batch, length, config.block_m), config.dv_chunks(int(v_dim)), len(branches))
    with _device_guard(q):
        _wrap_triton(_forward_kernel)[grid](
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
    precision = _dot_precision(q.dtype)
    capability = _capability(q.device)
    kv_config = _block_config("grad_kv", capability, qk_dim, v_dim, q.dtype, precision)
    q_config = _block_config("grad_q", capability, qk_dim, v_dim, q.dtype, precision)
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
    with _device_guard(q):
        _wrap_triton(_delta_kernel)[
            (_tiles(batch, length, kv_config.block_m), num_branches)](
            grad_out, out, inputs1[0], inputs1[4], delta, lists.q_index, lists.q_count,
            *grad_out.stride(), *out.stride(), length, v_dim,
            TWO_BRANCHES=num_branches == 2, ROWS_UNIT_STRIDE_G=layout["ROWS_UNIT_STRIDE_G"],
            BLOCK_M=kv_config.block_m, BLOCK_DV=q_config.block_dv,
        )
        num_chunks = kv_config.dv_chunks(int(v_dim))
        _wrap_triton(_grad_kv_kernel)[
            (_tiles(batch, length, kv_config.block_n), num_chunks * num_branches)](
            grad_out, q, k, v, lse, grad_k, grad_v,
            *inputs1[:4], inputs1[5], *grads1[1:],
            delta, *lists.args(), *strides, *grad_k.stride(), *grad_v.stride(), lse.stride(0),
            length, qk_dim, v_dim, scale, num_chunks, first_branch,
            **flags, **layout, NUM_DV_CHUNKS=num_chunks,
            BLOCK_M=kv_config.block_m, BLOCK_N=kv_config.block_n, BLOCK_QK=kv_config.block_qk,
            BLOCK_DV=kv_config.block_dv,
            num_warps=kv_config.num_warps, num_stages=kv_config.num_stages,
        )
        _wrap_triton(_grad_q_kernel)[
            (_tiles(batch, length, q_config.block_m), num_branches)](
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
    return (_gather(prediction, rows, valid, stride_pl, cols_d, qk_dim, stride_pd, False, False),
            _gather(oracle, rows, valid, stride_ol, cols_d, qk_dim, stride_od, False, False))


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
    q_index, q_count = partition_indices(query_mask)
    k_index, k_count = partition_indices(key_mask)
    options = _kl_launch_options(q)
    grid = (triton.cdiv(length, options["BLOCK_M"]), batch)
    _wrap_triton(_kl_forward_kernel)[grid](
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
    q_index, q_count = partition_indices(query_mask)
    k_index, k_count = partition_indices(key_mask)
    options = _kl_launch_options(q)
    inputs = (grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle)
    strides = (*grad_kl.stride(), *q.stride(), *k.stride(), *q_oracle.stride(),
               *k_oracle.stride(), lse.stride(0))
    indices = (q_index, q_count, k_index, k_count)
    for grad_k_pass, grad, block in ((False, grad_q, options["BLOCK_M"]),
                                     (True, grad_k, options["BLOCK_N"])):
        _wrap_triton(_kl_backward_kernel)[(triton.cdiv(length, block), batch)](
            *inputs, grad, *indices, *strides, *grad.stride(),
            length, qk_dim, scale, scale * LOG2_E, GRAD_K=grad_k_pass, **options)
    return grad_q, grad_k
