"""One small forward + backward per CUDA kernel family, for a quick compute-sanitizer pass
(gpu-check's sanitize stage; tests/sanitize_cuda.py is the thorough sweep):

    compute-sanitizer --tool memcheck  python tests/sanitize_families.py
    compute-sanitizer --tool racecheck python tests/sanitize_families.py

Families: partition_indices, masked attention (forward, dQ and dK/dV backward), the dual
op, attention_kl (forward and backward). bfloat16, L = 70 (a partial tile), a sample
without queries and one without background keys. Exits 1 when a result is not finite or
disagrees with the float64 reference beyond a loose bound (the pytest suite has the tight
tolerances), 2 without a CUDA device.
"""
from __future__ import annotations

import sys

import torch

import dsa_ops
from dsa_ops import reference

BATCH, LENGTH, QK_DIM, V_DIM = 3, 70, 16, 40
TOLERANCE = 8e-2  # bfloat16 keeps 8 mantissa bits; relative to max(|expected|, 1)


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> int:
    error = (got.detach().double() - want.detach().double()).abs().max().item()
    bound = TOLERANCE * max(want.abs().max().item(), 1.0)
    ok = error <= bound and bool(torch.isfinite(got).all())
    print(f"{name:22s} max error {error:.2e} (bound {bound:.1e}) {'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


def run() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    generator = torch.Generator().manual_seed(0)
    foreground = torch.rand(BATCH, LENGTH, generator=generator) < 0.4
    foreground[0] = False  # no queries
    foreground[1] = True  # no background keys (cross branch)
    foreground = foreground.cuda()

    def draw(width: int) -> torch.Tensor:
        return torch.randn(BATCH, LENGTH, width, generator=generator).to("cuda", torch.bfloat16)

    q, k, v, q2, k2, v2 = draw(QK_DIM), draw(QK_DIM), draw(V_DIM), draw(QK_DIM), draw(QK_DIM), draw(V_DIM)
    scale = QK_DIM ** -0.5
    failures = 0

    index, count = dsa_ops.partition_indices(foreground)
    torch.cuda.synchronize()
    exact_count = torch.equal(count.long().cpu(), foreground.sum(dim=1).cpu())
    print(f"{'partition_indices':22s} counts {'ok' if exact_count else 'FAIL'}")
    failures += not exact_count

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = dsa_ops.masked_attention(*leaves, foreground, ~foreground, scale=scale, backend="cuda")
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    want = dsa_ops.masked_attention(*exact, foreground, ~foreground, scale=scale, backend="reference")
    want_grads = torch.autograd.grad(want.square().sum(), exact)
    failures += _report("masked_attention", out, want)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads):
        failures += _report(f"masked_attention {name}", got, expected)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, q2, k2, v2)]
    out_cross, out_self = dsa_ops.dual_masked_attention(*leaves, foreground, scale=scale, backend="cuda")
    grad = torch.autograd.grad(out_cross.float().sum() + out_self.float().sum(), leaves[3])[0]
    exact = [t.double().requires_grad_() for t in (q2, k2, v2)]
    want_self = dsa_ops.masked_attention(*exact, foreground, foreground, scale=scale, backend="reference")
    failures += _report("dual op (self)", out_self, want_self)
    failures += _report("dual op dq (self)", grad, torch.autograd.grad(want_self.sum(), exact[0])[0])

    leaves = [t.clone().requires_grad_() for t in (q, k)]
    kl = dsa_ops.attention_kl(*leaves, q2, k2, foreground, ~foreground, scale=scale, backend="cuda")
    grads = torch.autograd.grad(kl.sum(), leaves)
    exact = [t.double() for t in (q, k, q2, k2)]
    want_kl, lse, oracle_lse = reference.attention_kl_forward(*exact, foreground, ~foreground, scale)
    want_grads = reference.attention_kl_backward(torch.ones_like(want_kl), *exact, lse, oracle_lse,
                                                 foreground, ~foreground, scale)
    failures += _report("attention_kl", kl, want_kl)
    for name, got, expected in zip(("dq", "dk"), grads, want_grads):
        failures += _report(f"attention_kl {name}", got, expected)
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
