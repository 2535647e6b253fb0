"""The CUDA attention-KL kernels (csrc/attention_kl/) beyond the shared matrix of
tests/test_attention_kl.py, which runs them through ``dsa_ops.attention_kl``: several
query and key tiles per sample in every Dqk bucket, a deterministic backward, and the
bindings' input checks. On CPU tensors this needs ``DSA_OPS_CUDA_EMULATE=1`` (``make test``
runs the file in its emulated session); on a GPU it runs on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

import dsa_ops
from dsa_ops import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNAVAILABLE = ops.get_kl_backend("cuda").unavailable_reason(torch.device(DEVICE))
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cuda: {UNAVAILABLE}")


def _inputs(batch, length, qk_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # One packed buffer: q, k, q°, k° are strided channel slices of it.
    packed = torch.randn(batch, length, 4 * qk_dim + 3, generator=generator).to(DEVICE, dtype)
    q, k, q_oracle, k_oracle = (packed[..., i * qk_dim:(i + 1) * qk_dim] for i in range(4))
    hole = torch.rand(batch, length, generator=generator) < 0.5
    hole[0] = False
    hole[1] = True
    grad_kl = torch.randn(batch, length, generator=generator)
    return (q, k, q_oracle, k_oracle, hole.to(DEVICE), (~hole).to(DEVICE)), grad_kl.to(DEVICE)


@pytest.mark.parametrize("qk_dim", [8, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_tiles_per_sample_match_float64(dtype, qk_dim):
    """L = 150: three 64-slot tiles of queries and of keys, the last ones partial; every
    query/key pair of the two halves of a random hole (cross form)."""
    inputs, grad_kl = _inputs(3, 150, qk_dim, dtype, seed=qk_dim)
    scale = qk_dim ** -0.5
    kl, lse, lse_oracle, *partitions = torch.ops.dsa_ops.attention_kl_fwd_cuda(*inputs, scale)
    grads = torch.ops.dsa_ops.attention_kl_bwd_cuda(grad_kl, *inputs[:4], lse, lse_oracle,
                                                    *inputs[4:], *partitions, scale)
    exact = [t.double() if t.is_floating_point() else t for t in inputs]
    want_kl, want_lse, want_lse_oracle = reference.attention_kl_forward(*exact, scale)
    want_grads = reference.attention_kl_backward(grad_kl.double(), *exact[:4], want_lse,
                                                 want_lse_oracle, *exact[4:], scale)
    torch.testing.assert_close(kl.double(), want_kl, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse_oracle.double(), want_lse_oracle, rtol=0, atol=2e-5)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2  # bfloat16: 8 bits of the gradient
    for grad, want in zip(grads, want_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), want, rtol=0, atol=tolerance * want.abs().max())


def test_backward_is_deterministic():
    inputs, grad_kl = _inputs(2, 130, 24, torch.float16, seed=1)
    _, lse, lse_oracle, *partitions = torch.ops.dsa_ops.attention_kl_fwd_cuda(*inputs, 0.3)
    runs = [torch.ops.dsa_ops.attention_kl_bwd_cuda(grad_kl, *inputs[:4], lse, lse_oracle,
                                                    *inputs[4:], *partitions, 0.3)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_small_upstream_gradient_keeps_float16_precision():
    """grad_kl of a mean over B·L rows (~1e-4): g·(p − p°) would fall into float16's
    subnormals; the dK kernel rescales each tile by its max |g| first."""
    inputs, grad_kl = _inputs(2, 100, 16, torch.float16, seed=2)
    small = grad_kl * 1e-4
    _, lse, lse_oracle, *partitions = torch.ops.dsa_ops.attention_kl_fwd_cuda(*inputs, 0.5)
    small_grads = torch.ops.dsa_ops.attention_kl_bwd_cuda(small, *inputs[:4], lse, lse_oracle,
                                                          *inputs[4:], *partitions, 0.5)
    grads = torch.ops.dsa_ops.attention_kl_bwd_cuda(grad_kl, *inputs[:4], lse, lse_oracle,
                                                    *inputs[4:], *partitions, 0.5)
    for small_grad, grad in zip(small_grads, grads):
        torch.testing.assert_close(small_grad.float() * 1e4, grad.float(), rtol=2e-2,
                                   atol=2e-2 * grad.float().abs().max().item())


def test_public_op_runs_the_kernels():
    inputs, grad_kl = _inputs(2, 40, 16, torch.float32, seed=3)
    q, k = (t.detach().requires_grad_() for t in inputs[:2])
    kl = dsa_ops.attention_kl(q, k, *inputs[2:], scale=0.5, backend="cuda")
    kl.backward(grad_kl)
    want, lse, lse_oracle, *partitions = torch.ops.dsa_ops.attention_kl_fwd_cuda(*inputs, 0.5)
    assert torch.equal(kl.detach(), want)
    assert torch.equal(q.grad, torch.ops.dsa_ops.attention_kl_bwd_cuda(
        grad_kl, *inputs[:4], lse, lse_oracle, *inputs[4:], *partitions, 0.5)[0])


BAD = [
    ("q_oracle", lambda a: a.update(q_oracle=a["q_oracle"][:, :7]), "q_oracle must have the shape of q"),
    ("k_oracle", lambda a: a.update(k_oracle=a["k_oracle"].half()), "k_oracle must have the dtype of q"),
    ("key_mask", lambda a: a.update(key_mask=a["key_mask"].int()), "key_mask must be bool"),
    ("q", lambda a: a.update(q=a["q"].double()), "q must be float32, float16 or bfloat16"),
    ("Dqk", lambda a: a.update(**{n: torch.randn(2, 10, 72, device=DEVICE)
                                 for n in ("q", "k", "q_oracle", "k_oracle")}), "Dqk"),
    ("grad_kl", lambda a: a.update(grad_kl=a["grad_kl"][:, :3]), "grad_kl must have shape (B, L)"),
    ("lse_oracle", lambda a: a.update(lse_oracle=a["lse_oracle"].half()),
     "lse_oracle (the forward's log-sum-exp) must be float32"),
]


@pytest.mark.parametrize("name, corrupt, message", BAD, ids=[b[0] for b in BAD])
def test_bindings_reject_bad_inputs_naming_the_argument(name, corrupt, message):
    q = torch.randn(2, 10, 8, device=DEVICE)
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    args = dict(grad_kl=torch.ones(2, 10, device=DEVICE), q=q, k=q, q_oracle=q, k_oracle=q,
                lse=torch.zeros(2, 10, device=DEVICE), lse_oracle=torch.zeros(2, 10, device=DEVICE),
                query_mask=mask, key_mask=mask)
    corrupt(args)
    forward_args = [args[n] for n in ("q", "k", "q_oracle", "k_oracle", "query_mask", "key_mask")]
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if name in ("grad_kl", "lse_oracle"):
            partitions = [*dsa_ops.partition_indices(mask), *dsa_ops.partition_indices(mask)]
            torch.ops.dsa_ops.attention_kl_bwd_cuda(
                args["grad_kl"], *forward_args[:4], args["lse"], args["lse_oracle"],
                *forward_args[4:], *partitions, 1.0)
        else:
            torch.ops.dsa_ops.attention_kl_fwd_cuda(*forward_args, 1.0)
