"""The dual-branch masked-attention op: both branches of Dual Spatial Attention at once.

Dual Spatial Attention runs two masked attentions that share their queries (the
foreground): the cross branch attends to the background, the self branch to the
foreground. The fused op pair computes both branches in one launch per kernel from one
partition of the foreground (its two halves are the two key lists), so every key row is
gathered by one grid. ``reference`` composes two reference calls and runs everywhere;
``cuda`` comes from csrc/ like the single-branch op; ``triton`` is a ``triton_op``
around ``triton.dual_forward`` / ``dual_backward``; ``cpu`` partitions the foreground
once for the queries and both key lists (``cpu.dual_forward``). The forward returns that
partition and the backward takes it back (saved by autograd)::

    dsa_ops::dual_masked_attention_fwd_<backend>(q_cross, k_cross, v_cross, q_self, k_self,
        v_self, foreground, scale)
        -> (out_cross, lse_cross, out_self, lse_self, foreground_index, foreground_count)
    dsa_ops::dual_masked_attention_bwd_<backend>(grad_out_cross, grad_out_self, q_cross,
        k_cross, v_cross, q_self, k_self, v_self, out_cross, lse_cross, out_self, lse_self,
        foreground, foreground_index, foreground_count, scale)
        -> (grad_q_cross, grad_k_cross, grad_v_cross, grad_q_self, grad_k_self, grad_v_self)
"""
from __future__ import annotations

import torch

from dsa_ops.ops import registry
from dsa_ops.ops.masked_attention import cpu, reference
from dsa_ops.ops.masked_attention.op import fake_attention, resolve_backend
from dsa_ops.ops.partition.op import fake_partition
from dsa_ops.ops.partition.reference import partition_indices
from dsa_ops.ops.validation import validate_inputs

Tensor = torch.Tensor

FAMILY = "dual_masked_attention"
FORWARD_SCHEMA = ("(Tensor q_cross, Tensor k_cross, Tensor v_cross, Tensor q_self, Tensor k_self,"
                  " Tensor v_self, Tensor foreground, float scale)"
                  " -> (Tensor out_cross, Tensor lse_cross, Tensor out_self, Tensor lse_self,"
                  " Tensor foreground_index, Tensor foreground_count)")
BACKWARD_SCHEMA = ("(Tensor grad_out_cross, Tensor grad_out_self, Tensor q_cross, Tensor k_cross,"
                   " Tensor v_cross, Tensor q_self, Tensor k_self, Tensor v_self, Tensor out_cross,"
                   " Tensor lse_cross, Tensor out_self, Tensor lse_self, Tensor foreground,"
                   " Tensor foreground_index, Tensor foreground_count,"
                   " float scale) -> (Tensor grad_q_cross, Tensor grad_k_cross, Tensor grad_v_cross,"
                   " Tensor grad_q_self, Tensor grad_k_self, Tensor grad_v_self)")
# Backends whose dual op needs both branches to have the same shapes (one grid serves
# both); the cpu dual op makes one kernel call per branch and takes any shapes.
FUSED = ("cuda", "triton")


def _reference_forward(q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground, scale):
    out_cross, lse_cross = reference.forward(q_cross, k_cross, v_cross, foreground, ~foreground, scale)
    out_self, lse_self = reference.forward(q_self, k_self, v_self, foreground, foreground, scale)
    return out_cross, lse_cross, out_self, lse_self, *partition_indices(foreground)


def _reference_backward(grad_out_cross, grad_out_self, q_cross, k_cross, v_cross, q_self,
                        k_self, v_self, out_cross, lse_cross, out_self, lse_self, foreground,
                        foreground_index, foreground_count, scale):
    cross = reference.backward(grad_out_cross, q_cross, k_cross, v_cross, out_cross, lse_cross,
                               foreground, ~foreground, scale)
    self_ = reference.backward(grad_out_self, q_self, k_self, v_self, out_self, lse_self,
                               foreground, foreground, scale)
    return (*cross, *self_)


def _fake_forward(q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground, scale):
    return (*fake_attention(q_cross, v_cross), *fake_attention(q_self, v_self),
            *fake_partition(foreground))


def _fake_backward(grad_out_cross, grad_out_self, q_cross, k_cross, v_cross, q_self, k_self,
                   v_self, out_cross, lse_cross, out_self, lse_self, foreground,
                   foreground_index, foreground_count, scale):
    return tuple(t.new_empty(t.shape) for t in (q_cross, k_cross, v_cross, q_self, k_self, v_self))


def _setup_context(ctx, inputs, output):
    *qkv, foreground, scale = inputs
    out_cross, lse_cross, out_self, lse_self, *partition = output
    ctx.mark_non_differentiable(lse_cross, lse_self, *partition)
    ctx.save_for_backward(*qkv, out_cross, lse_cross, out_self, lse_self, foreground, *partition)
    ctx.scale = scale


def _make_backward(backward_op):
    def backward(ctx, grad_out_cross, _grad_lse_cross, grad_out_self, *_grads_of_statistics):
        grads = backward_op(grad_out_cross, grad_out_self, *ctx.saved_tensors, ctx.scale)
        return (*grads, None, None)
    return backward


def _reference_double_backward(ctx, grad_out_cross, _grad_lse_cross, grad_out_self,
                               *_grads_of_statistics):
    """Gradients a second derivative can follow (see ``op._reference_double_backward``)."""
    *qkv, _, _, _, _, foreground, _, _ = ctx.saved_tensors

    def both_branches(q_cross, k_cross, v_cross, q_self, k_self, v_self):
        return (reference.forward(q_cross, k_cross, v_cross, foreground, ~foreground, ctx.scale)[0],
                reference.forward(q_self, k_self, v_self, foreground, foreground, ctx.scale)[0])

    grads = registry.recomputed_gradients(both_branches, tuple(qkv), (grad_out_cross, grad_out_self))
    return (*grads, None, None)


OPS = registry.register_op_family(
    FAMILY, forward_schema=FORWARD_SCHEMA, backward_schema=BACKWARD_SCHEMA,
    fake_forward=_fake_forward, fake_backward=_fake_backward, setup_context=_setup_context,
    make_backward=_make_backward, reference_double_backward=_reference_double_backward,
    implementations=registry.backend_implementations(
        (_reference_forward, _reference_backward), (cpu.dual_forward, cpu.dual_backward),
        ("dsa_ops.ops.masked_attention.triton", "dual_forward", "dual_backward")))


def dual_masked_attention(q_cross: Tensor, k_cross: Tensor, v_cross: Tensor, q_self: Tensor,
                          k_self: Tensor, v_self: Tensor, foreground: Tensor, *,
                          scale: float = 1.0, return_attention: bool = False,
                          backend: str = "auto"):
    """Both DSA branches: cross (foreground → background) and self (foreground → foreground).

    Equal to ``masked_attention(q_cross, k_cross, v_cross, foreground, ~foreground)`` and
    ``masked_attention(q_self, k_self, v_self, foreground, foreground)``; when the resolved
    backend is ``"cuda"`` or ``"triton"`` and both branches have the same shapes, one fused
    op computes both (one launch per kernel for the layer); on ``"cpu"`` one dual op computes
    both from one partition of the foreground.

    Args:
        q_cross, k_cross, q_self, k_self: ``(B, L, Dqk)``; v_cross, v_self: ``(B, L, Dv)``.
        foreground: ``(B, L)`` bool, the query positions of both branches.
        scale, return_attention, backend: as for ``masked_attention``.

    Returns:
        ``(out_cross, out_self)``, each ``(B, L, Dv)``; with ``return_attention`` also
        ``{"cross": (B, L, L), "self": (B, L, L)}``.
    """
    if not isinstance(foreground, torch.Tensor) or foreground.dtype != torch.bool:
        got = foreground.dtype if isinstance(foreground, torch.Tensor) else type(foreground).__name__
        raise TypeError(f"foreground must be a bool tensor of shape (B, L); got {got}")
    # The background has the foreground's shape, dtype and device: one check covers both.
    validate_inputs(q_cross, k_cross, v_cross, foreground, foreground, scale)
    validate_inputs(q_self, k_self, v_self, foreground, foreground, scale)
    cross_backend = resolve_backend(backend, q_cross, v_cross)
    self_backend = resolve_backend(backend, q_self, v_self)
    same_shapes = (q_self.shape == q_cross.shape and v_self.shape == v_cross.shape
                   and q_self.dtype == q_cross.dtype)
    dual_backend = cross_backend.name if cross_backend.name == self_backend.name else None
    if (dual_backend in FUSED and same_shapes) or dual_backend == "cpu":
        fused = OPS[dual_backend][0]
        out_cross, _, out_self, *_ = fused(q_cross, k_cross, v_cross, q_self, k_self, v_self,
                                           foreground, float(scale))
    else:
        background = ~foreground  # a launch the fused ops do not need
        out_cross = cross_backend.forward(q_cross, k_cross, v_cross, foreground, background,
                                          float(scale))[0]
        out_self = self_backend.forward(q_self, k_self, v_self, foreground, foreground,
                                        float(scale))[0]
    if not return_attention:
        return out_cross, out_self
    maps = {"cross": reference.attention_probs(q_cross, k_cross, foreground, ~foreground, float(scale)),
            "self": reference.attention_probs(q_self, k_self, foreground, foreground, float(scale))}
    return out_cross, out_self, maps
