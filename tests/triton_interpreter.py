"""Test-harness dots for the Triton interpreter: a bfloat16 fix and an orientation-sensitive dot.

The interpreter stores bfloat16 as raw uint16 bits (NumPy has no bfloat16) and its
``tl.dot`` multiplies those bits as integers. ``install_bfloat16_dot`` wraps the
interpreter's dot so that bfloat16 operands are first widened to float32 (exact), which is
what a GPU's bfloat16 MMA computes (exact products, float32 accumulation). Everything else
(loads, stores, casts to bfloat16, the softmax) still runs the interpreter's own code, so
bfloat16 kernels are tested under the interpreter without touching the kernels.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import numpy as np


@functools.lru_cache(maxsize=None)
def install_bfloat16_dot() -> Optional[str]:
    """Patch the interpreter once; returns None, or why this Triton cannot be patched."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        builder = interpreter.InterpreterBuilder
        original = builder.create_dot
        widen = interpreter._convert_float
        handle = interpreter.TensorHandle
    except (ImportError, AttributeError) as error:
        return f"this Triton's interpreter has no patchable create_dot ({error})"

    def as_float32(operand):
        if operand.dtype.scalar != tl.bfloat16:
            return operand
        return handle(widen(operand.data, tl.bfloat16, tl.float32, None).view(np.float32),
                      tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_float32(a), as_float32(b), d, input_precision,
                        max_num_imprecise_acc)

    builder.create_dot = create_dot
    return None


@contextlib.contextmanager
def orientation_sensitive_dot():
    """Within the block, the interpreter's ``tl.dot(a, b)`` sums the odd rows of ``a`` over K
    in reverse order: a legal float32 dot whose rounding of element (i, j) depends on which
    operand is ``a``, so ``dot(a, b)`` and ``dot(bᵀ, aᵀ)ᵀ`` differ in the last bits.

    BLAS kernels do this (OpenBLAS's Haswell sgemm does; its SkylakeX kernel happens not to),
    and so may a GPU's tile layout. A kernel that recomputes a value in the other orientation
    and relies on it rounding as before (the backward's P = exp(S − lse)) then fails on
    every machine under this dot, not only on the CPUs whose BLAS differs.
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    installed = builder.create_dot  # the harness's bfloat16 dot, when installed

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        straight = installed(self, a, b, d, input_precision, max_num_imprecise_acc)
        reverse = lambda handle, axis: interpreter.TensorHandle(  # noqa: E731
            np.ascontiguousarray(np.flip(handle.data, axis)), handle.dtype.scalar)
        reversed_k = installed(self, reverse(a, -1), reverse(b, -2), d, input_precision,
                               max_num_imprecise_acc)
        odd_rows = (np.arange(straight.data.shape[-2]) % 2 == 1)[:, None]
        return interpreter.TensorHandle(np.where(odd_rows, reversed_k.data, straight.data),
                                        straight.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = installed



@functools.lru_cache(maxsize=None)
def install_boolean_masks() -> Optional[str]:
    """Hand the interpreter's loads and stores their masks as NumPy bool; returns None, or
    why this Triton cannot be patched.

    The interpreter labels a comparison with its operands' type and keeps whatever NumPy
    type the arithmetic gave (``(slots < n) & (n > 0)`` arrives as int32 data). Triton 3.9's
    native load and store reject such masks ("mask has unsupported dtype"; 3.8 and earlier
    took them). Compiled kernels are not affected; nonzero means true, as on a GPU.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        builder = interpreter.InterpreterBuilder
        load, store = builder.create_masked_load, builder.create_masked_store
    except (ImportError, AttributeError) as error:
        return f"this Triton's interpreter has no patchable masked load/store ({error})"

    def boolean(mask):
        if mask.data.dtype == np.bool_:
            return mask
        return interpreter.TensorHandle(mask.data.astype(np.bool_), tl.int1)

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        return load(self, ptrs, boolean(mask), other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return store(self, ptrs, value, boolean(mask), *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    return None
