"""Backends and op registration, shared by every op family (docs/design.md §2).

An op family (masked attention, its dual-branch form, attention KL, partition) is one
forward op and usually one backward op per backend, all with the family's schemas::

    dsa_ops::<family>_fwd_<backend>(...)    dsa_ops::<family>_bwd_<backend>(...)

``register_op_family`` defines a family in one call: schemas (once, in Python, so the
package works without the compiled extension), implementations per backend (a dispatch
key, a ``triton_op``, or none where the kernels come from ``csrc/`` through
``TORCH_LIBRARY_IMPL``), fake impls, and the autograd formula (forward op → backward op),
which all backends of a family share.

A ``Backend`` says which inputs a backend can take (device, dtype, head sizes) and why
not; ``resolve`` picks one by name or, for ``"auto"``, by device. The availability
checks of the reference, cpu and triton backends live here; the cuda backend's, which
know the kernels' shared-memory needs, live in ``dsa_ops.ops.cuda``. Nothing here knows
about block sizes or launch configurations.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
from typing import Callable, Mapping, Optional

import torch

Tensor = torch.Tensor

LIBRARY = torch.library.Library("dsa_ops", "DEF")

BACKENDS = ("reference", "cpu", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head sizes the fused kernels are built for (csrc/masked_attention/launch.cuh mirrors these).
FUSED_QK_DIMS = (8, 64)
FUSED_V_DIMS = (8, 512)
# What "auto" tries per device type, in order, before the reference.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

# Implementation.dispatch_key for kernels registered with torch.library.triton_op.
TRITON_OP = "triton_op"


# ----------------------------------------------------------------------------- registration
@dataclasses.dataclass(frozen=True)
class Implementation:
    """How one backend implements a family's ops: ``forward``/``backward`` on
    ``dispatch_key`` (a torch dispatch key, or ``TRITON_OP``); no functions and no key
    where the kernels are registered from ``csrc/``."""
    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    dispatch_key: Optional[str] = None


_SCHEMA_TYPES = {"Tensor": Tensor, "Optional[Tensor]": Optional[Tensor], "float": float, "int": int,
                 "SymInt": int, "bool": bool}


def _triton_op(name: str, function: Callable, schema: str) -> None:
    """``torch.library.triton_op(dsa_ops::name)`` with ``schema`` (arguments and returns,
    no name). torch 2.11 accepts ``schema=`` but infers one from the annotations anyway, and
    rejects the implementations' ``tuple[Tensor, ...]``; so ``function`` is passed with a
    signature that states the schema's types (newer torch reads the schema itself)."""
    parsed = torch._C.parse_schema(name + schema)
    parameters = [inspect.Parameter(argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_SCHEMA_TYPES[str(argument.type)])
                  for argument in parsed.arguments]
    returns = [_SCHEMA_TYPES[str(value.type)] for value in parsed.returns]
    implementation = functools.wraps(function)(lambda *args, **kwargs: function(*args, **kwargs))
    implementation.__signature__ = inspect.Signature(
        parameters, return_annotation=returns[0] if len(returns) == 1 else tuple[tuple(returns)])
    torch.library.triton_op(f"dsa_ops::{name}", implementation, mutates_args=(), schema=schema)


def op_names(family: str, backend: str) -> tuple[str, str]:
    """The names of a backend's (forward, backward) ops of ``family``."""
    return f"{family}_fwd_{backend}", f"{family}_bwd_{backend}"


def backend_implementations(reference: tuple[Callable, Callable], cpu: tuple[Callable, Callable],
                            triton: tuple[str, str, str]) -> dict[str, Implementation]:
    """The four backends' implementations of a family from its (forward, backward) functions:
    reference on every device, cpu on the CPU, triton as ``triton_op``s (``triton``: the
    module and its two functions' names, imported only where triton imports), cuda from
    ``csrc/``."""
    table = {"reference": Implementation(*reference, "CompositeExplicitAutograd"),
             "cpu": Implementation(*cpu, "CPU"),
             "cuda": Implementation()}  # kernels: TORCH_LIBRARY_IMPL in csrc/
    if TRITON_IMPORT_ERROR is None:
        module_name, forward, backward = triton
        module = importlib.import_module(module_name)
        table["triton"] = Implementation(getattr(module, forward), getattr(module, backward),
                                         TRITON_OP)
    return table


def op(name: Optional[str]):
    """The default overload of ``dsa_ops::name``; None when it is not defined (the triton
    backend where triton cannot be imported)."""
    if name is None or not hasattr(torch.ops.dsa_ops, name):
        return None
    return getattr(torch.ops.dsa_ops, name).default


def register_op_family(family: str, *, forward_schema: str, fake_forward: Callable,
                       implementations: Mapping[str, Implementation],
                       backward_schema: Optional[str] = None,
                       fake_backward: Optional[Callable] = None,
                       setup_context: Optional[Callable] = None,
                       make_backward: Optional[Callable] = None,
                       reference_double_backward: Optional[Callable] = None,
                       names: Callable[[str, str], tuple[str, Optional[str]]] = op_names
                       ) -> dict[str, tuple]:
    """Define, implement and fake every backend's ops of ``family``; wire autograd.

    ``make_backward(backward_op)`` returns the autograd backward of the forward op (it
    calls ``backward_op`` with what ``setup_context`` saved). Double backward (see
    ``double_backward_policy``): the reference backend's gradients come from
    ``reference_double_backward(ctx, *grads)`` when they must be differentiable; every
    other backend refuses a second derivative. ``names(family, backend)`` gives the op
    names (default ``op_names``; a backward name of None: no backward op).
    Returns ``{backend: (forward op, backward op or None)}``.
    """
    ops = {}
    for backend, implementation in implementations.items():
        op_pair = names(family, backend)
        for name, schema, function, fake in zip(
                op_pair, (forward_schema, backward_schema),
                (implementation.forward, implementation.backward), (fake_forward, fake_backward)):
            if name is None:
                continue
            if implementation.dispatch_key == TRITON_OP:
                _triton_op(name, function, schema)
            else:
                LIBRARY.define(name + schema)
                if function is not None:
                    LIBRARY.impl(name, function, implementation.dispatch_key)
            torch.library.register_fake(f"dsa_ops::{name}", fake, lib=LIBRARY)
        forward_name, backward_name = op_pair
        if backward_name is not None:
            backward = double_backward_policy(
                make_backward(op(backward_name)), f"dsa_ops::{forward_name}", backend,
                reference_double_backward if backend == "reference" else None)
            torch.library.register_autograd(f"dsa_ops::{forward_name}", backward,
                                            setup_context=setup_context, lib=LIBRARY)
        ops[backend] = (op(forward_name), op(backward_name))
    return ops


# ----------------------------------------------------------------------------- double backward
class _FirstDerivativeOnly(torch.autograd.Function):
    """Attaches gradients (computed without a graph) to the tensors they depend on through
    a node that refuses to be differentiated: ``apply(message, count, *gradients, *inputs)``
    returns the ``count`` gradients, sharing their memory."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def double_backward_policy(backward: Callable, op_name: str, backend: str,
                           differentiable_backward: Optional[Callable] = None) -> Callable:
    """The autograd backward of a forward op, with one rule for second derivatives.

    A first-order backward (grad mode off, the usual case) is ``backward``. When the
    gradients must themselves be differentiable (``create_graph=True``), the reference
    computes them with ``differentiable_backward`` (exact, checked by gradgradcheck);
    every other backend returns them from a node that raises a RuntimeError naming the
    backend as soon as anything differentiates them: never a silently wrong second
    derivative.
    """
    message = (f"{op_name}: the {backend!r} backend computes first derivatives only; "
               f"a second derivative (double backward) needs backend='reference'")

    def guarded(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        if differentiable_backward is not None:
            return differentiable_backward(ctx, *grads)
        with torch.no_grad():
            result = backward(ctx, *grads)
        inputs = [t for t in (*ctx.saved_tensors, *grads)
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        gradients = [g for g in result if g is not None]
        if not inputs or not gradients:
            return result
        attached = iter(_FirstDerivativeOnly.apply(message, len(gradients), *gradients, *inputs))
        return tuple(None if g is None else next(attached) for g in result)

    return guarded


def recomputed_gradients(forward: Callable, inputs: tuple, grads: tuple) -> tuple:
    """Differentiable gradients of ``forward(*inputs)`` (one output or a tuple), weighted by
    ``grads``, with respect to each of ``inputs`` that requires grad (None for the others):
    the reference's first derivatives when a second one will follow."""
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return (None,) * len(inputs)
    with torch.enable_grad():
        computed = iter(torch.autograd.grad(forward(*inputs), wanted, grads, create_graph=True,
                                            allow_unused=True))
    return tuple(next(computed) if t.requires_grad else None for t in inputs)


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


def backend_table(ops: Mapping[str, tuple], *, cpu_dtypes: tuple,
                  cuda_unavailable: Callable[[torch.device], Optional[str]],
                  v_dims: Optional[tuple] = FUSED_V_DIMS,
                  cuda_device_dtype_reason: Optional[Callable] = None) -> dict[str, Backend]:
    """The four backends of a family, by name, from its ops (``register_op_family``'s
    result; a backend without ops, triton where it does not import, gets None)."""
    def pair(name: str) -> tuple:
        return ops.get(name, (None, None))

    return {
        "reference": Backend("reference", *pair("reference"), reference_unavailable, FLOAT_DTYPES),
        "cpu": Backend("cpu", *pair("cpu"), cpu_unavailable, cpu_dtypes),
        "triton": Backend("triton", *pair("triton"), triton_unavailable, FUSED_DTYPES,
                          FUSED_QK_DIMS, v_dims),
        "cuda": Backend("cuda", *pair("cuda"), cuda_unavailable, FUSED_DTYPES, FUSED_QK_DIMS,
                        v_dims, cuda_device_dtype_reason),
    }


def default_device(device: torch.device | str | None) -> torch.device:
    """``device``, or CUDA when present, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve(table: Mapping[str, Backend], name: str, q: Tensor, v: Tensor) -> Backend:
    """``table[name]``, or for ``"auto"`` the first backend of ``AUTO_ORDER`` for the
    tensors' device that can take them (else the reference); a clear error otherwise."""
    names = ", ".join(map(repr, table))
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of 'auto', {names}; got {type(name).__name__}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(q.device.type, ()):
            if candidate in table and table[candidate].unsupported_reason(q, v) is None:
                return table[candidate]
        return table["reference"]
    if name not in table:
        raise ValueError(f"backend must be 'auto' or one of {names}; got {name!r}")
    reason = table[name].unsupported_reason(q, v)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available for these inputs: {reason}")
    return table[name]


# ----------------------------------------------------------------------------- availability
def reference_unavailable(device: torch.device) -> Optional[str]:
    return None


def cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors; got tensors on {device}"
    return None


def _triton_import_error() -> Optional[str]:
    try:
        from dsa_ops.ops import triton_common  # noqa: F401
    except ImportError as error:
        return f"triton could not be imported ({error})"
    return None


TRITON_IMPORT_ERROR = _triton_import_error()


def triton_unavailable(device: torch.device) -> Optional[str]:
    if TRITON_IMPORT_ERROR is not None:
        return TRITON_IMPORT_ERROR
    if device.type == "cuda":
        from dsa_ops.ops import triton_common

        return triton_common.unsupported_device_reason(device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
            f"got tensors on {device}")
