"""Shared cases and tolerances for testing masked-attention backends against the reference.

Masks are per sample: a batch cycles through a rectangular hole, scattered random
pixels, an empty hole and a full hole, so every test batch covers all of them. The three
forms of the op: ``cross`` (queries = hole, keys = the rest), ``self`` (queries = keys =
hole) and ``independent`` (unrelated random query and key sets).

Tolerances follow FlashAttention: a backend's error against the exact (float64)
reference may be at most twice the error of the reference itself run in the input
dtype, plus a small floor scaled to the magnitude of the values.
"""
from __future__ import annotations

import dataclasses

import torch

from dsa_ops import reference

FORMS = ("cross", "self", "independent")
HOLE_KINDS = ("rectangle", "random", "empty", "full")
# Floors relative to max(|exact|, 1): the error an exact-order kernel may add on top.
ERROR_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def hole_masks(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, H·W)`` bool holes; sample i is of kind ``HOLE_KINDS[i % 4]``."""
    holes = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(batch):
        kind = HOLE_KINDS[i % len(HOLE_KINDS)]
        if kind == "rectangle":
            h = int(torch.randint(1, height + 1, (1,), generator=generator))
            w = int(torch.randint(1, width + 1, (1,), generator=generator))
            y = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            x = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            holes[i, y:y + h, x:x + w] = True
        elif kind == "random":
            holes[i] = torch.rand(height, width, generator=generator) < 0.4
        elif kind == "full":
            holes[i] = True
    return holes.flatten(1)


def query_key_masks(form: str, holes: torch.Tensor, generator: torch.Generator):
    """(query_mask, key_mask) for one of ``FORMS``."""
    if form == "cross":
        return holes, ~holes
    if form == "self":
        return holes, holes.clone()
    if form == "independent":
        return (torch.rand(holes.shape, generator=generator) < 0.5,
                torch.rand(holes.shape, generator=generator) < 0.3)
    raise ValueError(f"unknown form {form!r}")


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    query_mask: torch.Tensor
    key_mask: torch.Tensor
    grad_out: torch.Tensor
    scale: float

    @property
    def inputs(self):
        return self.q, self.k, self.v, self.query_mask, self.key_mask


def make_case(batch: int = 4, height: int = 5, width: int = 7, qk_dim: int = 8, v_dim: int = 12, *,
              form: str = "cross", dtype: torch.dtype = torch.float32, device="cpu",
              noncontiguous: bool = False, scale: float | None = None, qk_std: float = 1.0,
              seed: int = 0) -> Case:
    """Random inputs; ``noncontiguous`` gives q, k, v as channel slices of a (B, C, L)
    conv-like output viewed as (B, L, C); ``qk_std`` scales q and k (large values give
    large score magnitudes, where the softmax statistics need full float32 care)."""
    generator = torch.Generator().manual_seed(seed)
    length = height * width
    channels = 2 * qk_dim + v_dim
    if noncontiguous:
        packed = torch.randn(batch, channels, length, generator=generator).transpose(1, 2)
    else:
        packed = torch.randn(batch, length, channels, generator=generator)
    packed[..., :2 * qk_dim] *= qk_std
    q, k, v = packed.to(dtype).split([qk_dim, qk_dim, v_dim], dim=2)
    if not noncontiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    holes = hole_masks(batch, height, width, generator)
    query_mask, key_mask = query_key_masks(form, holes, generator)
    grad_out = torch.randn(batch, length, v_dim, generator=generator).to(dtype)
    if scale is None:
        scale = qk_dim ** -0.5
    move = lambda t: t.to(device)  # noqa: E731
    return Case(move(q), move(k), move(v), move(query_mask), move(key_mask), move(grad_out), scale)


def reference_results(case: Case, *, exact: bool):
    """``(out, (dq, dk, dv))`` of the reference: in float64 when ``exact``, else run
    entirely in the input dtype (``upcast=False``), the low-precision baseline."""
    dtype = torch.float64 if exact else case.q.dtype
    q, k, v, grad_out = (t.to(dtype) for t in (case.q, case.k, case.v, case.grad_out))
    out, lse = reference.forward(q, k, v, case.query_mask, case.key_mask, case.scale, upcast=exact)
    grads = reference.backward(grad_out, q, k, v, out, lse, case.query_mask, case.key_mask,
                               case.scale, upcast=exact)
    return out, grads


def assert_close_by_dtype(actual: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor,
                          name: str) -> None:
    """``|actual - exact| ≤ 2·|baseline - exact| + floor``, all maxima over the tensor."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    floor = ERROR_FLOOR[baseline.dtype]
    actual, exact, baseline = (t.detach().cpu().double() for t in (actual, exact, baseline))
    error = (actual - exact).abs().max().item() if actual.numel() else 0.0
    baseline_error = (baseline - exact).abs().max().item() if actual.numel() else 0.0
    magnitude = max(exact.abs().max().item() if exact.numel() else 0.0, 1.0)
    bound = 2 * baseline_error + floor * magnitude
    assert error <= bound, (f"{name}: max error {error:.3g} exceeds {bound:.3g} "
                            f"(2 × reference-in-dtype error {baseline_error:.3g} + floor)")


def assert_gradients_close_by_dtype(names, grads, exact, baseline, dtype: torch.dtype) -> None:
    """Each gradient keeps the input dtype and meets ``assert_close_by_dtype``."""
    for name, grad, grad_exact, grad_baseline in zip(names, grads, exact, baseline):
        assert grad.dtype == dtype, name
        assert_close_by_dtype(grad, grad_exact, grad_baseline, name)
