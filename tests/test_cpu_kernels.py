"""The cpu backend's compiled float32 kernels (csrc/masked_attention/cpu/attention.cpp) and the
torch calls that replace them when ``dsa_ops._C`` is not built.

``softmax_rows_`` (one pass per score row: probabilities and lse) is checked against float64
with the suite's rule (error ≤ 2 × torch's float32 softmax error + floor), on row lengths
around its 16-lane vectors, large score ranges, padded (−inf) keys, NaN rows, aliasing and
strided rows, in every ISA variant (AVX-512, AVX2, baseline: chosen by
``ATEN_CPU_CAPABILITY``, so each runs in a subprocess). ``attention_tiles_`` (the forward of
one group) and ``attention_tiles_backward_`` (its gradients, on the same tiles) are checked the
same way against float64 over several tiles, batches of samples, padded key slots, empty
query sets and score magnitudes near 10³, with 1 and 2 threads; all pass ``opcheck``, and
their blocks really run on torch's intra-op threads (the library is built with OpenMP). The
shared backend suite runs the compiled kernels through the op on every hole kind and layout.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from dsa_ops.ops.masked_attention import cpu as cpu_backend
from tests.attention_cases import assert_close_by_dtype

ROOT = pathlib.Path(__file__).resolve().parents[1]

needs_compiled = pytest.mark.skipif(
    not cpu_backend.compiled_kernels(),
    reason="dsa_ops._C is not built here (the torch fallback is tested below either way)")
# Row lengths around the 16-lane vectors, and the layer-14 cross branch.
LENGTHS = (1, 2, 15, 16, 17, 31, 33, 100, 3072)


def _scores(rows: int, length: int, spread: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, generator=generator) * spread


def _row_pass(compiled: bool):
    return torch.ops.dsa_ops.softmax_rows_ if compiled else cpu_backend.softmax_rows_torch


def check_row_pass(compiled: bool) -> None:
    """Probabilities and lse of ``softmax_rows_`` against float64 (the rule of the suite)."""
    for seed, length in enumerate(LENGTHS):
        for spread in (1.0, 10.0, 40.0):  # DeepFill's softmax scale 10 makes score ranges wide
            scores = _scores(7, length, spread, seed)
            if length > 1:
                scores[1, length // 2] = float("-inf")  # a padded key slot
            probs, lse = torch.empty_like(scores), torch.empty(7)
            _row_pass(compiled)(scores, probs, lse)
            exact = torch.softmax(scores.double(), dim=-1)
            name = f"length {length}, spread {spread}"
            assert_close_by_dtype(probs, exact, torch.softmax(scores, dim=-1), f"probs, {name}")
            assert_close_by_dtype(lse, torch.logsumexp(scores.double(), dim=-1),
                                  torch.logsumexp(scores, dim=-1), f"lse, {name}")
            assert probs[1, length // 2] == 0 or length == 1


@needs_compiled
def test_row_pass_matches_float64_on_this_cpu():
    check_row_pass(compiled=True)


def test_torch_fallback_row_pass_matches_float64():
    check_row_pass(compiled=False)


@needs_compiled
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_row_pass_matches_float64_in_every_isa_variant(capability):
    """The AVX2 and baseline variants, as AVX2-only and pre-AVX2 CPUs run them (a machine
    cannot run a variant above its own instruction set: then this says so and skips)."""
    environment = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    command = ("import torch; print(torch.backends.cpu.get_cpu_capability()); "
               "from tests.test_cpu_kernels import check_row_pass; check_row_pass(True); print('ok')")
    result = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    lines = result.stdout.split()
    if lines and lines[0] != {"avx2": "AVX2", "default": "DEFAULT"}[capability]:
        pytest.skip(f"this CPU cannot run the {capability} variant (ATen chose {lines[0]})")
    assert result.returncode == 0 and lines[-1:] == ["ok"], result.stdout + result.stderr


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_row_pass_edge_rows(compiled):
    if compiled and not cpu_backend.compiled_kernels():
        pytest.skip("dsa_ops._C is not built here")
    scores = torch.tensor([[0.0, float("-inf"), float("-inf")],   # one live key: exactly 1
                           [1.0, float("nan"), 2.0],              # NaN propagates
                           [3.0, 3.0, 3.0]])                      # ties: exactly uniform
    probs, lse = torch.empty_like(scores), torch.empty(3)
    _row_pass(compiled)(scores, probs, lse)
    assert probs[0].tolist() == [1.0, 0.0, 0.0] and lse[0] == 0.0
    assert probs[1].isnan().all() and lse[1].isnan()
    assert torch.allclose(probs[2], torch.full((3,), 1 / 3)) and abs(lse[2] - (3 + torch.log(torch.tensor(3.0)))) < 1e-6


@needs_compiled
def test_row_pass_in_place_and_on_strided_rows():
    buffer = _scores(6, 50, 5.0, 3)
    tile = buffer[:, :37]  # rows 50 floats apart, 37 long
    expected = torch.softmax(tile, dim=-1)
    lse = torch.empty(2, 3)
    torch.ops.dsa_ops.softmax_rows_(tile.view(2, 3, 37), tile.view(2, 3, 37), lse)
    torch.testing.assert_close(tile, expected, rtol=1e-5, atol=1e-7)
    assert buffer[:, 37:].equal(_scores(6, 50, 5.0, 3)[:, 37:])  # nothing outside the tile


@needs_compiled
def test_compiled_kernels_reject_bad_arguments_in_one_line():
    scores = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="softmax_rows_: scores must be a float32 CPU tensor"):
        torch.ops.dsa_ops.softmax_rows_(scores.double(), scores, torch.empty(4))
    with pytest.raises(RuntimeError, match="unit stride along its rows"):
        torch.ops.dsa_ops.softmax_rows_(scores.t(), scores.t(), torch.empty(8))
    with pytest.raises(RuntimeError, match="lse must be contiguous with shape"):
        torch.ops.dsa_ops.softmax_rows_(scores, scores, torch.empty(5))
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 7, 4)
    with pytest.raises(RuntimeError, match=r"attention_tiles_: q \(G, Nq, Dqk\), k \(G, Nk, Dqk\)"):
        torch.ops.dsa_ops.attention_tiles_(q, k, v, None, torch.empty(2, 5, 4), torch.empty(2, 5))


def _group(samples: int, queries: int, keys: int, padded_keys: int, seed: int):
    """One group as the backend builds it: scaled q, k, v and the −inf key bias of padding."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(samples, queries, 16, generator=generator) * 0.25
    k = torch.randn(samples, keys, 16, generator=generator)
    v = torch.randn(samples, keys, 40, generator=generator)
    bias = None
    if padded_keys:
        bias = torch.zeros(samples, 1, keys)
        bias[-1, 0, keys - padded_keys:] = float("-inf")
    return q, k, v, bias


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("shape", [(3, 300, 6000, 0), (2, 130, 700, 50), (1, 1, 1, 0), (2, 0, 9, 0)],
                         ids=["several tiles", "padded keys", "one pair", "no queries"])
def test_group_forward_matches_float64(compiled, shape):
    """``_float32_forward`` (compiled ``attention_tiles_`` or the torch loop) against softmax
    attention in float64; 6000 keys make 3 tiles of the compiled kernel per sample."""
    if compiled and not cpu_backend.compiled_kernels():
        pytest.skip("dsa_ops._C is not built here")
    q, k, v, bias = _group(*shape, seed=sum(shape))
    out, lse = cpu_backend._float32_forward(q, k, v, bias, compiled=compiled)

    def attention(dtype):
        scores = q.to(dtype) @ k.to(dtype).transpose(1, 2)
        if bias is not None:
            scores = scores + bias.to(dtype)
        return torch.softmax(scores, -1) @ v.to(dtype), torch.logsumexp(scores, -1)

    (exact_out, exact_lse), (base_out, base_lse) = attention(torch.float64), attention(torch.float32)
    assert_close_by_dtype(out, exact_out, base_out, "out")
    assert_close_by_dtype(lse, exact_lse, base_lse, "lse")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("shape, threads", [
    ((1, 200, 9000, 0), 2),   # tiles of one sample split over threads (partial dK, dV summed)
    ((2, 200, 9000, 40), 2),  # a whole tiled sample per thread, padded keys
    ((2, 200, 9000, 0), 1),   # one thread
    ((5, 30, 70, 3), 2),      # batches of whole samples
], ids=["tiles-split", "samples-per-thread", "one-thread", "batches"])
def test_group_backward_matches_float64_at_large_scores(compiled, shape, threads):
    """``_float32_backward`` against autograd in float64, at score magnitudes near 10³ (scale
    folded into q as 10·3, k std 3), where a backward whose P differed in rounding from the
    forward's would put dV far beyond the reference's own error; 9000 keys make several
    tiles of the compiled kernels per sample."""
    if compiled and not cpu_backend.compiled_kernels():
        pytest.skip("dsa_ops._C is not built here")
    q, k, v, bias = _group(*shape, seed=sum(shape))
    q, k = q * 120, k * 3  # _group's q is 0.25·N(0, 1)
    grad_out = torch.randn(*q.shape[:2], v.shape[2], generator=torch.Generator().manual_seed(9))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, _ = cpu_backend._float32_forward(q, k, v, bias, compiled=compiled)
        grads = cpu_backend._float32_backward(grad_out, q, k, v, out, bias, compiled=compiled)
    finally:
        torch.set_num_threads(previous)

    def gradients(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        scores = leaves[0] @ leaves[1].transpose(1, 2)
        if bias is not None:
            scores = scores + bias.to(dtype)
        return torch.autograd.grad(torch.softmax(scores, -1) @ leaves[2], leaves, grad_out.to(dtype))

    for name, grad, exact, baseline in zip(("dq", "dk", "dv"), grads, gradients(torch.float64),
                                            gradients(torch.float32)):
        assert_close_by_dtype(grad, exact, baseline, name)


@needs_compiled
def test_compiled_kernels_pass_opcheck():
    scores = _scores(5, 40, 3.0, 1)
    torch.library.opcheck(torch.ops.dsa_ops.softmax_rows_.default,
                          (scores, torch.empty_like(scores), torch.empty(5)))
    q, k, v, bias = _group(2, 20, 70, 5, seed=2)
    torch.library.opcheck(torch.ops.dsa_ops.attention_tiles_.default,
                          (q, k, v, bias, torch.empty(2, 20, 40), torch.empty(2, 20)))
    out = torch.randn(2, 20, 40)
    torch.library.opcheck(torch.ops.dsa_ops.attention_tiles_backward_.default,
                          (torch.randn(2, 20, 40), q, k, v, out, bias, torch.empty_like(q),
                           torch.empty_like(k), torch.empty_like(v)))


def _threads_wanted() -> int:
    return min(2, os.cpu_count() or 1)


@needs_compiled
def test_compiled_kernels_run_on_the_intra_op_threads():
    """The kernels' ``at::parallel_for`` spreads their blocks over torch's threads. It is a
    header template: a library compiled without OpenMP while torch uses it runs every kernel
    on one thread, with no error (setup.py passes -fopenmp to GCC)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(_threads_wanted())
    try:
        threads = cpu_backend.compiled_kernel_threads()
    finally:
        torch.set_num_threads(previous)
    assert threads == _threads_wanted(), (
        f"dsa_ops._C's kernels ran on {threads} of {_threads_wanted()} threads: it was built "
        "without OpenMP (rebuild with g++: CXX=g++ make rebuild)")
    assert cpu_backend.compiled_kernel_threads(0) == 0


def test_cpu_only_build_has_the_cpu_kernels_and_says_cuda_kernels_are_missing(tmp_path):
    """What a machine without nvcc (or with a CPU build of torch) gets from ``pip install``:
    setup.py compiles dsa_ops._C from the CPU kernels alone (DSA_OPS_NO_CUDA=1 takes that
    path on any machine), the cpu backend uses them, and the cuda backend says they are
    missing instead of failing at a call."""
    tree = tmp_path / "tree"
    for name in ("csrc", "dsa_ops"):
        shutil.copytree(ROOT / name, tree / name,
                        ignore=shutil.ignore_patterns("*.so", "_C.build-stamp", "__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tree / name)
    environment = {**os.environ, "DSA_OPS_NO_CUDA": "1", "MAX_JOBS": "2"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                           env=environment, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "building dsa_ops._C with the CPU kernels only" in build.stderr
    check = ("import torch, dsa_ops; from dsa_ops import extension; "
             "from dsa_ops.ops import cuda; from dsa_ops.ops.masked_attention import cpu; "
             "print(extension.loaded_path()); print(cpu.compiled_kernels()); "
             "print(sorted(cuda.kernel_keys('masked_attention_fwd_cuda'))); "
             f"torch.set_num_threads({_threads_wanted()}); print(cpu.compiled_kernel_threads())")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tree)}, timeout=300)
    loaded, compiled, cuda_keys, threads = result.stdout.split("\n")[:4]
    assert loaded.startswith(str(tree)) and compiled == "True" and cuda_keys == "[]", result.stderr
    assert threads == str(_threads_wanted()), "the CPU-only build runs its kernels on one thread"
