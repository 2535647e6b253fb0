"""Small forward + backward runs of every CUDA kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/sanitize_cuda.py
    compute-sanitizer --tool initcheck python tests/sanitize_cuda.py

Covers every dtype, every padded Dqk bucket (16/32/64), Dv with a partial last chunk,
L not a multiple of the tile, empty and full query/key sets, non-contiguous inputs and
the dual-branch op. Exits non-zero when a result disagrees with the reference, so the
run also checks the numbers (loosely: the pytest suite has the tight tolerances).
"""
from __future__ import annotations

import sys

import torch

import dsa_ops

SHAPES = [  # (batch, length, Dqk, Dv)
    (3, 70, 8, 8),
    (2, 130, 24, 72),
    (2, 65, 64, 136),
]


def _masks(batch: int, length: int, generator: torch.Generator):
    hole = torch.rand(batch, length, generator=generator) < 0.4
    hole[0] = False  # no queries (cross) / no keys (self)
    if batch > 1:
        hole[1] = True  # no background keys (cross)
    return hole


def run() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    generator = torch.Generator().manual_seed(0)
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
        for batch, length, qk_dim, v_dim in SHAPES:
            hole = _masks(batch, length, generator).cuda()
            packed = torch.randn(batch, 2 * (2 * qk_dim + v_dim), length, generator=generator)
            packed = packed.to(device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
            q_c, k_c, v_c, q_s, k_s, v_s = packed.split([qk_dim, qk_dim, v_dim] * 2, dim=2)
            out_c, out_s = dsa_ops.ops.dual_masked_attention(q_c, k_c, v_c, q_s, k_s, v_s, hole,
                                                             scale=qk_dim ** -0.5, backend="cuda")
            single = dsa_ops.masked_attention(q_s, k_s, v_s, hole, hole, scale=qk_dim ** -0.5,
                                              backend="cuda")
            (out_c.float().sum() + out_s.float().square().sum() + single.float().sum()).backward()
            torch.cuda.synchronize()
            exact = packed.detach().double().requires_grad_()
            e_q_c, e_k_c, e_v_c, e_q_s, e_k_s, e_v_s = exact.split([qk_dim, qk_dim, v_dim] * 2, dim=2)
            args = dict(scale=qk_dim ** -0.5, backend="reference")
            r_c = dsa_ops.masked_attention(e_q_c, e_k_c, e_v_c, hole, ~hole, **args)
            r_s = dsa_ops.masked_attention(e_q_s, e_k_s, e_v_s, hole, hole, **args)
            (r_c.sum() + r_s.square().sum() + r_s.sum()).backward()
            for name, got, want in (("out_cross", out_c, r_c), ("out_self", out_s, r_s),
                                    ("grad", packed.grad, exact.grad)):
                error = (got.detach().double() - want.detach()).abs().max().item()
                scale = max(want.abs().max().item(), 1.0)
                ok = error <= tolerance * scale and torch.isfinite(got).all().item()
                failures += not ok
                print(f"{str(dtype):15s} B={batch} L={length} Dqk={qk_dim} Dv={v_dim} {name:9s} "
                      f"max error {error:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
