"""The attention-KL op: schema, fake impls, autograd, backends and the public function.

The streaming oracle KL (docs/design.md §2): KL(E_oracle‖E) per query row from the q, k
of two passes, with no L×L map. Like masked attention, each backend is one forward and
one backward op with these schemas, sharing the fake impls and the autograd formula::

    dsa_ops::attention_kl_fwd_<backend>(q, k, q_oracle, k_oracle, query_mask, key_mask,
        scale) -> (kl, lse, lse_oracle, query_index, query_count, key_index, key_count)
    dsa_ops::attention_kl_bwd_<backend>(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle,
        query_mask, key_mask, query_index, query_count, key_index, key_count, scale)
        -> (grad_q, grad_k)

The forward's partitions of the masks travel to the backward (saved by autograd), so a
step partitions each mask once. ``reference`` (every device) is ``reference.py``,
``cpu`` (compacted rows) ``cpu.py``, ``triton`` a ``triton_op`` around ``triton.py``;
``cuda`` gets its kernels from ``csrc/attention_kl/`` and reports itself unavailable where
the loaded library lacks them. The oracle is a constant target: the backward op gives no
gradient for it.
"""
from __future__ import annotations

from typing import Optional

import torch

from dsa_ops.ops import cuda, registry
from dsa_ops.ops.attention_kl import cpu, reference
from dsa_ops.ops.partition.op import fake_partition
from dsa_ops.ops.partition.reference import partition_indices
from dsa_ops.ops.registry import Backend
from dsa_ops.ops.validation import validate_inputs

Tensor = torch.Tensor

FAMILY = "attention_kl"
FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor q_oracle, Tensor k_oracle, Tensor query_mask,"
                  " Tensor key_mask, float scale) -> (Tensor kl, Tensor lse, Tensor lse_oracle,"
                  " Tensor query_index, Tensor query_count, Tensor key_index, Tensor key_count)")
BACKWARD_SCHEMA = ("(Tensor grad_kl, Tensor q, Tensor k, Tensor q_oracle, Tensor k_oracle,"
                   " Tensor lse, Tensor lse_oracle, Tensor query_mask, Tensor key_mask,"
                   " Tensor query_index, Tensor query_count, Tensor key_index, Tensor key_count,"
                   " float scale) -> (Tensor grad_q, Tensor grad_k)")
KL_BACKENDS = registry.BACKENDS


def _fake_forward(q, k, q_oracle, k_oracle, query_mask, key_mask, scale):
    shape, dtype = q.shape[:2], reference.accumulation_dtype(q.dtype)
    return (*(q.new_empty(shape, dtype=dtype) for _ in range(3)),
            *fake_partition(query_mask), *fake_partition(key_mask))


def _fake_backward(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle, query_mask, key_mask,
                   query_index, query_count, key_index, key_count, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    *qk, query_mask, key_mask, scale = inputs
    _, lse, lse_oracle, *partitions = output
    ctx.mark_non_differentiable(lse, lse_oracle, *partitions)
    ctx.save_for_backward(*qk, lse, lse_oracle, query_mask, key_mask, *partitions)
    ctx.scale = scale


def _without_autocast(device: torch.device):
    """The KL bodies choose their own precision (float32 statistics, the inputs' dtype in
    matmuls); an enclosing autocast would recast their matmuls under them."""
    return torch.autocast(device.type, enabled=False)


def _make_backward(backward_op):
    def backward(ctx, grad_kl, _grad_lse, _grad_lse_oracle, *_grads_of_partitions):
        with _without_autocast(grad_kl.device):
            grad_q, grad_k = backward_op(grad_kl, *ctx.saved_tensors, ctx.scale)
        return grad_q, grad_k, None, None, None, None, None
    return backward


def _reference_double_backward(ctx, grad_kl, *_grads_of_statistics):
    """Gradients a second derivative can follow: the reference KL again, differentiated by
    plain autograd (the saved lse's are constants to autograd)."""
    q, k, q_oracle, k_oracle, _, _, query_mask, key_mask, *_ = ctx.saved_tensors
    with _without_autocast(grad_kl.device):
        grads = registry.recomputed_gradients(
            lambda q, k: reference.attention_kl_forward(q, k, q_oracle, k_oracle, query_mask,
                                                        key_mask, ctx.scale)[0],
            (q, k), (grad_kl,))
    return (*grads, None, None, None, None, None)


def _reference_forward(q, k, q_oracle, k_oracle, query_mask, key_mask, scale):
    """The reference forward with the partitions the op's schema returns."""
    return (*reference.attention_kl_forward(q, k, q_oracle, k_oracle, query_mask, key_mask, scale),
            *partition_indices(query_mask), *partition_indices(key_mask))


def _reference_backward(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle, query_mask,
                        key_mask, query_index, query_count, key_index, key_count, scale):
    return reference.attention_kl_backward(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle,
                                           query_mask, key_mask, scale)


OPS = registry.register_op_family(
    FAMILY, forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    make_backward=_make_backward, reference_double_backward=_reference_double_backward,
    implementations=registry.backend_implementations(
        (_reference_forward, _reference_backward), (cpu.forward, cpu.backward),
        ("dsa_ops.ops.attention_kl.triton", "attention_kl_forward", "attention_kl_backward")))

# The CUDA KL kernels may be missing from an older compiled library: which dispatch keys
# have them is fixed once the kernels are loaded (here, after every schema is defined).
cuda.load()
_CUDA_KERNEL_KEYS = cuda.kernel_keys(registry.op_names(FAMILY, "cuda")[0])


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    reason = cuda.unavailable(device)  # on CPU tensors: None only under the emulation
    if reason is None and ("CPU" if device.type == "cpu" else "CUDA") not in _CUDA_KERNEL_KEYS:
        reason = "the loaded dsa_ops._C has no CUDA attention-KL kernels"
    return reason


# The op has no values, so the Dv limits do not apply: backends are resolved with v = q.
BACKEND_TABLE = registry.backend_table(OPS, cpu_dtypes=registry.FLOAT_DTYPES,
                                       cuda_unavailable=_cuda_unavailable, v_dims=None)


def get_kl_backend(name: str) -> Backend:
    return BACKEND_TABLE[name]


def resolve_kl_backend(name: str, q: Tensor) -> Backend:
    """``name`` itself, or for ``"auto"``: cuda → triton → reference on CUDA tensors, cpu on
    CPU tensors, reference elsewhere (no Dv: resolved with v = q)."""
    return registry.resolve(BACKEND_TABLE, name, q, q)


def validate_oracle(q: Tensor, q_oracle: Tensor, k_oracle: Tensor) -> None:
    """The oracle pair must match q (shape, dtype, device) and be a constant target."""
    for name, t in (("q_oracle", q_oracle), ("k_oracle", k_oracle)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (B, L, Dqk) = {tuple(q.shape)}; "
                             f"got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; "
                             f"all inputs must be on one device")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but attention_kl treats the oracle as a "
                             f"constant target (no gradient flows into it): pass "
                             f"{name}.detach(), or compute the oracle under torch.no_grad()")


def attention_kl(q: Tensor, k: Tensor, q_oracle: Tensor, k_oracle: Tensor, query_mask: Tensor,
                 key_mask: Tensor, *, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """KL(E_oracle‖E) of each query row, streamed over key tiles: no ``L×L`` map.

    E = softmax over the row's keys of ``scale·q·kᵀ``, E_oracle the same of
    ``scale·q_oracle·k_oracleᵀ``, with the same query and key sets.

    Args:
        q, k: ``(B, L, Dqk)`` of the prediction, any strides; float16/bfloat16/float32
            (float64 on the reference and cpu backends). Differentiable.
        q_oracle, k_oracle: ``(B, L, Dqk)`` like q: the target. It is a constant: passing
            tensors that require grad (with grad mode on) raises ValueError.
        query_mask, key_mask: ``(B, L)`` bool.
        scale: multiplies ``q·k`` (and ``q_oracle·k_oracle``) before the softmax.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, L)`` float32 (float64 for float64 inputs): KL per row, 0 on rows that are no
        query and on rows without keys. Memory O(B·L·Dqk) on the fused backends.
    """
    validate_inputs(q, k, q, query_mask, key_mask, scale)  # no values: q stands in for v
    validate_oracle(q, q_oracle, k_oracle)
    chosen = resolve_kl_backend(backend, q)
    with _without_autocast(q.device):
        return chosen.forward(q, k, q_oracle, k_oracle, query_mask, key_mask, float(scale))[0]
