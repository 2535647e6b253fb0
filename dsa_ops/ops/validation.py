"""Input checks of the public op functions: one line naming the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

from dsa_ops.ops.registry import FLOAT_DTYPES

Tensor = torch.Tensor


def _describe(t: Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {tuple(t.shape)}"


def validate_inputs(q, k, v, query_mask, key_mask, scale) -> None:
    """Raise TypeError/ValueError naming the argument and what was expected."""
    for name, t in (("q", q), ("k", k), ("v", v), ("query_mask", query_mask), ("key_mask", key_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    for name, t, last in (("q", q, "Dqk"), ("k", k, "Dqk"), ("v", v, "Dv")):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (B, L, {last}); got a {_describe(t)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}")
    batch, length, qk_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have shape (B, L, Dqk) = {tuple(q.shape)} like q; got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have shape (B, L, Dv) with (B, L) = {(batch, length)} like q; "
                         f"got {tuple(v.shape)}")
    if qk_dim == 0 or v.shape[2] == 0:
        raise ValueError(f"Dqk and Dv must be positive; got q {tuple(q.shape)} and v {tuple(v.shape)}")
    for name, mask in (("query_mask", query_mask), ("key_mask", key_mask)):
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor of shape (B, L); got dtype {mask.dtype}")
        if mask.shape != (batch, length):
            raise ValueError(f"{name} must have shape (B, L) = {(batch, length)}; got {tuple(mask.shape)}")
    for name, t in (("k", k), ("v", v), ("query_mask", query_mask), ("key_mask", key_mask)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; "
                             f"all inputs must be on one device")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")

