"""Test-harness fix for the Triton interpreter's bfloat16 ``tl.dot``.

The interpreter stores bfloat16 as raw uint16 bits (NumPy has no bfloat16) and its
``tl.dot`` multiplies those bits as integers. ``install_bfloat16_dot`` wraps the
interpreter's dot so that bfloat16 operands are first widened to float32 (exact), which is
what a GPU's bfloat16 MMA computes (exact products, float32 accumulation). Everything else
(loads, stores, casts to bfloat16, the softmax) still runs the interpreter's own code, so
bfloat16 kernels are tested under the interpreter without touching the kernels.
"""
from __future__ import annotations

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
