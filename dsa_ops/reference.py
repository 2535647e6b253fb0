"""Every op's reference (plain PyTorch) implementation, in one namespace.

The definitions live beside their ops: ``dsa_ops.ops.masked_attention.reference``,
``dsa_ops.ops.attention_kl.reference`` and ``dsa_ops.ops.partition.reference``; this
module gathers them for tests and benchmarks that compare against "the reference".
"""
from dsa_ops.ops.attention_kl.reference import (  # noqa: F401
    KL_QUERY_TILE,
    attention_kl_backward,
    attention_kl_forward,
    attention_kl_grad_scores,
    attention_kl_tile,
    query_tiles,
)
from dsa_ops.ops.masked_attention.reference import (  # noqa: F401
    accumulation_dtype,
    attention_probs,
    backward,
    forward,
)
from dsa_ops.ops.partition.reference import partition_indices  # noqa: F401
