"""The masked-attention op: schema, fake impls, autograd, backends and the public function.

Each backend provides one forward and one backward op with these schemas::

    dsa_ops::masked_attention_fwd_<backend>(q, k, v, query_mask, key_mask, scale)
        -> (out, lse, query_index, query_count, key_index, key_count)
    dsa_ops::masked_attention_bwd_<backend>(grad_out, q, k, v, out, lse, query_mask, key_mask,
                                            query_index, query_count, key_index, key_count,
                                            scale) -> (grad_q, grad_k, grad_v)

The forward returns the stable partitions of its masks (``partition_indices``: the
compaction every fused kernel reads) next to the log-sum-exp, and autograd hands them to
the backward, so a training step partitions each mask once, not once per pass.

``reference`` (every device) is ``reference.py``; ``cpu`` is ``cpu.py`` (compaction +
PyTorch's fused CPU attention); ``triton`` is a ``triton_op`` around ``triton.py``;
``cuda`` gets its kernels from ``csrc/`` (``TORCH_LIBRARY_IMPL(dsa_ops, CUDA, ...)``).
Fake impls and the autograd formula (forward op → backward op) are shared by all
backends (``registry.register_op_family``). Semantics: docs/design.md §2.
"""
from __future__ import annotations

from typing import Optional

import torch

from dsa_ops.ops import cuda, registry
from dsa_ops.ops.masked_attention import cpu, reference
from dsa_ops.ops.partition.op import fake_partition
from dsa_ops.ops.partition.reference import partition_indices
from dsa_ops.ops.registry import Backend
from dsa_ops.ops.validation import validate_inputs

Tensor = torch.Tensor

FAMILY = "masked_attention"
FORWARD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor query_mask, Tensor key_mask, float scale)"
                  " -> (Tensor out, Tensor lse, Tensor query_index, Tensor query_count,"
                  " Tensor key_index, Tensor key_count)")
BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
                   " Tensor query_mask, Tensor key_mask, Tensor query_index, Tensor query_count,"
                   " Tensor key_index, Tensor key_count, float scale)"
                   " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)")


# ----------------------------------------------------------------------------- fake impls
def fake_attention(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(out (B, L, Dv), lse (B, L))`` of one attention, as empty tensors."""
    batch, length, _ = q.shape
    out = v.new_empty((batch, length, v.shape[2]))
    lse = q.new_empty((batch, length), dtype=reference.accumulation_dtype(q.dtype))
    return out, lse


def _fake_forward(q, k, v, query_mask, key_mask, scale):
    return (*fake_attention(q, v), *fake_partition(query_mask), *fake_partition(key_mask))


def _fake_backward(grad_out, q, k, v, out, lse, query_mask, key_mask, query_index, query_count,
                   key_index, key_count, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------- autograd
# The forward's partitions travel to the backward with the other saved tensors.
def _setup_context(ctx, inputs, output):
    q, k, v, query_mask, key_mask, scale = inputs
    out, lse, *partitions = output
    ctx.mark_non_differentiable(lse, *partitions)
    ctx.save_for_backward(q, k, v, out, lse, query_mask, key_mask, *partitions)
    ctx.scale = scale


def _make_backward(backward_op):
    def backward(ctx, grad_out, *_grads_of_statistics):
        grad_q, grad_k, grad_v = backward_op(grad_out, *ctx.saved_tensors, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None
    return backward


def _reference_double_backward(ctx, grad_out, *_grads_of_statistics):
    """Gradients a second derivative can follow: the reference forward again, differentiated
    by plain autograd (the saved lse is a constant to autograd, so the backward op's
    formula would miss its dependence on q and k)."""
    q, k, v, _, _, query_mask, key_mask, *_ = ctx.saved_tensors
    grads = registry.recomputed_gradients(
        lambda q, k, v: reference.forward(q, k, v, query_mask, key_mask, ctx.scale)[0],
        (q, k, v), (grad_out,))
    return (*grads, None, None, None)


# ----------------------------------------------------------------------------- backends
def _reference_forward(q, k, v, query_mask, key_mask, scale):
    """The reference forward with the partitions the op's schema returns (the reference
    itself works on the masks)."""
    return (*reference.forward(q, k, v, query_mask, key_mask, scale),
            *partition_indices(query_mask), *partition_indices(key_mask))


def _reference_backward(grad_out, q, k, v, out, lse, query_mask, key_mask, query_index,
                        query_count, key_index, key_count, scale):
    return reference.backward(grad_out, q, k, v, out, lse, query_mask, key_mask, scale)


OPS = registry.register_op_family(
    FAMILY, forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    make_backward=_make_backward, reference_double_backward=_reference_double_backward,
    implementations=registry.backend_implementations(
        (_reference_forward, _reference_backward), (cpu.forward, cpu.backward),
        ("dsa_ops.ops.masked_attention.triton", "forward", "backward")))


BACKEND_TABLE = registry.backend_table(OPS, cpu_dtypes=cpu.DTYPES,
                                       cuda_unavailable=cuda.unavailable,
                                       cuda_device_dtype_reason=cuda.shared_memory_reason)


def get_backend(name: str) -> Backend:
    return BACKEND_TABLE[name]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CUDA when present, else CPU)."""
    device = registry.default_device(device)
    return [name for name, backend in BACKEND_TABLE.items()
            if backend.unavailable_reason(device) is None]


def backend_unavailable_reason(name: str, device: torch.device | str | None = None) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    return BACKEND_TABLE[name].unavailable_reason(registry.default_device(device))


def resolve_backend(name: str, q: Tensor, v: Tensor) -> Backend:
    """The backend to run: ``name`` itself, or for ``"auto"`` cuda → triton → reference on
    CUDA tensors and cpu → reference on CPU tensors (float64 stays on the reference).
    """
    return registry.resolve(BACKEND_TABLE, name, q, v)


# ----------------------------------------------------------------------------- public API
def masked_attention(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor, *,
                     scale: float = 1.0, return_attention: bool = False, backend: str = "auto"):
    """Attention from the query positions to the key positions of each sample.

    Args:
        q, k: ``(B, L, Dqk)``; v: ``(B, L, Dv)``; any strides; float16/bfloat16/float32
            (float64 on the reference backend).
        query_mask, key_mask: ``(B, L)`` bool: which positions are queries, which are keys.
        scale: multiplies ``q·k`` before the softmax.
        return_attention: also return the dense map ``(B, L, L)`` (float32, float64 for
            float64 inputs): the probabilities on query×key pairs, 0 elsewhere. O(L²).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out (B, L, Dv)`` (zero on non-query rows and on rows without keys), or
        ``(out, attn)`` when ``return_attention``.

    Non-finite values and edge cases (the same on every backend):
        * A NaN or infinity in a query's row (q) or in one of its keys' rows (k or v) makes
          that query's output non-finite, and no other query's. The one latitude: an
          infinity in k that drives a score to -inf may instead give that key weight 0.
        * Values at positions that are neither query nor key (q, k, v and grad_out there,
          NaN and inf included) affect nothing: not the output, not any gradient.
        * B = 0 and L = 0 work, forward and backward.
        * Double backward is exact on ``backend="reference"`` (checked with gradgradcheck
          in float64); the other backends compute first derivatives only and raise a
          RuntimeError naming the backend when a second derivative is taken.
    """
    validate_inputs(q, k, v, query_mask, key_mask, scale)
    chosen = resolve_backend(backend, q, v)
    out = chosen.forward(q, k, v, query_mask, key_mask, float(scale))[0]
    if not return_attention:
        return out
    # The dense map is O(L²) by nature and only meant for small maps (the oracle loss at
    # 16×16): plain autograd-aware torch code serves every backend.
    return out, reference.attention_probs(q, k, query_mask, key_mask, float(scale))


class MaskedAttentionFunction(torch.autograd.Function):
    """Classic-extension-style entry point; forward and backward are the registered ops.

    ``MaskedAttentionFunction.apply(q, k, v, query_mask, key_mask, scale, backend)``
    with ``backend`` one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"auto"``.
    """

    @staticmethod
    def forward(ctx, q, k, v, query_mask, key_mask, scale=1.0, backend="auto"):
        validate_inputs(q, k, v, query_mask, key_mask, scale)
        chosen = resolve_backend(backend, q, v)
        out, lse, *partitions = chosen.forward(q, k, v, query_mask, key_mask, float(scale))
        ctx.save_for_backward(q, k, v, out, lse, query_mask, key_mask, *partitions)
        ctx.scale, ctx.backend = float(scale), chosen
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backward = registry.double_backward_policy(
            _function_backward, "MaskedAttentionFunction", ctx.backend.name,
            _reference_double_backward if ctx.backend.name == "reference" else None)
        return (*backward(ctx, grad_out), None)


def _function_backward(ctx, grad_out):
    q, k, v, out, lse, *masks_and_partitions = ctx.saved_tensors
    grads = ctx.backend.backward(grad_out.contiguous(), q, k, v, out, lse, *masks_and_partitions,
                                 ctx.scale)
    return (*grads, None, None, None)
