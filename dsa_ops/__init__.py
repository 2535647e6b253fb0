"""dsa_ops: fused masked attention and the Dual Spatial Attention module.

    out = dsa_ops.masked_attention(q, k, v, query_mask, key_mask, scale=1.0, backend="auto")
    kl = dsa_ops.attention_kl(q, k, q_oracle, k_oracle, query_mask, key_mask)  # (B, L)
    dsa = dsa_ops.DualSpatialAttention(channels)

See README.md and docs/design.md §2–3 for semantics and shapes. The ops live in
``dsa_ops.ops`` (one package per op); the names below are the public API.
"""
from dsa_ops.ops import (
    BACKENDS,
    KL_BACKENDS,
    MaskedAttentionFunction,
    available_backends,
    backend_unavailable_reason,
    dual_masked_attention,
    partition_indices,
)
# The op packages dsa_ops.ops.masked_attention / .attention_kl are one level down, so
# these names on dsa_ops are always the functions, whatever submodule is imported later.
from dsa_ops.ops.attention_kl.op import attention_kl
from dsa_ops.ops.masked_attention.op import masked_attention
from dsa_ops.modules import DualSpatialAttention, reduce_hole_mask

__all__ = [
    "BACKENDS",
    "DualSpatialAttention",
    "KL_BACKENDS",
    "MaskedAttentionFunction",
    "attention_kl",
    "available_backends",
    "backend_unavailable_reason",
    "dual_masked_attention",
    "masked_attention",
    "partition_indices",
    "reduce_hole_mask",
]
__version__ = "0.1.0"
