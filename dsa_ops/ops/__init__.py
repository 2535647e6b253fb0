"""The ops of ``dsa_ops``, one package per op family, and what they share.

    registry          Backend, resolution, ``register_op_family`` (every family uses it)
    validation        the public functions' input checks
    cuda              the cuda backend: kernels loaded?, shared memory they need
    triton_common     Triton helpers: tile tables, device checks, strided gathers
    partition/        partition_indices (reference, triton; CUDA kernel in csrc/)
    masked_attention/ masked attention (op) and both DSA branches at once (dual)
    attention_kl/     the streaming oracle KL

Importing this package defines every op (``torch.ops.dsa_ops.*``) and loads the CUDA
kernels. The names below are the ones tests, benchmarks and the module use; the op
functions themselves are on ``dsa_ops`` (``dsa_ops.masked_attention`` etc.).
"""
from dsa_ops.ops.partition.op import partition_indices  # noqa: I001  (defines ops in order)
from dsa_ops.ops.masked_attention.op import (
    MaskedAttentionFunction,
    available_backends,
    backend_unavailable_reason,
    get_backend,
    resolve_backend,
)
from dsa_ops.ops.masked_attention.dual import dual_masked_attention
from dsa_ops.ops.attention_kl.op import (
    KL_BACKENDS,
    get_kl_backend,
    resolve_kl_backend,
)
from dsa_ops.ops.registry import (
    BACKENDS,
    FLOAT_DTYPES,
    FUSED_DTYPES,
    FUSED_QK_DIMS,
    FUSED_V_DIMS,
    Backend,
)

__all__ = [
    "BACKENDS", "Backend", "FLOAT_DTYPES", "FUSED_DTYPES", "FUSED_QK_DIMS", "FUSED_V_DIMS",
    "KL_BACKENDS", "MaskedAttentionFunction", "available_backends", "backend_unavailable_reason",
    "dual_masked_attention", "get_backend", "get_kl_backend", "partition_indices",
    "resolve_backend", "resolve_kl_backend",
]
