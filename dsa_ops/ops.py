"""Op registration, validation, autograd and backend dispatch for masked attention.

Every schema is defined here, once, through ``torch.library``, so the package works
without the compiled extension. Each backend provides one forward and one backward op
with the same schemas::

    dsa_ops::masked_attention_fwd_<backend>(q, k, v, query_mask, key_mask, scale)
        -> (out, lse, query_index, query_count, key_index, key_count)
    dsa_ops::masked_attention_bwd_<backend>(grad_out, q, k, v, out, lse, query_mask, key_mask,
                                            query_index, query_count, key_index, key_count,
                                            scale) -> (grad_q, grad_k, grad_v)

The forward returns the stable partitions of its masks (``partition_indices``: the
compaction every fused kernel reads) next to the log-sum-exp, and autograd hands them to
the backward, so a training step partitions each mask once, not once per pass.

``reference`` is implemented in ``dsa_ops.reference`` for every device; ``cpu`` in
``dsa_ops.cpu_kernels`` (compaction + PyTorch's fused CPU attention); ``triton`` is a
``torch.library.triton_op`` around ``dsa_ops.triton_kernels``; ``cuda`` gets its CUDA
kernels from ``csrc/`` (``TORCH_LIBRARY_IMPL(dsa_ops, CUDA, ...)``). Fake impls and the
autograd formula (forward op → backward op) are shared by all backends, so the formula
lives in one place. Nothing here knows about block sizes or launch configurations.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import os
from typing import Callable, Optional

import torch

from dsa_ops import cpu_kernels, extension, reference

Tensor = torch.Tensor

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor query_mask, Tensor key_mask, float scale)"
               " -> (Tensor out, Tensor lse, Tensor query_index, Tensor query_count,"
               " Tensor key_index, Tensor key_count)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
               " Tensor query_mask, Tensor key_mask, Tensor query_index, Tensor query_count,"
               " Tensor key_index, Tensor key_count, float scale)"
               " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)")
_PARTITION_SCHEMA = "(Tensor mask) -> (Tensor index, Tensor count)"

BACKENDS = ("reference", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head sizes the fused kernels are built for (csrc/masked_attention/launch.cuh mirrors these).
FUSED_QK_DIMS = (8, 64)
FUSED_V_DIMS = (8, 512)

_lib = torch.library.Library("dsa_ops", "DEF")


def _op_names(backend: str) -> tuple[str, str]:
    return f"masked_attention_fwd_{backend}", f"masked_attention_bwd_{backend}"


# ----------------------------------------------------------------------------- fake impls
def _fake_partition(mask):
    return (mask.new_empty(mask.shape, dtype=torch.int32),
            mask.new_empty(mask.shape[:1], dtype=torch.int32))


def _fake_attention(q, v):
    batch, length, _ = q.shape
    out = v.new_empty((batch, length, v.shape[2]))
    lse = q.new_empty((batch, length), dtype=reference.accumulation_dtype(q.dtype))
    return out, lse


def _fake_forward(q, k, v, query_mask, key_mask, scale):
    return (*_fake_attention(q, v), *_fake_partition(query_mask), *_fake_partition(key_mask))


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


def _make_backward(bwd_op):
    def backward(ctx, grad_out, *_grads_of_statistics):
        grad_q, grad_k, grad_v = bwd_op(grad_out, *ctx.saved_tensors, ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None
    return backward


def _register_op_pair(names: tuple[str, str], fakes: tuple[Callable, Callable],
                      make_backward: Callable, setup_context: Callable) -> None:
    """Fake impls of a (forward, backward) op pair and the forward's autograd, whose
    backward calls the backward op: the one shape every op family here follows."""
    fwd_name, bwd_name = names
    for name, fake in zip(names, fakes):
        torch.library.register_fake(f"dsa_ops::{name}", fake, lib=_lib)
    bwd_op = getattr(torch.ops.dsa_ops, bwd_name).default
    torch.library.register_autograd(f"dsa_ops::{fwd_name}", make_backward(bwd_op),
                                    setup_context=setup_context, lib=_lib)


def _register_meta_and_autograd(backend: str) -> None:
    _register_op_pair(_op_names(backend), (_fake_forward, _fake_backward), _make_backward,
                      _setup_context)


# ----------------------------------------------------------------------------- definitions
_lib.define("partition_indices" + _PARTITION_SCHEMA)
# Every device gets the torch implementation; the CUDA kernel from csrc/ wins on CUDA.
_lib.impl("partition_indices", reference.partition_indices, "CompositeExplicitAutograd")
torch.library.register_fake("dsa_ops::partition_indices", _fake_partition, lib=_lib)



def _reference_forward_op(q, k, v, query_mask, key_mask, scale):
    """The reference forward with the partitions the op's schema returns (the reference
    itself works on the masks)."""
    return (*reference.forward(q, k, v, query_mask, key_mask, scale),
            *partition_indices(query_mask), *partition_indices(key_mask))


def _reference_backward_op(grad_out, q, k, v, out, lse, query_mask, key_mask, query_index,
                           query_count, key_index, key_count, scale):
    return reference.backward(grad_out, q, k, v, out, lse, query_mask, key_mask, scale)


for _name, _schema, _impl in (("masked_attention_fwd_reference", _FWD_SCHEMA, _reference_forward_op),
                              ("masked_attention_bwd_reference", _BWD_SCHEMA, _reference_backward_op)):
    _lib.define(_name + _schema)
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
_register_meta_and_autograd("reference")

for _name, _schema, _impl in zip(_op_names("cpu"), (_FWD_SCHEMA, _BWD_SCHEMA),
                                 (cpu_kernels.forward, cpu_kernels.backward)):
    _lib.define(_name + _schema)
    _lib.impl(_name, _impl, "CPU")
_register_meta_and_autograd("cpu")

for _name, _schema in zip(_op_names("cuda"), (_FWD_SCHEMA, _BWD_SCHEMA)):
    _lib.define(_name + _schema)
_register_meta_and_autograd("cuda")
extension.load()
if extension.emulation_requested():
    extension.load_emulation()


_SCHEMA_TYPES = {"Tensor": Tensor, "Optional[Tensor]": Optional[Tensor], "float": float, "int": int,
                 "SymInt": int, "bool": bool}


def _triton_op(name: str, impl: Callable, schema: str) -> None:
    """``torch.library.triton_op(dsa_ops::name)`` with ``schema`` (arguments and returns,
    no name). torch 2.11 accepts ``schema=`` but infers one from the annotations anyway, and
    rejects the implementations' ``tuple[Tensor, ...]``; so ``impl`` is passed with a
    signature that states the schema's types (newer torch reads the schema itself)."""
    parsed = torch._C.parse_schema(name + schema)
    parameters = [inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_SCHEMA_TYPES[str(argument.type)])
                  for argument in parsed.arguments]
    returns = [_SCHEMA_TYPES[str(value.type)] for value in parsed.returns]
    implementation = functools.wraps(impl)(lambda *args, **kwargs: impl(*args, **kwargs))
    implementation.__signature__ = inspect.Signature(
        parameters, return_annotation=returns[0] if len(returns) == 1 else tuple[tuple(returns)])
    torch.library.triton_op(f"dsa_ops::{name}", implementation, mutates_args=(), schema=schema)


def _triton_import_error() -> Optional[str]:
    try:
        from dsa_ops import triton_kernels  # noqa: F401
    except ImportError as error:
        return f"triton could not be imported ({error})"
    return None


_TRITON_IMPORT_ERROR = _triton_import_error()
if _TRITON_IMPORT_ERROR is None:
    from dsa_ops import triton_kernels

    for _name, _schema, _impl in zip(_op_names("triton"), (_FWD_SCHEMA, _BWD_SCHEMA),
                                     (triton_kernels.forward, triton_kernels.backward)):
        _triton_op(_name, _impl, _schema)
    _register_meta_and_autograd("triton")


def partition_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stable partition of ``mask`` ``(B, L)`` bool: see ``reference.partition_indices``."""
    return torch.ops.dsa_ops.partition_indices(mask)


# ----------------------------------------------------------------------------- backends
@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    unavailable_reason: Callable[[torch.device], Optional[str]]
    dtypes: tuple
    qk_dims: Optional[tuple] = None  # inclusive range, None = any
    v_dims: Optional[tuple] = None
    device_dtype_reason: Optional[Callable[[torch.device, torch.dtype], Optional[str]]] = None

    def unsupported_reason(self, q: Tensor, v: Tensor) -> Optional[str]:
        """Why this backend cannot take these inputs (device, dtype, head sizes), or None."""
        reason = self.unavailable_reason(q.device)
        if reason is not None:
            return reason
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"it supports dtypes {names}; got {str(q.dtype).removeprefix('torch.')}"
        if self.device_dtype_reason is not None:
            reason = self.device_dtype_reason(q.device, q.dtype)
            if reason is not None:
                return reason
        for what, size, limits in (("Dqk", q.shape[2], self.qk_dims), ("Dv", v.shape[2], self.v_dims)):
            if limits is not None and not limits[0] <= size <= limits[1]:
                return f"it supports {what} in {limits[0]}..{limits[1]}; got {what} = {size}"
        return None


def _reference_unavailable(device: torch.device) -> Optional[str]:
    return None


def _cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors; got tensors on {device}"
    return None


def _triton_unavailable(device: torch.device) -> Optional[str]:
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    if device.type == "cuda":
        return triton_kernels.unsupported_device_reason(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
            f"got tensors on {device}")


# Shared memory per block the CUDA kernels' largest blocks need, by dtype. 16-bit kernels
# fit the 99 KiB of sm_86/89/120 (the dQ pass then streams dO instead of keeping it
# resident, chosen at launch); float32's double-buffered tiles need sm_80/sm_87/sm_90's
# 163 KiB (up to 136 KiB). Where a GPU has less, the backend says so and "auto" takes Triton.
CUDA_SHARED_MEMORY_PER_BLOCK = {torch.float16: 99 * 1024, torch.bfloat16: 99 * 1024,
                                torch.float32: 163 * 1024}
# What the host emulation grants per block (csrc/emulation/emulation.cpp), by the
# architecture it emulates (DSA_OPS_CUDA_EMULATE_ARCH, default 80).
_EMULATED_SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _cuda_shared_memory(device: torch.device) -> tuple[int, str]:
    """(bytes of shared memory a block may use, the GPU's name) for the kernels' device."""
    if device.type == "cpu":
        arch = int(os.environ.get("DSA_OPS_CUDA_EMULATE_ARCH") or 80)
        return _EMULATED_SHARED_MEMORY.get(arch, 0), f"the emulated sm_{arch}"
    properties = torch.cuda.get_device_properties(device)
    return (getattr(properties, "shared_memory_per_block_optin", max(CUDA_SHARED_MEMORY_PER_BLOCK.values())),
            properties.name)


def _cuda_shared_memory_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    needed = CUDA_SHARED_MEMORY_PER_BLOCK[dtype]
    available, gpu = _cuda_shared_memory(device)
    if available >= needed:
        return None
    return (f"its {str(dtype).removeprefix('torch.')} kernels need {needed // 1024} KiB of shared "
            f"memory per block; {gpu} allows {available // 1024} KiB: use backend='triton' "
            f"(what 'auto' picks there)")


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and extension.emulation_requested():
        return extension.emulation_error()  # DSA_OPS_CUDA_EMULATE=1: the kernels' host emulation
    if extension.load_error() is not None:
        return extension.load_error()
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors; got tensors on {device}"
    return None


def _backend_ops(name: str) -> tuple[Callable, Callable]:
    fwd_name, bwd_name = _op_names(name)
    if not hasattr(torch.ops.dsa_ops, fwd_name):  # triton not importable
        return None, None
    return getattr(torch.ops.dsa_ops, fwd_name).default, getattr(torch.ops.dsa_ops, bwd_name).default


_BACKENDS = {
    "reference": Backend("reference", *_backend_ops("reference"), _reference_unavailable, FLOAT_DTYPES),
    "cpu": Backend("cpu", *_backend_ops("cpu"), _cpu_unavailable, cpu_kernels.DTYPES),
    "triton": Backend("triton", *_backend_ops("triton"), _triton_unavailable, FUSED_DTYPES,
                      FUSED_QK_DIMS, FUSED_V_DIMS),
    "cuda": Backend("cuda", *_backend_ops("cuda"), _cuda_unavailable, FUSED_DTYPES,
                    FUSED_QK_DIMS, FUSED_V_DIMS, _cuda_shared_memory_reason),
}
# What "auto" tries per device type, in order, before the reference.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def get_backend(name: str) -> Backend:
    return _BACKENDS[name]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CUDA when present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [name for name in BACKENDS if _BACKENDS[name].unavailable_reason(device) is None]


def backend_unavailable_reason(name: str, device: torch.device | str | None = None) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _BACKENDS[name].unavailable_reason(torch.device(device))


def _resolve(table: dict, name: str, q: Tensor, v: Tensor) -> Backend:
    """``table[name]``, or for ``"auto"`` the first backend of ``_AUTO_ORDER`` for the
    tensors' device that can take them (else the reference); a clear error otherwise."""
    names = ", ".join(map(repr, table))
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of 'auto', {names}; got {type(name).__name__}")
    if name == "auto":
        for candidate in _AUTO_ORDER.get(q.device.type, ()):
            if candidate in table and table[candidate].unsupported_reason(q, v) is None:
                return table[candidate]
        return table["reference"]
    if name not in table:
        raise ValueError(f"backend must be 'auto' or one of {names}; got {name!r}")
    reason = table[name].unsupported_reason(q, v)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available for these inputs: {reason}")
    return table[name]


def resolve_backend(name: str, q: Tensor, v: Tensor) -> Backend:
    """The backend to run: ``name`` itself, or for ``"auto"`` cuda → triton → reference on
    CUDA tensors and cpu → reference on CPU tensors (float64 stays on the reference).
    """
    return _resolve(_BACKENDS, name, q, v)


# ----------------------------------------------------------------------------- validation
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
        ctx.scale, ctx.backward_op = float(scale), chosen.backward
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *masks_and_partitions = ctx.saved_tensors
        grads = ctx.backward_op(grad_out.contiguous(), q, k, v, out, lse, *masks_and_partitions,
                                ctx.scale)
        return (*grads, None, None, None, None)


# ============================================================================= dual-branch op
# Dual Spatial Attention runs two masked attentions that share their queries (the
# foreground): the cross branch attends to the background, the self branch to the
# foreground. The fused op pair computes both branches in one launch per kernel from one
# partition of the foreground (its two halves are the two key lists), so every key row is
# gathered by one grid. ``reference`` composes two reference calls and runs everywhere;
# ``cuda`` comes from csrc/ (bindings.cpp) like the single-branch op; ``triton`` is a
# ``triton_op`` around ``triton_kernels.dual_forward`` / ``dual_backward``; ``cpu`` partitions
# the foreground once for the queries and both key lists (cpu_kernels.dual_forward). The
# forward returns that partition and the backward takes it back (saved by autograd).
_DUAL_FWD_SCHEMA = ("(Tensor q_cross, Tensor k_cross, Tensor v_cross, Tensor q_self, Tensor k_self,"
                    " Tensor v_self, Tensor foreground, float scale)"
                    " -> (Tensor out_cross, Tensor lse_cross, Tensor out_self, Tensor lse_self,"
                    " Tensor foreground_index, Tensor foreground_count)")
_DUAL_BWD_SCHEMA = ("(Tensor grad_out_cross, Tensor grad_out_self, Tensor q_cross, Tensor k_cross,"
                    " Tensor v_cross, Tensor q_self, Tensor k_self, Tensor v_self, Tensor out_cross,"
                    " Tensor lse_cross, Tensor out_self, Tensor lse_self, Tensor foreground,"
                    " Tensor foreground_index, Tensor foreground_count,"
                    " float scale) -> (Tensor grad_q_cross, Tensor grad_k_cross, Tensor grad_v_cross,"
                    " Tensor grad_q_self, Tensor grad_k_self, Tensor grad_v_self)")
DUAL_BACKENDS = ("reference", "cpu", "cuda")


def _dual_op_names(backend: str) -> tuple[str, str]:
    return f"dual_masked_attention_fwd_{backend}", f"dual_masked_attention_bwd_{backend}"


def _dual_forward_reference(q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground, scale):
    out_cross, lse_cross = reference.forward(q_cross, k_cross, v_cross, foreground, ~foreground, scale)
    out_self, lse_self = reference.forward(q_self, k_self, v_self, foreground, foreground, scale)
    return out_cross, lse_cross, out_self, lse_self, *partition_indices(foreground)


def _dual_backward_reference(grad_out_cross, grad_out_self, q_cross, k_cross, v_cross, q_self,
                             k_self, v_self, out_cross, lse_cross, out_self, lse_self, foreground,
                             foreground_index, foreground_count, scale):
    cross = reference.backward(grad_out_cross, q_cross, k_cross, v_cross, out_cross, lse_cross,
                               foreground, ~foreground, scale)
    self_ = reference.backward(grad_out_self, q_self, k_self, v_self, out_self, lse_self,
                               foreground, foreground, scale)
    return (*cross, *self_)


def _fake_dual_forward(q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground, scale):
    return (*_fake_attention(q_cross, v_cross), *_fake_attention(q_self, v_self),
            *_fake_partition(foreground))


def _fake_dual_backward(grad_out_cross, grad_out_self, q_cross, k_cross, v_cross, q_self, k_self,
                        v_self, out_cross, lse_cross, out_self, lse_self, foreground,
                        foreground_index, foreground_count, scale):
    return tuple(t.new_empty(t.shape) for t in (q_cross, k_cross, v_cross, q_self, k_self, v_self))


def _dual_setup_context(ctx, inputs, output):
    *qkv, foreground, scale = inputs
    out_cross, lse_cross, out_self, lse_self, *partition = output
    ctx.mark_non_differentiable(lse_cross, lse_self, *partition)
    ctx.save_for_backward(*qkv, out_cross, lse_cross, out_self, lse_self, foreground, *partition)
    ctx.scale = scale


def _make_dual_backward(bwd_op):
    def backward(ctx, grad_out_cross, _grad_lse_cross, grad_out_self, *_grads_of_statistics):
        grads = bwd_op(grad_out_cross, grad_out_self, *ctx.saved_tensors, ctx.scale)
        return (*grads, None, None)
    return backward


def _register_dual_meta_and_autograd(backend: str) -> None:
    _register_op_pair(_dual_op_names(backend), (_fake_dual_forward, _fake_dual_backward),
                      _make_dual_backward, _dual_setup_context)


for _backend in DUAL_BACKENDS:
    _fwd, _bwd = _dual_op_names(_backend)
    _lib.define(_fwd + _DUAL_FWD_SCHEMA)
    _lib.define(_bwd + _DUAL_BWD_SCHEMA)
    if _backend == "reference":  # cuda: TORCH_LIBRARY_IMPL in csrc/bindings.cpp
        _lib.impl(_fwd, _dual_forward_reference, "CompositeExplicitAutograd")
        _lib.impl(_bwd, _dual_backward_reference, "CompositeExplicitAutograd")
    elif _backend == "cpu":
        _lib.impl(_fwd, cpu_kernels.dual_forward, "CPU")
        _lib.impl(_bwd, cpu_kernels.dual_backward, "CPU")
    _register_dual_meta_and_autograd(_backend)

# triton: both branches in one launch per kernel from one partition of the foreground.
if _TRITON_IMPORT_ERROR is None:
    for _name, _schema, _impl in zip(_dual_op_names("triton"), (_DUAL_FWD_SCHEMA, _DUAL_BWD_SCHEMA),
                                     (triton_kernels.dual_forward, triton_kernels.dual_backward)):
        _triton_op(_name, _impl, _schema)
    _register_dual_meta_and_autograd("triton")
# Dual ops that need both branches to have the same shapes (one grid serves both); the cpu
# dual op makes one kernel call per branch and takes any shapes.
_FUSED_DUAL = ("cuda", "triton") if _TRITON_IMPORT_ERROR is None else ("cuda",)


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
    if (dual_backend in _FUSED_DUAL and same_shapes) or dual_backend == "cpu":
        fused = getattr(torch.ops.dsa_ops, _dual_op_names(dual_backend)[0]).default
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


# ============================================================================= attention KL
# The streaming oracle KL (DESIGN §2): KL(E_oracle‖E) per query row from the q, k of two
# passes, with no L×L map. Like the attention op, each backend is one forward and one
# backward op with these schemas, sharing the fake impls and the autograd formula:
#
#   dsa_ops::attention_kl_fwd_<backend>(q, k, q_oracle, k_oracle, query_mask, key_mask,
#                                       scale) -> (kl, lse, lse_oracle)
#   dsa_ops::attention_kl_bwd_<backend>(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle,
#                                       query_mask, key_mask, scale) -> (grad_q, grad_k)
#
# "reference" (every device) and "cpu" (compacted rows, dsa_ops.attention_kl_cpu) are
# implemented here; "triton" is a triton_op around dsa_ops.triton_kernels' KL section;
# "cuda" is defined here so that its kernels only need registering from csrc/
# (TORCH_LIBRARY_IMPL(dsa_ops, CUDA, ...)): until then it reports itself unavailable.
# The oracle is a constant target: the backward op gives no gradient for it.
_KL_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor q_oracle, Tensor k_oracle, Tensor query_mask,"
                  " Tensor key_mask, float scale) -> (Tensor kl, Tensor lse, Tensor lse_oracle)")
_KL_BWD_SCHEMA = ("(Tensor grad_kl, Tensor q, Tensor k, Tensor q_oracle, Tensor k_oracle,"
                  " Tensor lse, Tensor lse_oracle, Tensor query_mask, Tensor key_mask,"
                  " float scale) -> (Tensor grad_q, Tensor grad_k)")
KL_BACKENDS = ("reference", "cpu", "triton", "cuda")


def _kl_op_names(backend: str) -> tuple[str, str]:
    return f"attention_kl_fwd_{backend}", f"attention_kl_bwd_{backend}"


def _fake_kl_forward(q, k, q_oracle, k_oracle, query_mask, key_mask, scale):
    shape, dtype = q.shape[:2], reference.accumulation_dtype(q.dtype)
    return tuple(q.new_empty(shape, dtype=dtype) for _ in range(3))


def _fake_kl_backward(grad_kl, q, k, q_oracle, k_oracle, lse, lse_oracle, query_mask, key_mask,
                      scale):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _kl_setup_context(ctx, inputs, output):
    *qk, query_mask, key_mask, scale = inputs
    _, lse, lse_oracle = output
    ctx.mark_non_differentiable(lse, lse_oracle)
    ctx.save_for_backward(*qk, lse, lse_oracle, query_mask, key_mask)
    ctx.scale = scale


def _without_autocast(device: torch.device):
    """The KL bodies choose their own precision (float32 statistics, the inputs' dtype in
    matmuls); an enclosing autocast would recast their matmuls under them."""
    return torch.autocast(device.type, enabled=False)


def _make_kl_backward(bwd_op):
    def backward(ctx, grad_kl, _grad_lse, _grad_lse_oracle):
        with _without_autocast(grad_kl.device):
            grad_q, grad_k = bwd_op(grad_kl, *ctx.saved_tensors, ctx.scale)
        return grad_q, grad_k, None, None, None, None, None
    return backward


def _kl_ops(backend: str):
    fwd_name, bwd_name = _kl_op_names(backend)
    if not hasattr(torch.ops.dsa_ops, fwd_name):  # triton not importable
        return None, None
    return getattr(torch.ops.dsa_ops, fwd_name).default, getattr(torch.ops.dsa_ops, bwd_name).default


def _define_kl_backend(backend: str, forward=None, backward=None, dispatch_key=None) -> None:
    """Schemas, implementations (on ``dispatch_key``; triton ops via ``triton_op``), fake
    impls and autograd of one backend's op pair."""
    for name, schema, impl in zip(_kl_op_names(backend), (_KL_FWD_SCHEMA, _KL_BWD_SCHEMA),
                                  (forward, backward)):
        if backend == "triton":
            _triton_op(name, impl, schema)
            continue
        _lib.define(name + schema)
        if impl is not None:
            _lib.impl(name, impl, dispatch_key)
    _register_op_pair(_kl_op_names(backend), (_fake_kl_forward, _fake_kl_backward),
                      _make_kl_backward, _kl_setup_context)


from dsa_ops import attention_kl_cpu  # noqa: E402  (imports reference only)

_define_kl_backend("reference", reference.attention_kl_forward, reference.attention_kl_backward,
                   "CompositeExplicitAutograd")
_define_kl_backend("cpu", attention_kl_cpu.forward, attention_kl_cpu.backward, "CPU")
_define_kl_backend("cuda")
if _TRITON_IMPORT_ERROR is None:
    _define_kl_backend("triton", triton_kernels.attention_kl_forward,
                       triton_kernels.attention_kl_backward)


def _kl_cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend needs CPU tensors; got tensors on {device}"
    return None


# Dispatch keys with the KL kernels (csrc/attention_kl/): CUDA from dsa_ops._C, CPU from the
# host emulation (DSA_OPS_CUDA_EMULATE=1). Both load at import (above), so this is fixed
# here, and torch.compile never has to trace the dispatcher query.
_KL_CUDA_KERNEL_KEYS = frozenset(
    key for key in ("CUDA", "CPU")
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{_kl_op_names('cuda')[0]}", key))


def _kl_cuda_unavailable(device: torch.device) -> Optional[str]:
    reason = _cuda_unavailable(device)  # on CPU tensors: None only under the emulation
    if reason is None and ("CPU" if device.type == "cpu" else "CUDA") not in _KL_CUDA_KERNEL_KEYS:
        reason = "the loaded dsa_ops._C has no CUDA attention-KL kernels"
    return reason


# Backend's Dv limits do not apply (the op has no values): resolve with v = q.
_KL_BACKEND_TABLE = {
    "reference": Backend("reference", *_kl_ops("reference"), _reference_unavailable, FLOAT_DTYPES),
    "cpu": Backend("cpu", *_kl_ops("cpu"), _kl_cpu_unavailable, FLOAT_DTYPES),
    "triton": Backend("triton", *_kl_ops("triton"), _triton_unavailable, FUSED_DTYPES,
                      FUSED_QK_DIMS),
    "cuda": Backend("cuda", *_kl_ops("cuda"), _kl_cuda_unavailable, FUSED_DTYPES, FUSED_QK_DIMS),
}


def get_kl_backend(name: str) -> Backend:
    return _KL_BACKEND_TABLE[name]


def resolve_kl_backend(name: str, q: Tensor) -> Backend:
    """``name`` itself, or for ``"auto"``: cuda → triton → reference on CUDA tensors, cpu on
    CPU tensors, reference elsewhere (no Dv: resolved with v = q)."""
    return _resolve(_KL_BACKEND_TABLE, name, q, q)


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
