"""Triton helpers shared by every op's kernels: tile tables, device checks, gathers.

The launch decisions live here, in one place for all ops: the block-size tables of the
masked-attention passes (``block_config``) and of the attention-KL kernels
(``kl_block_config``), which GPUs the tables serve (``unsupported_device_reason``), the
float32 matmul precision (``dot_precision``), and the strided row gather every kernel
loads its tiles with (``gather``). See docs/design.md §2 for the algorithms.

Block sizes come from fixed, documented tables rather than autotuning: launches stay
deterministic and cheap to trace under ``torch.compile``. Under the Triton interpreter
(CPU tensors, ``TRITON_INTERPRET=1``) small fixed tiles keep the tests fast;
``capability`` decides which table applies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Optional

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


def wrap_triton(kernel):
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


def padded(size: int) -> int:
    return max(_MIN_DOT_SIZE, triton.next_power_of_2(size))


@functools.lru_cache(maxsize=None)
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def capability(device: torch.device) -> Optional[tuple[int, int]]:
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


def block_config(pass_name: str, capability: Optional[tuple[int, int]], qk_dim: int,
                  v_dim: int, dtype: torch.dtype, precision: str) -> BlockConfig:
    """Tiles of ``pass_name`` ("forward", "grad_kv", "grad_q") from ``_GPU_TABLE``.

    The V chunk is ``next_pow2(Dv)`` (at least the table's smallest entry); wider V is
    split (``_SPLIT_TABLE`` or the widest entry); Dqk ≤ 64 always fits one tile.
    ``capability`` None (the interpreter) gives 16-wide tiles with 64-wide V chunks: fast, and still multi-tile at L ≈ 35..100.
    """
    # Head sizes pick the tile shapes (constexprs), so they are specialised even when
    # torch.compile traces with symbolic shapes; B and L stay symbolic in the grid.
    qk_dim, v_dim = int(qk_dim), int(v_dim)
    block_qk = padded(qk_dim)
    if capability is None:
        return BlockConfig(16, 16, block_qk, min(padded(v_dim), 64), num_warps=1, num_stages=1)
    key = (pass_name, _operands(dtype, precision))
    by_chunk = _GPU_TABLE[key]
    block_dv = max(padded(v_dim), min(by_chunk))
    if block_dv in by_chunk:
        block_m, block_n, num_warps, num_stages = by_chunk[block_dv]
    elif key in _SPLIT_TABLE:
        block_dv, (block_m, block_n, num_warps, num_stages) = _SPLIT_TABLE[key]
    else:
        block_dv = max(by_chunk)
        block_m, block_n, num_warps, num_stages = by_chunk[block_dv]
    return BlockConfig(block_m, block_n, block_qk, block_dv, num_warps, num_stages)


def dot_precision(dtype: torch.dtype) -> str:
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
def gather(base, rows, row_valid, stride_row, cols, num_cols, stride_col,
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


# ----------------------------------------------------------------------------- launches
def tiles(batch: int, length: int, block: int) -> int:
    """Programs on grid axis 0 for ``batch`` samples of ``cdiv(length, block)`` tiles."""
    programs = batch * triton.cdiv(length, block)
    if isinstance(programs, int) and programs > _MAX_GRID_X:
        raise ValueError(f"batch × cdiv(L, {block}) = {programs} programs exceed the grid limit "
                         f"{_MAX_GRID_X}; split the batch (B = {batch}, L = {length})")
    return programs


def device_guard(t: Tensor):
    """Launch on the tensors' device, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- KL tiles
@dataclasses.dataclass(frozen=True)
class KLBlockConfig:
    """Tiles of the KL kernels: ``block_m`` query rows × ``block_n`` key rows, Dqk padded
    to ``block_qk`` (Dqk ≤ 64 is one tile)."""
    block_m: int
    block_n: int
    block_qk: int
    num_warps: int
    num_stages: int


def kl_block_config(device: torch.device, qk_dim: int) -> KLBlockConfig:
    """Tiles of the attention-KL kernels. Two (tile × Dqk) dots per tile pair in the forward, three in the backward, no V:
    64 × 64 tiles, 4 warps, 2 stages (compiled for sm_80 and sm_90 at Dqk 64: at most
    81 KiB of shared memory, float32); the interpreter uses 16 × 16."""
    block_qk = padded(int(qk_dim))
    if device.type != "cuda":
        return KLBlockConfig(16, 16, block_qk, num_warps=1, num_stages=1)
    return KLBlockConfig(64, 64, block_qk, num_warps=4, num_stages=2)

