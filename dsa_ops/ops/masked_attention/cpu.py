"""The "cpu" backend of masked attention: compaction, tiled float32 attention, scatter.

Each sample's query rows and key rows are gathered into dense blocks (compaction with
``partition_indices``), attention runs on the blocks, and the rows are scattered back. No
work is spent on non-query rows or non-key columns and no ``L×L`` matrix is built.

Layout of one call (``Block``): a group of samples is padded to its largest query count
``Nq`` and key count ``Nk``; padded key slots are masked with -inf, padded query slots
are computed and dropped. Samples are grouped so that padding wastes little work
(``plan_groups``): a batch of equal holes is one call, very unequal holes run apart.
Samples without queries or without keys are left out (their outputs are 0, lse +inf).

float32 (``_float32_forward`` / ``_float32_backward``): an exact softmax a tile of query
rows at a time — S = (scale·Q)·Kᵀ, one pass over each row for P = softmax(S) (written over
S) and its lse, out = P·V — and a backward that recomputes P with the same calls on the same
tiles, so it uses exactly the forward's P. With ``dsa_ops._C`` built, the compiled kernels
(``attention_tiles_`` and ``attention_tiles_backward_``, csrc/masked_attention/cpu/) run the
tiles, split over the intra-op threads with single-threaded GEMMs and a vectorised row
pass; without it, the torch loop below does (``score_tiles``, every GEMM on the BLAS's
threads, ``torch.softmax`` plus two ``amax`` for the lse).
Q and K keep their own width: aten's fused CPU kernel needs one head size for Q, K and V,
and zero-padding Dqk 16 to Dv 128 (the module's layer 14) made Q·Kᵀ 8× its useful work.
The scale is folded into the gathered queries, so both passes compute the same scores bit
for bit.

float16 and bfloat16 run PyTorch's flash-attention CPU kernels
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: online softmax,
float32 accumulation), the narrower of Q/K and V zero-padded to the wider (zero channels
leave q·k and P·V unchanged; the scale is passed to the kernel).
These functions know nothing of autograd; ``op`` and ``dual`` register them.

Shapes: q, k ``(B, L, Dqk)``, v ``(B, L, Dv)``, any strides; out ``(B, L, Dv)``; lse
``(B, L)`` float32, +inf on rows that are no query or have no keys (``reference.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from dsa_ops import extension
from dsa_ops.ops import registry
from dsa_ops.ops.masked_attention import reference
from dsa_ops.ops.partition.reference import partition_indices

Tensor = torch.Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A group of samples runs as one padded call while its padded query×key pairs are at most
# this factor of the real ones (the rest of the time goes into masked work).
MAX_PADDING_WASTE = 1.25
# float32 scores are normalised a tile at a time (``score_tiles``): a tile's scores take at
# most this many bytes (within the L3 cache of current x86 CPUs) and at least MIN_TILE_ROWS
# rows. Measured on a 2-core EPYC (1 MiB L2 per core, 32 MiB L3), layer 14's op: 256 KiB
# tiles ran at 53 % of torch.mm's rate, 1 MiB at 61 %, 4–16 MiB at 65–85 % — fewer, larger
# GEMMs beat L2-sized tiles, and every op is a barrier for the intra-op threads.
SCORE_TILE_BYTES = 8 << 20
MIN_TILE_ROWS = 32

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


# ----------------------------------------------------------------------------- compaction
@dataclasses.dataclass
class Slots:
    """One side (queries or keys) of a batch, compacted: ``positions[b, j]`` is the row of
    sample b that slot j reads, ``valid[b, j]`` whether it is a real query/key (padding
    slots read other, distinct rows of the same sample), ``counts`` the host-side counts."""

    positions: Tensor  # (B, N) int64, distinct within a sample
    valid: Tensor  # (B, N) bool
    counts: list[int]
    length: int  # L


def partition_slots(index: Tensor, count: Tensor, side: bool) -> Slots:
    """Slots of the positions where the mask was ``side`` from its stable partition
    ``(index (B, L), count (B,))`` (``partition_indices``): true positions come first in
    ``index``, false positions after them. Padding slots wrap around the partition, so the
    slots of a sample stay distinct rows and scattering them back is deterministic."""
    length = index.shape[1]
    counts = count.tolist() if side else [length - c for c in count.tolist()]
    width = max(counts, default=0)
    slot = torch.arange(width, device=index.device)
    start = torch.zeros_like(count) if side else count
    order = (start.long().unsqueeze(1) + slot) % max(length, 1)
    positions = index.long().gather(1, order)
    valid = slot < torch.tensor(counts, device=index.device).unsqueeze(1)
    return Slots(positions, valid, counts, length)


def mask_slots(mask: Tensor) -> Slots:
    """Slots of the true positions of ``mask (B, L)`` bool."""
    return partition_slots(*partition_indices(mask), True)




def plan_groups(query_counts: list[int], key_counts: list[int],
                max_waste: float = MAX_PADDING_WASTE) -> list[list[int]]:
    """Samples that have queries and keys, grouped into padded calls.

    Samples are sorted by query×key pairs and a group grows while its padded pairs
    (members × max Nq × max Nk) stay within ``max_waste`` × its real pairs. Equal holes
    give one group; a group of several samples also gives the kernels' threads (which
    split the backward by sample) more than one task.
    """
    live = [b for b, (nq, nk) in enumerate(zip(query_counts, key_counts)) if nq and nk]
    live.sort(key=lambda b: query_counts[b] * key_counts[b])
    groups: list[list[int]] = []
    for b in live:
        if groups:
            trial = groups[-1] + [b]
            padded = len(trial) * max(query_counts[i] for i in trial) * max(key_counts[i] for i in trial)
            real = sum(query_counts[i] * key_counts[i] for i in trial)
            if padded <= max_waste * real:
                groups[-1] = trial
                continue
        groups.append([b])
    return [sorted(group) for group in groups]


@dataclasses.dataclass
class Block:
    """The slots of one group of samples, cut to its largest counts, as flat row indices
    into ``(B·L, D)`` views: ``reads`` for gathering (every slot reads a real row),
    ``writes`` for scattering (padding slots write to the spare row ``B·L`` of an output
    buffer, so no pass is spent zeroing them)."""

    reads: Tensor  # (G·N,) int64
    writes: Tensor  # (G·N,) int64
    valid: Tensor  # (G, N) bool
    rows: int  # B·L

    @classmethod
    def of(cls, slots: Slots, group: list[int]) -> "Block":
        batch, length = slots.positions.shape[0], slots.length
        width = max(slots.counts[b] for b in group)
        samples = torch.tensor(group, device=slots.positions.device).unsqueeze(1)
        if len(group) == batch:  # the whole batch: no selection copy
            positions, valid = slots.positions[:, :width], slots.valid[:, :width]
        else:
            positions, valid = slots.positions[samples[:, 0], :width], slots.valid[samples[:, 0], :width]
        reads = (samples * length + positions).flatten()
        writes = reads.masked_fill(~valid.flatten(), batch * length)
        return cls(reads, writes, valid, batch * length)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)

    @property
    def is_full(self) -> bool:
        return bool(self.valid.all())

    def gather(self, t: Tensor, width: int | None = None) -> Tensor:
        """Rows of ``t (B, L, D)`` → ``(G, N, width)`` contiguous, channels zero-padded to
        ``width`` (default D)."""
        batch, length, dim = t.shape
        if batch == 1 or t.stride(0) == length * t.stride(1):  # (B·L, D) is a view
            rows = t.reshape(batch * length, dim).index_select(0, self.reads).view(*self.shape, dim)
        elif t.stride(1) == 1:
            # A channel slice of a (B, C, L) map (the module attends over x itself): gather
            # along each channel's contiguous row (a row-wise gather would touch one cache
            # line per element), then transpose each sample's (D, N) block by a 2-D copy,
            # which ATen blocks for the caches (3× faster than one 3-D transposing copy at
            # layer 14).
            reads = self.reads.view(self.shape)
            rows = t.new_empty((*self.shape, dim))
            for g, b in enumerate((reads[:, 0] // length).tolist()):
                rows[g].copy_(torch.index_select(t[b].t(), 1, reads[g] - b * length).t())
        else:  # any other strides: one strided gather
            rows = t[self.reads // length, self.reads % length].view(*self.shape, dim)
        if not self.is_full:
            # Padding slots read rows outside the query/key set, whose values must reach no
            # product (0·NaN is NaN): they are zeroed.
            rows = rows.masked_fill(~self.valid.unsqueeze(-1), 0)
        if width is not None and dim < width:
            rows = F.pad(rows, (0, width - dim))
        return rows.contiguous()

    def scatter(self, into: Tensor, rows: Tensor) -> None:
        """Write ``rows (G, N, ...)`` into ``into (B·L + 1, ...)`` at the real slots (padding
        slots land on the spare last row)."""
        into.index_copy_(0, self.writes, rows.reshape(self.writes.shape[0], *into.shape[1:]))


def _output_rows(like: Tensor, dims: tuple = (), dtype=None, fill: float = 0.0) -> Tensor:
    """``(B·L + 1, *dims)`` buffer for a result shaped like ``like (B, L, ...)``, filled with
    ``fill``; its first B·L rows are the result, the last one takes the padding slots."""
    rows = like.shape[0] * like.shape[1] + 1
    return torch.full((rows, *dims), fill, dtype=dtype or like.dtype, device=like.device)


def _result(rows: Tensor, batch: int, length: int) -> Tensor:
    """The ``(B, L, ...)`` view of an ``_output_rows`` buffer without its spare row."""
    return rows[:batch * length].view(batch, length, *rows.shape[1:])


def _key_padding_mask(keys: Block, dtype: torch.dtype, heads: bool = False):
    """Additive mask ``(G, 1, Nk)`` (``(G, 1, 1, Nk)`` with ``heads``) hiding padded key
    slots, or None when none are padded."""
    if keys.is_full:
        return None
    mask = torch.zeros(keys.shape, dtype=dtype, device=keys.valid.device)
    mask = mask.masked_fill_(~keys.valid, float("-inf")).unsqueeze(1)
    return mask.unsqueeze(1) if heads else mask


def _head_width(q: Tensor, v: Tensor) -> int:
    return max(q.shape[2], v.shape[2])


def _scaled_(rows: Tensor, factor: float) -> Tensor:
    """``rows`` (a fresh gathered block) multiplied in place by ``factor``."""
    return rows if factor == 1.0 else rows.mul_(factor)


# ----------------------------------------------------------------------------- float32 tiles
def score_tiles(samples: int, queries: int, keys: int) -> list[tuple[int | slice, slice]]:
    """``(sample or samples, query rows)`` of each tile of a ``(G, Nq, Nk)`` score block.

    A tile's scores, ``samples × rows × Nk`` floats, stay within ``SCORE_TILE_BYTES`` so
    the passes over them (softmax, the P·V product) run from the caches, while each tile's
    GEMMs stay large enough to run at the BLAS's speed (at least ``MIN_TILE_ROWS`` rows). A tile of one sample is an ``int`` (its products are 2-D
    GEMMs, which MKL runs faster than a batch of one); small maps fit whole samples,
    several per tile (a ``slice``: one batched GEMM for many samples, few calls for the
    batch of a small map). The forward and the backward use the same tiles, so the
    backward recomputes bit for bit the scores the forward normalised (the BLAS rounds a
    row of Q·Kᵀ differently depending on how many rows its call holds).
    """
    budget = SCORE_TILE_BYTES // 4
    rows = max(1, min(queries, max(MIN_TILE_ROWS, budget // max(keys, 1))))
    per_tile = max(1, min(samples, budget // max(rows * keys, 1))) if rows == queries else 1
    tiles: list[tuple[int | slice, slice]] = []
    for first in range(0, samples, per_tile):
        tile_samples = first if per_tile == 1 else slice(first, min(first + per_tile, samples))
        tiles += [(tile_samples, slice(row, min(row + rows, queries)))
                  for row in range(0, queries, rows)]
    return tiles


def _product(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``bias + a·b`` for 2-D (one sample) or 3-D (a batch of samples) operands."""
    if a.dim() == 2:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    return torch.bmm(a, b, out=out) if bias is None else torch.baddbmm(bias, a, b, out=out)


def _accumulate_product_(into: Tensor, a: Tensor, b: Tensor) -> None:
    """``into += a·b`` in place, 2-D or 3-D."""
    (into.addmm_ if a.dim() == 2 else into.baddbmm_)(a, b)


def _tile_buffer(tiles: list[tuple[int | slice, slice]], keys: int, like: Tensor) -> Tensor:
    """A flat buffer the size of the largest tile's scores, reused by every tile: a fresh
    multi-MiB tensor per tile would be fresh pages (page faults inside the GEMM) each time."""
    largest = max((_tile_samples(tile) * (rows.stop - rows.start) for tile, rows in tiles), default=0)
    return like.new_empty(largest * keys)


def _tile_samples(tile: int | slice) -> int:
    return 1 if isinstance(tile, int) else tile.stop - tile.start


def _tile_view(buffer: Tensor, tile: int | slice, rows: slice, keys: int) -> Tensor:
    """The ``(rows, Nk)`` (one sample) or ``(samples, rows, Nk)`` front of a tile buffer."""
    shape = (rows.stop - rows.start, keys)
    if not isinstance(tile, int):
        shape = (_tile_samples(tile), *shape)
    return buffer[:math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------- compiled kernels
# The float32 kernels of csrc/masked_attention/cpu/attention.cpp (in dsa_ops._C): a group's
# forward and backward on the same tiles, and their row pass on its own (tested directly).
# Without the compiled library, the torch calls below do the same work (slower:
# docs/using-dsa.md, "CPU speed").
COMPILED_OPS = {
    "softmax_rows_": "(Tensor scores, Tensor(a!) probs, Tensor(b!) lse) -> ()",
    "attention_tiles_": ("(Tensor q, Tensor k, Tensor v, Tensor? key_bias, Tensor(a!) out, "
                         "Tensor(b!) lse) -> ()"),
    "attention_tiles_backward_": ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
                                  "Tensor? key_bias, Tensor(a!) grad_q, Tensor(b!) grad_k, "
                                  "Tensor(c!) grad_v) -> ()"),
}
for _name, _schema in COMPILED_OPS.items():
    registry.LIBRARY.define(_name + _schema)
    # They only write into their arguments: nothing for a fake tensor to compute.
    torch.library.register_fake(f"dsa_ops::{_name}", lambda *args: None, lib=registry.LIBRARY)


# How many threads the compiled kernels' ``at::parallel_for`` spreads ``tasks`` tasks over:
# 1 when dsa_ops._C was built without OpenMP though torch uses it (setup.py, _openmp_flags).
registry.LIBRARY.define("kernel_threads(int tasks) -> int")


def compiled_kernel_threads(tasks: int = 64) -> int:
    """Threads the compiled kernels run on now (at most ``torch.get_num_threads()``)."""
    return torch.ops.dsa_ops.kernel_threads(tasks)


@functools.cache
def compiled_kernels() -> bool:
    """Whether ``dsa_ops._C`` holds the CPU kernels of ``COMPILED_OPS``."""
    extension.load()
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa_ops::{name}", "CPU")
               for name in COMPILED_OPS)


def _use_compiled(compiled: bool | None) -> bool:
    return compiled_kernels() if compiled is None else compiled


# ----------------------------------------------------------------------------- torch tiles
def softmax_rows_torch(scores: Tensor, probs: Tensor, lse: Tensor) -> None:
    """What the compiled ``softmax_rows_`` does, with torch calls: ``probs = softmax(scores)``
    along the last dimension and ``lse = max + log Σ exp(s − max)`` of each row; scores,
    probs ``(..., rows, Nk)`` (``probs`` may be ``scores``), lse ``(..., rows)``."""
    row_max = scores.amax(dim=-1)  # before softmax: probs may be scores
    torch._softmax(scores, -1, False, out=probs)
    # The largest probability is exp(0)/Σ = 1/Σ.
    torch.sub(row_max, probs.amax(dim=-1).log_(), out=lse)


def _tile_probabilities(q: Tensor, keys_t: Tensor, key_bias: Tensor | None, tile: int | slice,
                        rows: slice, scores: Tensor, lse: Tensor) -> Tensor:
    """The probabilities of one tile, ``(rows, Nk)`` or ``(samples, rows, Nk)``, written over
    its scores S = q·Kᵀ (+ key_bias) in the front of the tile buffer, with their lse into
    ``lse``. Forward and backward run the same calls on the same tiles, so the backward's P
    is the forward's bit for bit."""
    keys = keys_t.shape[-1]
    tile_scores = _product(q[tile, rows], keys_t[tile], None if key_bias is None else key_bias[tile],
                           out=_tile_view(scores, tile, rows, keys))
    softmax_rows_torch(tile_scores, tile_scores, lse)
    return tile_scores


def _float32_forward(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None,
                     compiled: bool | None = None) -> tuple[Tensor, Tensor]:
    """Exact softmax attention of one group, tile by tile: ``q (G, Nq, Dqk)`` with the scale
    folded in, ``k (G, Nk, Dqk)``, ``v (G, Nk, Dv)``, ``key_bias (G, 1, Nk)`` or None →
    ``(out (G, Nq, Dv), lse (G, Nq))``. No padding of Dqk to Dv (the fused CPU kernel needs
    one head size: 8× the Q·Kᵀ work at Dqk 16, Dv 128)."""
    samples, queries, _ = q.shape
    keys = k.shape[1]
    out = v.new_empty((samples, queries, v.shape[2]))
    lse = q.new_empty((samples, queries))
    if _use_compiled(compiled):
        torch.ops.dsa_ops.attention_tiles_(q, k, v, key_bias, out, lse)
        return out, lse
    keys_t = k.transpose(1, 2)
    tiles = score_tiles(samples, queries, keys)
    scores = _tile_buffer(tiles, keys, q)
    for tile, rows in tiles:
        # lse[tile, rows] and out[tile, rows] are contiguous: whole samples, or rows of one.
        tile_probs = _tile_probabilities(q, keys_t, key_bias, tile, rows, scores, lse[tile, rows])
        _product(tile_probs, v[tile], out=out[tile, rows])
    return out, lse


def _float32_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                      key_bias: Tensor | None, compiled: bool | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``_float32_forward`` (same shapes): ``(dq, dk, dv)``, dq with respect to
    the scaled q. P is recomputed on the forward's tiles with its very calls (no lse needed):
    dV = Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K, dK = dSᵀ·Q. Padded query slots
    (zero rows of q, grad_out and out) get some P but dO = 0 and rowsum = 0 there, so they
    add nothing."""
    samples, queries, _ = q.shape
    grad_q = torch.empty_like(q)
    if _use_compiled(compiled):  # on the blocks of the compiled forward; it zeroes dK, dV
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        torch.ops.dsa_ops.attention_tiles_backward_(grad_out, q, k, v, out, key_bias,
                                                    grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
    delta = (grad_out * out).sum(dim=2, keepdim=True)  # (G, Nq, 1)
    keys = k.shape[1]
    keys_t, values_t = k.transpose(1, 2), v.transpose(1, 2)
    tiles = score_tiles(samples, queries, keys)
    probs, grad_scores_buffer = _tile_buffer(tiles, keys, q), _tile_buffer(tiles, keys, q)
    lse = q.new_empty((samples, queries))  # not needed: P is recomputed whole
    for tile, rows in tiles:
        tile_probs = _tile_probabilities(q, keys_t, key_bias, tile, rows, probs, lse[tile, rows])
        tile_grad_out = grad_out[tile, rows]
        _accumulate_product_(grad_v[tile], tile_probs.transpose(-1, -2), tile_grad_out)
        grad_scores = _product(tile_grad_out, values_t[tile],
                               out=_tile_view(grad_scores_buffer, tile, rows, keys))
        grad_scores.sub_(delta[tile, rows]).mul_(tile_probs)
        _product(grad_scores, k[tile], out=grad_q[tile, rows])
        _accumulate_product_(grad_k[tile], grad_scores.transpose(-1, -2), q[tile, rows])
    return grad_q, grad_k, grad_v


# ----------------------------------------------------------------------------- forward
def _poison_nonfinite_queries(block_q: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """NaN output and lse on query rows holding a non-finite value, as on every backend:
    aten's CPU kernel's row maximum skips NaN scores, so a NaN query row would come out as
    a row without keys (output 0). (The float32 path's row pass propagates NaN.)"""
    nonfinite = ~torch.isfinite(block_q).all(dim=-1)  # (G, Nq)
    if bool(nonfinite.any()):
        block_out.masked_fill_(nonfinite.unsqueeze(-1), float("nan"))
        block_lse.masked_fill_(nonfinite, float("nan"))


def _flash_forward_block(block_q: Tensor, block_k: Tensor, block_v: Tensor, keys: Block,
                         scale: float) -> tuple[Tensor, Tensor]:
    """aten's fused CPU kernel on one group (16-bit): ``(out (G, Nq, Dv), lse (G, Nq))``."""
    v_dim = block_v.shape[2]
    block_out, block_lse = _flash_forward(
        block_q.unsqueeze(1), block_k.unsqueeze(1), block_v.unsqueeze(1),
        attn_mask=_key_padding_mask(keys, block_q.dtype, heads=True), scale=scale)
    return block_out[:, 0, :, :v_dim], block_lse[:, 0]


def forward_slots(q: Tensor, k: Tensor, v: Tensor, queries: Slots, keys: Slots,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Attention from the query slots to the key slots; ``(out (B, L, Dv), lse (B, L))``.

    float32 runs ``_float32_forward`` (scale folded into the gathered queries: the
    backward recomputes the very same scores); 16-bit dtypes run aten's fused kernels,
    Q/K/V zero-padded to one head width."""
    batch, length, v_dim = v.shape
    out = _output_rows(v, (v_dim,))
    lse = _output_rows(q, dtype=reference.accumulation_dtype(q.dtype), fill=float("inf"))
    float32 = q.dtype == torch.float32
    width = None if float32 else _head_width(q, v)
    for group in plan_groups(queries.counts, keys.counts):
        query_block, key_block = Block.of(queries, group), Block.of(keys, group)
        block_q, block_k, block_v = (query_block.gather(q, width), key_block.gather(k, width),
                                     key_block.gather(v, width))
        if float32:  # a non-finite query row makes its row max, hence its out and lse, NaN
            block_out, block_lse = _float32_forward(_scaled_(block_q, scale), block_k, block_v,
                                                    _key_padding_mask(key_block, q.dtype))
        else:
            block_out, block_lse = _flash_forward_block(block_q, block_k, block_v, key_block, scale)
            block_out = block_out[..., :v_dim]
            _poison_nonfinite_queries(block_q, block_out, block_lse)
        query_block.scatter(out, block_out)
        query_block.scatter(lse, block_lse)
    return _result(out, batch, length), _result(lse, batch, length)


def forward(q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, key_mask: Tensor,
            scale: float) -> tuple[Tensor, ...]:
    """The ``cpu`` backend's forward op (``op.FORWARD_SCHEMA``): ``(out, lse)`` and the two
    partitions, which the backward op takes back."""
    query_partition = partition_indices(query_mask)
    key_partition = partition_indices(key_mask)
    out, lse = forward_slots(q, k, v, partition_slots(*query_partition, True),
                             partition_slots(*key_partition, True), scale)
    return out, lse, *query_partition, *key_partition


# ----------------------------------------------------------------------------- backward
def query_chunks(samples: int, queries: int) -> int:
    """How many chunks each sample's queries are split into for aten's 16-bit backward kernel.

    The CPU flash backward runs one task per (sample, head); with fewer tasks than
    intra-op threads the idle threads do not just wait, they slow the call down several
    times. Query chunks as extra heads (K and V broadcast, their gradients summed over
    the chunks) give every thread a task. (float32 runs ``_float32_backward``, whose
    GEMMs use every thread.)
    """
    return max(1, min(-(-torch.get_num_threads() // samples), queries))


def _as_query_heads(t: Tensor, chunks: int, fill: float = 0.0) -> Tensor:
    """``(G, N, ...)`` → ``(G, chunks, ⌈N/chunks⌉, ...)``, padding rows with ``fill``."""
    if chunks == 1:
        return t.unsqueeze(1)
    rows = -(-t.shape[1] // chunks) * chunks
    if rows > t.shape[1]:
        pad = [0, 0] * (t.dim() - 2) + [0, rows - t.shape[1]]
        t = F.pad(t, pad, value=fill)
    return t.view(t.shape[0], chunks, rows // chunks, *t.shape[2:])


def _from_query_heads(t: Tensor, queries: int) -> Tensor:
    """Inverse of ``_as_query_heads``: ``(G, chunks, n, ...)`` → ``(G, N, ...)``."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :queries]


def _sum_query_heads(t: Tensor) -> Tensor:
    """Key-side gradients ``(G, chunks, Nk, ...)`` summed over the chunks → ``(G, Nk, ...)``."""
    return t[:, 0] if t.shape[1] == 1 else t.sum(1)


def _flash_backward_block(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, keys: Block, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """aten's fused CPU backward on one group (16-bit; inputs ``(G, N, width)``, lse
    ``(G, Nq)``), queries split into chunks for the threads (``query_chunks``)."""
    samples, n_queries, _ = q.shape
    chunks = query_chunks(samples, n_queries)
    heads = [_as_query_heads(t, chunks) for t in (grad_out, q, out)]
    keys_values = [t.unsqueeze(1).expand(-1, chunks, -1, -1) for t in (k, v)]
    grads = _flash_backward(
        heads[0], heads[1], *keys_values, heads[2], _as_query_heads(lse, chunks, float("inf")),
        0.0, False, attn_mask=_key_padding_mask(keys, q.dtype, heads=True), scale=scale)
    return (_from_query_heads(grads[0], n_queries), _sum_query_heads(grads[1]),
            _sum_query_heads(grads[2]))


def _block_lse(lse: Tensor, queries: Block) -> Tensor:
    """The group's lse ``(G, Nq)`` float32; padded query slots get +inf, so P = 0 there and
    they add nothing to dK and dV whatever grad_out holds."""
    block_lse = lse.reshape(-1).index_select(0, queries.reads).view(queries.shape).float()
    return block_lse if queries.is_full else block_lse.masked_fill(~queries.valid, float("inf"))


def backward_slots(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   queries: Slots, keys: Slots, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)``, zero outside the query and key slots."""
    batch, length, _ = q.shape
    grad_q, grad_k, grad_v = (_output_rows(t, t.shape[2:]) for t in (q, k, v))
    qk_dim, v_dim = q.shape[2], v.shape[2]
    float32 = q.dtype == torch.float32
    width = None if float32 else _head_width(q, v)
    for group in plan_groups(queries.counts, keys.counts):
        query_block, key_block = Block.of(queries, group), Block.of(keys, group)
        block_grad_out, block_q, block_out = (query_block.gather(t, width) for t in (grad_out, q, out))
        block_k, block_v = key_block.gather(k, width), key_block.gather(v, width)
        if float32:  # recomputes P without lse (``_float32_backward``)
            grads = _float32_backward(block_grad_out, _scaled_(block_q, scale), block_k, block_v,
                                      block_out, _key_padding_mask(key_block, q.dtype))
            block_grad_q = _scaled_(grads[0], scale)
        else:
            grads = _flash_backward_block(block_grad_out, block_q, block_k, block_v, block_out,
                                          _block_lse(lse, query_block), key_block, scale)
            block_grad_q = grads[0]
        query_block.scatter(grad_q, block_grad_q[..., :qk_dim])
        key_block.scatter(grad_k, grads[1][..., :qk_dim])
        key_block.scatter(grad_v, grads[2][..., :v_dim])
    return tuple(_result(grad, batch, length) for grad in (grad_q, grad_k, grad_v))


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             query_mask: Tensor, key_mask: Tensor, query_index: Tensor, query_count: Tensor,
             key_index: Tensor, key_count: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ``cpu`` backend's backward op (``op.BACKWARD_SCHEMA``), on the forward's partitions."""
    return backward_slots(grad_out, q, k, v, out, lse,
                          partition_slots(query_index, query_count, True),
                          partition_slots(key_index, key_count, True), scale)


# ----------------------------------------------------------------------------- both DSA branches
def foreground_slots(index: Tensor, count: Tensor) -> tuple[Slots, Slots]:
    """One partition of the foreground: ``(foreground slots, background slots)``. The
    foreground slots are the queries of both branches and the keys of the self branch."""
    return partition_slots(index, count, True), partition_slots(index, count, False)


def dual_forward(q_cross, k_cross, v_cross, q_self, k_self, v_self, foreground, scale):
    """``(out_cross, lse_cross, out_self, lse_self, foreground_index, foreground_count)``:
    cross = fg → bg, self = fg → fg, and the foreground's partition for the backward."""
    partition = partition_indices(foreground)
    fg, bg = foreground_slots(*partition)
    return (*forward_slots(q_cross, k_cross, v_cross, fg, bg, scale),
            *forward_slots(q_self, k_self, v_self, fg, fg, scale), *partition)


def dual_backward(grad_out_cross, grad_out_self, q_cross, k_cross, v_cross, q_self, k_self, v_self,
                  out_cross, lse_cross, out_self, lse_self, foreground, foreground_index,
                  foreground_count, scale):
    """Gradients of both branches: ``(dq, dk, dv)`` of the cross branch, then of the self branch."""
    fg, bg = foreground_slots(foreground_index, foreground_count)
    return (*backward_slots(grad_out_cross, q_cross, k_cross, v_cross, out_cross, lse_cross, fg, bg,
                            scale),
            *backward_slots(grad_out_self, q_self, k_self, v_self, out_self, lse_self, fg, fg, scale))
