"""The "cpu" backend of masked attention: compaction, PyTorch's CPU flash attention, scatter.

Each sample's query rows and key rows are gathered into dense blocks (compaction with
``partition_indices``), PyTorch's flash-attention CPU kernels
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: online softmax,
log-sum-exp saved for the backward, threads from torch's intra-op pool) run on the
blocks, and the rows are scattered back. No work is spent on non-query rows or non-key
columns and no ``L×L`` matrix is built.

Layout of one call (``Rows``): a group of samples is padded to its largest query count
``Nq`` and key count ``Nk``; padded key slots are masked with -inf, padded query slots
are computed and dropped. Samples are grouped so that padding wastes little work
(``plan_groups``): a batch of equal holes is one call, very unequal holes run apart.
Samples without queries or without keys are left out (their outputs are 0, lse +inf).

The CPU kernels need one head size for Q, K and V: the narrower side is zero-padded to
the wider (zero channels leave q·k and P·V unchanged; the scale is passed explicitly).
In float32 the scale is folded into the gathered queries instead (``_score_scale``): the
CPU flash forward and backward apply an explicit scale with different roundings, which
at score magnitudes near 10³ (scale 10, q/k std 3) left float32 dV at ~40× the
reference's own error; with the scale in q both passes compute the same scores.
These functions know nothing of autograd; ``op`` and ``dual`` register them.

Shapes: q, k ``(B, L, Dqk)``, v ``(B, L, Dv)``, any strides; out ``(B, L, Dv)``; lse
``(B, L)`` float32, +inf on rows that are no query or have no keys (``reference.py``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dsa_ops.ops.masked_attention import reference
from dsa_ops.ops.partition.reference import partition_indices

Tensor = torch.Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A group of samples runs as one padded call while its padded query×key pairs are at most
# this factor of the real ones (the rest of the time goes into masked work).
MAX_PADDING_WASTE = 1.25

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

    def gather(self, t: Tensor, width: int) -> Tensor:
        """Rows of ``t (B, L, D)`` → ``(G, 1, N, width)``, zero-padded channels (one head)."""
        batch, length, dim = t.shape
        if batch == 1 or t.stride(0) == length * t.stride(1):  # (B·L, D) is a view
            rows = t.reshape(batch * length, dim).index_select(0, self.reads).view(*self.shape, dim)
        elif t.stride(1) == 1:
            # A channel slice of a (B, C, L) map: gather along each channel's contiguous row
            # (a row-wise gather would touch one cache line per element).
            reads = self.reads.view(self.shape)
            channel_rows = t.new_empty((self.shape[0], dim, self.shape[1]))
            for g, b in enumerate((reads[:, 0] // length).tolist()):
                torch.index_select(t[b].t(), 1, reads[g] - b * length, out=channel_rows[g])
            rows = channel_rows.transpose(1, 2)
        else:  # any other strides: one strided gather
            rows = t[self.reads // length, self.reads % length].view(*self.shape, dim)
        if not self.is_full:
            # Padding slots read rows outside the query/key set, whose values must reach no
            # product (0·NaN is NaN): they are zeroed.
            rows = rows.masked_fill(~self.valid.unsqueeze(-1), 0)
        if dim < width:
            rows = F.pad(rows, (0, width - dim))
        return rows.contiguous().unsqueeze(1)

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


def _key_padding_mask(keys: Block, dtype: torch.dtype):
    """Additive mask ``(G, 1, 1, Nk)`` hiding padded key slots, or None when none are padded."""
    if keys.is_full:
        return None
    mask = torch.zeros(keys.shape, dtype=dtype, device=keys.valid.device)
    return mask.masked_fill_(~keys.valid, float("-inf"))[:, None, None, :]


def _head_width(q: Tensor, v: Tensor) -> int:
    return max(q.shape[2], v.shape[2])


def _score_scale(dtype: torch.dtype, scale: float) -> tuple[float, float]:
    """``(factor for the gathered queries, scale for the kernels)``: float32 folds the scale
    into q (see the module notes); 16-bit keeps q as given, its rounding would cost more."""
    return (scale, 1.0) if dtype == torch.float32 else (1.0, scale)


def _scaled_(rows: Tensor, factor: float) -> Tensor:
    """``rows`` (a fresh gathered block) multiplied in place by ``factor``."""
    return rows if factor == 1.0 else rows.mul_(factor)


# ----------------------------------------------------------------------------- forward
def _poison_nonfinite_queries(block_q: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """NaN output and lse on query rows holding a non-finite value, as on every backend:
    the CPU kernel's row maximum skips NaN scores, so a NaN query row would come out as a
    row without keys (output 0)."""
    nonfinite = ~torch.isfinite(block_q).all(dim=-1)  # (G, 1, Nq)
    if bool(nonfinite.any()):
        block_out.masked_fill_(nonfinite.unsqueeze(-1), float("nan"))
        block_lse.masked_fill_(nonfinite, float("nan"))


def forward_slots(q: Tensor, k: Tensor, v: Tensor, queries: Slots, keys: Slots,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Attention from the query slots to the key slots; ``(out (B, L, Dv), lse (B, L))``."""
    batch, length, v_dim = v.shape
    out = _output_rows(v, (v_dim,))
    lse = _output_rows(q, dtype=reference.accumulation_dtype(q.dtype), fill=float("inf"))
    width = _head_width(q, v)
    query_factor, kernel_scale = _score_scale(q.dtype, scale)
    for group in plan_groups(queries.counts, keys.counts):
        query_block, key_block = Block.of(queries, group), Block.of(keys, group)
        block_q = _scaled_(query_block.gather(q, width), query_factor)
        block_out, block_lse = _flash_forward(
            block_q, key_block.gather(k, width), key_block.gather(v, width),
            attn_mask=_key_padding_mask(key_block, q.dtype), scale=kernel_scale)
        _poison_nonfinite_queries(block_q, block_out, block_lse)
        query_block.scatter(out, block_out[:, 0, :, :v_dim])
        query_block.scatter(lse, block_lse[:, 0])
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
def query_chunks(samples: int, queries: int, dtype: torch.dtype) -> int:
    """How many chunks each sample's queries are split into for the backward kernel.

    The CPU flash backward runs one task per (sample, head); with fewer tasks than
    intra-op threads the idle threads do not just wait, they slow the call down several
    times. Query chunks as extra heads (K and V broadcast, their gradients summed over
    the chunks) give every thread a task.

    float32 is never split: the backward must recompute exactly the scores the forward
    normalised (P = exp(s − lse)), and the BLAS behind the kernels rounds a row of Q·Kᵀ
    differently depending on how many rows a call holds (MKL on AVX-512: row blocks of
    1–3 rows take another path), so chunked queries put float32 dV at ~12× the
    reference's own error at large score magnitudes. The same query block as the forward
    gives the same GEMM calls, hence the same scores.
    """
    if dtype == torch.float32:
        return 1
    return max(1, min(-(-torch.get_num_threads() // samples), queries))


def _as_query_heads(t: Tensor, chunks: int, fill: float = 0.0) -> Tensor:
    """``(G, 1, N, ...)`` → ``(G, chunks, ⌈N/chunks⌉, ...)``, padding rows with ``fill``."""
    if chunks == 1:
        return t
    rows = -(-t.shape[2] // chunks) * chunks
    if rows > t.shape[2]:
        pad = [0, 0] * (t.dim() - 3) + [0, rows - t.shape[2]]
        t = F.pad(t, pad, value=fill)
    return t.view(t.shape[0], chunks, rows // chunks, *t.shape[3:])


def _from_query_heads(t: Tensor, queries: int) -> Tensor:
    """Inverse of ``_as_query_heads``: ``(G, chunks, n, ...)`` → ``(G, N, ...)``."""
    return t.reshape(t.shape[0], -1, *t.shape[3:])[:, :queries]


def _sum_query_heads(t: Tensor) -> Tensor:
    """Key-side gradients ``(G, chunks, Nk, ...)`` summed over the chunks → ``(G, Nk, ...)``."""
    return t[:, 0] if t.shape[1] == 1 else t.sum(1)


def backward_slots(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   queries: Slots, keys: Slots, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_q, grad_k, grad_v)``, zero outside the query and key slots."""
    batch, length, _ = q.shape
    grad_q, grad_k, grad_v = (_output_rows(t, t.shape[2:]) for t in (q, k, v))
    width = _head_width(q, v)
    qk_dim, v_dim = q.shape[2], v.shape[2]
    query_factor, kernel_scale = _score_scale(q.dtype, scale)
    for group in plan_groups(queries.counts, keys.counts):
        query_block, key_block = Block.of(queries, group), Block.of(keys, group)
        samples, n_queries = query_block.shape
        chunks = query_chunks(samples, n_queries, q.dtype)
        # Padded query slots (and padding rows of the chunks) get +inf lse, so P = 0 there
        # and they add nothing to dK and dV whatever grad_out holds.
        block_lse = lse.reshape(batch * length).index_select(0, query_block.reads)
        block_lse = block_lse.view(query_block.shape).float()
        if not query_block.is_full:
            block_lse = block_lse.masked_fill(~query_block.valid, float("inf"))
        scaled_q = _scaled_(query_block.gather(q, width), query_factor)
        heads = [_as_query_heads(t, chunks)
                 for t in (query_block.gather(grad_out, width), scaled_q,
                           query_block.gather(out, width))]
        keys_values = [key_block.gather(t, width).expand(-1, chunks, -1, -1) for t in (k, v)]
        grads = _flash_backward(
            heads[0], heads[1], *keys_values, heads[2],
            _as_query_heads(block_lse.unsqueeze(1), chunks, float("inf")), 0.0, False,
            attn_mask=_key_padding_mask(key_block, q.dtype), scale=kernel_scale)
        grad_scaled_q = _from_query_heads(grads[0], n_queries)[..., :qk_dim]
        query_block.scatter(grad_q, _scaled_(grad_scaled_q, query_factor))
        key_block.scatter(grad_k, _sum_query_heads(grads[1])[..., :qk_dim])
        key_block.scatter(grad_v, _sum_query_heads(grads[2])[..., :v_dim])
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
