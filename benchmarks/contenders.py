"""The contenders: one function per implementation, one signature per benchmark family.

Op contenders take an ``AttentionProblem`` and return the callable that is timed; it
starts from ``(q, k, v, query_mask, key_mask)`` as the module would hand them over, ends
with ``out (B, L, Dv)`` in ``dsa_ops`` semantics (zero on non-query rows), runs the
backward too when ``problem.grad_out`` is set, and synchronises CUDA before returning.
Everything that depends on the batch's masks (compaction, dense or block masks) happens
inside the timed call, since the masks change every training step; one-off work that
does not (``torch.compile``) happens in the untimed warm-up.

A contender that cannot take a case raises ``Unsupported`` (wrong device, dtype or head
size) or ``WouldRunOutOfMemory`` (its dense O(B·L²) buffers exceed the memory budget —
checked before allocating, so the run never thrashes) while building the callable.

- ``dsa_ops[<backend>]``: ``dsa_ops.masked_attention`` with that backend (``cpu``: compacted
  rows through PyTorch's fused CPU flash attention, the CPU run's fast path).
- ``sdpa-mask``: ``F.scaled_dot_product_attention`` on the full map with the dense
  boolean mask ``query_mask[:, :, None] & key_mask[:, None, :]`` (one head). A row with
  no keys would be all -inf, and its softmax NaN (also in the backward); such rows are
  given every key instead and their outputs zeroed, which is our semantics and leaves
  the dense kernel's work unchanged.
- ``varlen-mem-efficient``: queries and keys of all samples gathered into one packed
  sequence (``dsa_ops.partition_indices``), PyTorch's memory-efficient attention with
  per-sample offsets (``aten._efficient_attention_forward/_backward``, ``cu_seqlens``;
  it takes a V width different from Q/K), outputs scattered back. Gather and scatter
  are timed. CUDA only.
- ``flex``: ``torch.nn.attention.flex_attention`` compiled with ``torch.compile``, block
  mask from ``create_block_mask`` with a ``mask_mod`` reading the two masks (built inside
  the timed call). It takes Dv ≠ Dqk as is; Q and K are zero-padded to 16 channels when
  Dqk < 16 (the smallest head its kernels take; zeros leave the scores unchanged). CUDA only.

Module contenders take a ``ModuleProblem``: ``dsa[<backend>]`` is the whole
``DualSpatialAttention`` (projections, both branches, fusion conv), ``ca`` is the
contextual attention of ``oracleface.models.contextual_attention`` at the same layer with
DeepFill v1's published settings (its defaults: 3×3 patches, stride 1, rate 2, fuse 3,
softmax scale 10).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import dsa_ops
from benchmarks.cases import DATA_SEED, AttentionProblem, ModuleProblem, TrainingProblem
from dsa_ops.ops import get_backend

Tensor = torch.Tensor
Timed = Callable[[], Tensor]

GIB = 2 ** 30
# On the CPU, dense O(L²) buffers are capped far below the machine's memory: beyond this
# a single call takes tens of seconds, and the CPU run has to stay within minutes.
CPU_DENSE_BYTES_LIMIT = 2 * GIB
FLEX_MIN_HEAD_DIM = 16


class Unsupported(Exception):
    """The contender cannot run this case here (device, dtype, head size, missing code)."""


class WouldRunOutOfMemory(Exception):
    """The contender's dense buffers for this case exceed the memory budget."""


# ----------------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_budget(device: torch.device) -> tuple[int, str]:
    """Bytes a contender may allocate for dense buffers, and where the number comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free), f"{free / GIB:.1f} GiB free on the GPU"
    budget = min(_available_host_memory() // 2, CPU_DENSE_BYTES_LIMIT)
    return budget, (f"the CPU run allows {budget / GIB:.1f} GiB (at most half the available memory, "
                    f"at most {CPU_DENSE_BYTES_LIMIT / GIB:.0f} GiB, to stay within its time budget)")


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_dense_memory(what: str, batch: int, length: int, bytes_per_pair: float,
                         device: torch.device) -> None:
    """Raise ``WouldRunOutOfMemory`` when ``batch·L²·bytes_per_pair`` exceeds the budget."""
    needed = batch * length * length * bytes_per_pair
    budget, source = memory_budget(device)
    if needed > budget:
        raise WouldRunOutOfMemory(f"{what} O(L²) memory: ~{needed / GIB:.1f} GiB of (B, L, L) "
                                  f"buffers at B={batch}, L={length}; {source}")


def _finish(out: Tensor, problem: AttentionProblem, inputs: tuple[Tensor, ...]) -> Tensor:
    """Run the backward when asked (no .grad accumulation), synchronise, return ``out``."""
    if problem.backward:
        torch.autograd.grad(out, inputs, problem.grad_out)
    synchronize(out.device)
    return out.detach()


# ----------------------------------------------------------------------------- dsa_ops
# Bytes per query×key element of the reference's (B, L, L) float32 buffers: the forward
# holds scores, masked scores, exponentials and probabilities (+ the bool pair mask); the
# backward recomputes them and adds dP and dS.
REFERENCE_BYTES_PER_PAIR = {False: 17, True: 25}


def dsa_ops_backend(backend: str) -> Callable[[AttentionProblem], Timed]:
    """The contender running ``dsa_ops.masked_attention(..., backend=backend)``."""

    def contender(problem: AttentionProblem) -> Timed:
        device = problem.q.device
        if backend == "triton" and device.type == "cpu":
            raise Unsupported("triton on the CPU only runs under TRITON_INTERPRET=1, in the Python "
                              "interpreter: correct but far too slow to benchmark")
        reason = get_backend(backend).unsupported_reason(problem.q, problem.v)
        if reason is not None:
            raise Unsupported(f"dsa_ops backend {backend!r}: {reason}")
        if backend == "reference":
            batch, length, _ = problem.q.shape
            require_dense_memory("reference", batch, length,
                                 REFERENCE_BYTES_PER_PAIR[problem.backward], device)

        def run() -> Tensor:
            out = dsa_ops.masked_attention(problem.q, problem.k, problem.v, problem.query_mask,
                                           problem.key_mask, scale=problem.scale, backend=backend)
            return _finish(out, problem, problem.inputs)

        return run

    contender.__name__ = f"dsa_ops_{backend}"
    return contender


# ----------------------------------------------------------------------------- SDPA
def sdpa_with_mask(problem: AttentionProblem) -> Timed:
    """Dense ``scaled_dot_product_attention`` with the boolean query×key mask."""
    batch, length, _ = problem.q.shape
    itemsize = problem.q.element_size()
    # Two bool masks plus the kernel's scores/bias and probabilities (more in the backward).
    require_dense_memory("sdpa-mask", batch, length, 2 + (6 if problem.backward else 3) * itemsize,
                         problem.q.device)

    def run() -> Tensor:
        pairs = problem.query_mask[:, :, None] & problem.key_mask[:, None, :]
        has_keys = pairs.any(dim=2, keepdim=True)
        attn_mask = (pairs | ~has_keys)[:, None]  # keyless rows see every key; zeroed below
        out = F.scaled_dot_product_attention(problem.q[:, None], problem.k[:, None], problem.v[:, None],
                                             attn_mask=attn_mask, scale=problem.scale)[:, 0]
        return _finish(out.masked_fill(~has_keys, 0), problem, problem.inputs)

    return run


# ----------------------------------------------------------------------------- varlen
class _VarlenEfficientAttention(torch.autograd.Function):
    """Packed-sequence memory-efficient attention: ``(1, N, 1, D)`` inputs, per-sample offsets."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                needs_lse):
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, 0,
            needs_lse, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, offset)
        ctx.max_seqlens, ctx.scale = (max_seqlen_q, max_seqlen_k), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, offset = ctx.saved_tensors
        grad_q, grad_k, grad_v, _ = torch.ops.aten._efficient_attention_backward(
            grad_out.contiguous(), q, k, v, None, out, cu_seqlens_q, cu_seqlens_k,
            *ctx.max_seqlens, lse, 0.0, seed, offset, 0, False, scale=ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def packed_positions(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Where a packed varlen sequence reads from: ``(flat_index (N,), cu_seqlens (B+1,), max_len)``.

    ``flat_index`` lists ``b·L + position`` for the true positions of every sample, sample
    by sample in increasing order (``dsa_ops.partition_indices`` does the compaction);
    ``cu_seqlens`` are the int32 sample offsets into it.
    """
    batch, length = mask.shape
    index, count = dsa_ops.partition_indices(mask)
    counts = count.tolist()  # the packed size is needed on the host anyway
    total = sum(counts)
    cu_seqlens = F.pad(count.cumsum(0, dtype=torch.int32), (1, 0))
    sample = torch.repeat_interleave(torch.arange(batch, device=mask.device), count.long(),
                                     output_size=total)
    rank = torch.arange(total, device=mask.device) - cu_seqlens[:-1].long()[sample]
    flat_index = sample * length + index.long()[sample, rank]
    return flat_index, cu_seqlens, max(counts, default=0)


def varlen_mem_efficient(problem: AttentionProblem) -> Timed:
    """Gather → ``aten._efficient_attention_forward/_backward`` with cu_seqlens → scatter."""
    if problem.q.device.type != "cuda":
        raise Unsupported("aten._efficient_attention_forward is a CUDA kernel")
    batch, length, _ = problem.q.shape

    def pack(t: Tensor, flat_index: Tensor) -> Tensor:
        return t.reshape(batch * length, t.shape[2]).index_select(0, flat_index)[None, :, None, :]

    def run() -> Tensor:
        query_index, cu_q, max_q = packed_positions(problem.query_mask)
        if problem.key_mask is problem.query_mask:  # the self branch: one compaction serves both
            key_index, cu_k, max_k = query_index, cu_q, max_q
        else:
            key_index, cu_k, max_k = packed_positions(problem.key_mask)
        packed = _VarlenEfficientAttention.apply(
            pack(problem.q, query_index), pack(problem.k, key_index), pack(problem.v, key_index),
            cu_q, cu_k, max_q, max_k, problem.scale, problem.backward)
        v_dim = problem.v.shape[2]
        out = torch.index_copy(problem.v.new_zeros(batch * length, v_dim), 0, query_index,
                               packed.reshape(-1, v_dim)).view(batch, length, v_dim)
        return _finish(out, problem, problem.inputs)

    return run


# ----------------------------------------------------------------------------- flex
@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Every (config, dtype, pass) is a new static shape: allow them all to compile instead of
    # silently falling back to the unfused eager path after the default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096)
    return torch.compile(flex_attention, dynamic=False)


def flex(problem: AttentionProblem) -> Timed:
    """Compiled FlexAttention with a block mask built from the two masks."""
    if problem.q.device.type != "cuda":
        raise Unsupported("FlexAttention is benchmarked on CUDA only: compiling it for the CPU "
                          "costs more per shape than the CPU run's whole time budget")
    from torch.nn.attention.flex_attention import create_block_mask

    attention = _compiled_flex_attention()
    batch, length, qk_dim = problem.q.shape
    query_mask, key_mask = problem.query_mask, problem.key_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return query_mask[b, q_idx] & key_mask[b, kv_idx]

    def heads(t: Tensor) -> Tensor:
        if t.shape[2] < FLEX_MIN_HEAD_DIM and t is not problem.v:
            t = F.pad(t, (0, FLEX_MIN_HEAD_DIM - t.shape[2]))
        return t[:, None]

    def run() -> Tensor:
        block_mask = create_block_mask(mask_mod, batch, None, length, length,
                                       device=problem.q.device, _compile=True)
        out = attention(heads(problem.q), heads(problem.k), heads(problem.v),
                        block_mask=block_mask, scale=problem.scale)[:, 0]
        return _finish(out, problem, problem.inputs)

    return run


OP_CONTENDERS: dict[str, Callable[[AttentionProblem], Timed]] = {
    "dsa_ops[cuda]": dsa_ops_backend("cuda"),
    "dsa_ops[triton]": dsa_ops_backend("triton"),
    "dsa_ops[cpu]": dsa_ops_backend("cpu"),
    "reference": dsa_ops_backend("reference"),
    "sdpa-mask": sdpa_with_mask,
    "varlen-mem-efficient": varlen_mem_efficient,
    "flex": flex,
}
OP_BASELINE = "reference"
# Contenders that are not this project's code: a failure to compile or launch on a case is
# recorded as "unsupported" with the error instead of failing the run.
THIRD_PARTY = frozenset({"sdpa-mask", "varlen-mem-efficient", "flex"})


def reference_check(problem: AttentionProblem, out: Tensor) -> Optional[float]:
    """Max |out − reference| over the first sample (the reference run on that sample alone),
    or None where even one sample's dense reference does not fit in memory."""
    _, length, _ = problem.q.shape
    try:
        require_dense_memory("reference check", 1, length, REFERENCE_BYTES_PER_PAIR[False],
                             problem.q.device)
    except WouldRunOutOfMemory:
        return None
    with torch.no_grad():
        expected = dsa_ops.masked_attention(*(t[:1].detach() for t in problem.inputs),
                                            problem.query_mask[:1], problem.key_mask[:1],
                                            scale=problem.scale, backend="reference")
    return float((out[:1].float() - expected.float()).abs().max())


# ----------------------------------------------------------------------------- modules
def _module_finish(module: torch.nn.Module, problem: ModuleProblem) -> Timed:
    inputs = (problem.x, *(p for p in module.parameters() if p.requires_grad))

    def run() -> Tensor:
        # A forward-only case runs as inference does, without recording the autograd graph.
        with torch.set_grad_enabled(problem.backward):
            y = module(problem.x, problem.holes)
        if problem.backward:
            torch.autograd.grad(y, inputs, problem.grad_out)
        synchronize(y.device)
        return y.detach()

    return run


def dsa_module(backend: str) -> Callable[[ModuleProblem], Timed]:
    """The contender running ``DualSpatialAttention(C, backend=backend)`` forward (+ backward)."""

    def contender(problem: ModuleProblem) -> Timed:
        config, device = problem.config, problem.x.device
        if backend == "triton" and device.type == "cpu":
            raise Unsupported("triton on the CPU only runs under TRITON_INTERPRET=1, in the Python "
                              "interpreter: correct but far too slow to benchmark")
        probe_q = torch.empty(1, 1, config.qk_dim, dtype=problem.x.dtype, device=device)
        probe_v = torch.empty(1, 1, config.v_dim, dtype=problem.x.dtype, device=device)
        reason = get_backend(backend).unsupported_reason(probe_q, probe_v)
        if reason is not None:
            raise Unsupported(f"dsa_ops backend {backend!r}: {reason}")
        if backend == "reference":  # two branches, one after the other: the peak is one branch
            require_dense_memory("reference", problem.batch, config.length,
                                 REFERENCE_BYTES_PER_PAIR[problem.backward], device)
        torch.manual_seed(DATA_SEED)
        module = dsa_ops.DualSpatialAttention(config.channels, backend=backend)
        return _module_finish(module.to(device=device, dtype=problem.x.dtype), problem)

    contender.__name__ = f"dsa_module_{backend}"
    return contender


def contextual_attention(problem: ModuleProblem) -> Timed:
    """``oracleface``'s contextual attention (Yu et al. 2018) forward (+ backward)."""
    try:
        from oracleface.models.contextual_attention import ContextualAttention
    except ImportError as error:
        raise Unsupported(f"oracleface.models.contextual_attention is not importable: {error}") from error
    itemsize = problem.x.element_size()
    module = ContextualAttention(problem.config.channels)
    # Its (B, l, l) scores over the rate-downsampled map (l = L / rate²) go through
    # propagation (padded copies and sums), masking and the softmax: about six such
    # buffers, twice that with the backward.
    require_dense_memory("contextual attention", problem.batch,
                         problem.config.length // module.rate ** 2,
                         1 + (12 if problem.backward else 6) * itemsize, problem.x.device)
    return _module_finish(module.to(device=problem.x.device, dtype=problem.x.dtype), problem)


MODULE_CONTENDERS: dict[str, Callable[[ModuleProblem], Timed]] = {
    "dsa[cuda]": dsa_module("cuda"),
    "dsa[triton]": dsa_module("triton"),
    "dsa[cpu]": dsa_module("cpu"),
    "dsa[reference]": dsa_module("reference"),
    "ca": contextual_attention,
}
MODULE_BASELINE = "dsa[reference]"


# ----------------------------------------------------------------------------- training
def generator_step(attention: str, backend: str = "auto") -> Callable[[TrainingProblem], Timed]:
    """One generator forward + backward (L1 loss against the input) in training mode."""

    def contender(problem: TrainingProblem) -> Timed:
        device = problem.images.device
        if attention != "dsa" and device.type == "cpu":
            raise Unsupported("the CPU run times the DSA generator only (a CPU step takes seconds); "
                              "the CA and attention-free generators run on the GPU")
        if attention == "dsa":
            if backend == "triton" and device.type == "cpu":
                raise Unsupported("triton on the CPU only runs under TRITON_INTERPRET=1: far too "
                                  "slow to benchmark")
            reason = dsa_ops.backend_unavailable_reason(backend, device)
            if reason is not None:
                raise Unsupported(f"dsa_ops backend {backend!r}: {reason}")
        try:
            from oracleface.models import Generator
        except ImportError as error:
            raise Unsupported(f"oracleface.models.Generator is not importable: {error}") from error
        torch.manual_seed(DATA_SEED)
        generator = Generator(problem.resolution, attention=attention, dsa_backend=backend)
        generator = generator.to(device).train()
        parameters = [p for p in generator.parameters() if p.requires_grad]

        def run() -> Tensor:
            out = generator(problem.images, problem.holes)
            loss = (out - problem.images).abs().mean()
            torch.autograd.grad(loss, parameters)
            synchronize(device)
            return loss.detach()

        return run

    contender.__name__ = f"generator_{attention}_{backend}"
    return contender


TRAINING_CONTENDERS: dict[str, Callable[[TrainingProblem], Timed]] = {
    "generator[dsa, cuda]": generator_step("dsa", "cuda"),
    "generator[dsa, triton]": generator_step("dsa", "triton"),
    "generator[dsa, cpu]": generator_step("dsa", "cpu"),
    "generator[dsa, reference]": generator_step("dsa", "reference"),
    "generator[ca]": generator_step("ca"),
    "generator[none]": generator_step("none"),
}
TRAINING_BASELINE = "generator[dsa, reference]"
