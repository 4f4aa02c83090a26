"""The Triton kernels behind :mod:`qwen_magic.kernels.decode` (imported only when triton is there).

One decode step's attention for one query token against a static cache, split over the cache (as
flash-decoding does): ``partial_kernel`` has a program per (key/value head, chunk of ``BLOCK`` cache
positions); it scores the chunk for the ``G`` query heads that share the key/value head (one read of
the keys and values for all of them), with float32 scores, the mask applied (positions the mask does
not allow are not read at all; a chunk with none stops after its first load), and keeps the chunk's maximum, its sum of exponentials and its
un-normalized ``P @ V`` (``P`` rounded to the model's dtype for the product, as eager attention rounds
its weights). ``combine_kernel`` has a program per query head and adds the chunks' parts in a fixed
order, scaled to the overall maximum, then divides by the total (deterministic, no atomics); it reads
only the chunks up to the last one with an allowed position. The cache's length and chunk count are runtime
arguments: a cache that grows does not compile the kernels again (a compile is a pause of ~0.2 s).

The ``*_rows_kernel`` variants find the cache through device memory (a row of addresses and the capacity per
layer, written by ``decode.fill_rows``) and the filled length through the layer's write counter, with a fixed
grid: a CUDA graph captured with them outlives the cache, so a cache that grows needs no new capture (which
cost a Python forward, 45-60 ms of host time on an H100 host, between a reply's first two tokens). Each chunk's
part and the combination are the same arithmetic as the others'.
"""

import triton
import triton.language as tl


@triton.jit
def _chunk(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, head, chunk, chunks, attend, positions,
           q_head_stride, k_head_stride, k_pos_stride, v_head_stride, v_pos_stride, scale,
           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """One chunk's part for the ``G`` query heads of key/value head ``head``, in slot ``(head, chunk)`` of ``chunks``."""
    groups = tl.arange(0, GP)
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    part = (head * chunks + chunk) * G + groups  # one slot per (head, chunk, query head of the group)
    keep = groups < G
    top = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], dtype=tl.float32)
    if tl.max(attend.to(tl.int32), axis=0) > 0:  # a chunk the mask leaves out entirely (past the filled part) ends here
        q = tl.load(q_ptr + (head * G + groups)[:, None] * q_head_stride + dims[None, :],
                    mask=keep[:, None] & dim_ok[None, :], other=0.0)
        k = tl.load(k_ptr + head * k_head_stride + positions[:, None] * k_pos_stride + dims[None, :],
                    mask=attend[:, None] & dim_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK], float32
        scores = tl.where(attend[None, :], scores, float("-inf"))
        top = tl.max(scores, axis=1)
        p = tl.exp(scores - top[:, None])  # 0 where the mask says no (this chunk has an allowed position)
        total = tl.sum(p, axis=1)
        v = tl.load(v_ptr + head * v_head_stride + positions[:, None] * v_pos_stride + dims[None, :],
                    mask=attend[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v)  # [GP, DP], float32
        tl.store(acc_ptr + part[:, None] * D + dims[None, :], acc, mask=keep[:, None] & dim_ok[None, :])
    tl.store(m_ptr + part, top, mask=keep)
    tl.store(l_ptr + part, total, mask=keep)


@triton.jit(do_not_specialize=["length", "chunks"])
def partial_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
                   q_head_stride, k_head_stride, k_pos_stride, v_head_stride, v_pos_stride, mask_stride, length, scale, chunks,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    positions = chunk * BLOCK + tl.arange(0, BLOCK)
    attend = tl.load(mask_ptr + positions * mask_stride, mask=positions < length, other=0) != 0
    _chunk(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, head, chunk, chunks, attend, positions,
           q_head_stride, k_head_stride, k_pos_stride, v_head_stride, v_pos_stride, scale, G, GP, D, DP)


@triton.jit
def partial_rows_kernel(q_ptr, row_ptr, parts_ptr, counter_ptr, q_head_stride, scale,
                        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    """``partial_kernel`` for a cache found through device memory, so that a captured graph outlives the cache (a
    larger one after growth is the same graph): ``row_ptr`` holds the layer's keys and values addresses and its
    capacity (keys and values contiguous, (1, heads, capacity, D)), ``parts_ptr`` the addresses of the chunk parts'
    buffers and their number of chunk slots; the positions attended are those before the layer's write counter
    (causal, no window: what the mask of a one-token step says). A fixed grid: program (head, i) takes chunks i,
    i + programs, ... up to the last filled one; each chunk's part is the one ``partial_kernel`` computes."""
    head = tl.program_id(0)
    element = q_ptr.dtype.element_ty
    k_ptr = tl.load(row_ptr).to(tl.pointer_type(element))
    v_ptr = tl.load(row_ptr + 1).to(tl.pointer_type(element))
    capacity = tl.load(row_ptr + 2)
    m_ptr = tl.load(parts_ptr).to(tl.pointer_type(tl.float32))
    l_ptr = tl.load(parts_ptr + 1).to(tl.pointer_type(tl.float32))
    acc_ptr = tl.load(parts_ptr + 2).to(tl.pointer_type(tl.float32))
    slots = tl.load(parts_ptr + 3)
    filled = tl.minimum(tl.load(counter_ptr), capacity)
    live = tl.minimum((filled + BLOCK - 1) // BLOCK, slots)
    chunk = tl.program_id(1)
    while chunk < live:
        positions = chunk * BLOCK + tl.arange(0, BLOCK)
        _chunk(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, head, chunk, slots, positions < filled, positions,
               q_head_stride, capacity * D, D, capacity * D, D, scale, G, GP, D, DP)
        chunk += tl.num_programs(1)


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, chunks_total, scanned, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
             CB: tl.constexpr, PB: tl.constexpr):
    """Query head ``program_id(0)``: its parts in slots of ``chunks_total`` chunks, the first ``scanned`` of them read."""
    query_head = tl.program_id(0)
    head = query_head // G
    group = query_head % G
    dims = tl.arange(0, DP)
    dim_ok = dims < D
    base = head * chunks_total * G + group
    top = float("-inf")
    live_chunks = 0
    start = 0
    while start < scanned:  # the overall maximum, and how many chunks hold allowed positions (a while loop: the
        chunks = start + tl.arange(0, CB)  # bound is a runtime value, which the interpreter's range() cannot take)
        m = tl.load(m_ptr + base + chunks * G, mask=chunks < scanned, other=float("-inf"))
        top = tl.maximum(top, tl.max(m, axis=0))
        live_chunks = tl.maximum(live_chunks, tl.max(tl.where(m > float("-inf"), chunks + 1, 0), axis=0))
        start += CB
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = 0.0
    acc = tl.zeros([DP], dtype=tl.float32)
    start = 0
    while start < live_chunks:  # the chunks' parts, in chunk order, up to the last live one
        chunks = start + tl.arange(0, PB)
        m = tl.load(m_ptr + base + chunks * G, mask=chunks < live_chunks, other=float("-inf"))
        live = m > float("-inf")
        weight = tl.where(live, tl.exp(m - safe), 0.0)
        total += tl.sum(weight * tl.load(l_ptr + base + chunks * G, mask=live, other=0.0), axis=0)
        parts = tl.load(acc_ptr + (base + chunks * G)[:, None] * D + dims[None, :], mask=live[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * parts, axis=0)
        start += PB
    out = acc / total
    tl.store(out_ptr + query_head * D + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit(do_not_specialize=["chunks_total"])
def combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, chunks_total, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   CB: tl.constexpr, PB: tl.constexpr):
    _combine(m_ptr, l_ptr, acc_ptr, out_ptr, chunks_total, chunks_total, G, D, DP, CB, PB)


@triton.jit
def combine_rows_kernel(parts_ptr, row_ptr, counter_ptr, out_ptr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        CB: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr):
    """``combine_kernel`` after ``partial_rows_kernel``: the buffers from ``parts_ptr``, only the chunks written this
    step read (the others hold an earlier layer's parts)."""
    m_ptr = tl.load(parts_ptr).to(tl.pointer_type(tl.float32))
    l_ptr = tl.load(parts_ptr + 1).to(tl.pointer_type(tl.float32))
    acc_ptr = tl.load(parts_ptr + 2).to(tl.pointer_type(tl.float32))
    slots = tl.load(parts_ptr + 3)
    filled = tl.minimum(tl.load(counter_ptr), tl.load(row_ptr + 2))
    _combine(m_ptr, l_ptr, acc_ptr, out_ptr, slots, tl.minimum((filled + BLOCK - 1) // BLOCK, slots), G, D, DP, CB, PB)


@triton.jit
def _write(k_ptr, v_ptr, keys_ptr, values_ptr, counter_ptr, capacity,
           k_head_stride, v_head_stride, keys_head_stride, keys_pos_stride, values_head_stride, values_pos_stride,
           HEADS: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    position = tl.load(counter_ptr)
    heads = tl.arange(0, HP)[:, None]
    inside = position < capacity
    dk = tl.arange(0, DKP)[None, :]
    keys_mask = (heads < HEADS) & (dk < DK)
    k = tl.load(k_ptr + heads * k_head_stride + dk, mask=keys_mask, other=0.0)
    tl.store(keys_ptr + heads * keys_head_stride + position * keys_pos_stride + dk, k, mask=keys_mask & inside)
    dv = tl.arange(0, DVP)[None, :]
    values_mask = (heads < HEADS) & (dv < DV)
    v = tl.load(v_ptr + heads * v_head_stride + dv, mask=values_mask, other=0.0)
    tl.store(values_ptr + heads * values_head_stride + position * values_pos_stride + dv, v, mask=values_mask & inside)
    tl.debug_barrier()  # every thread has read the counter before it moves
    tl.store(counter_ptr, position + 1)


@triton.jit
def cache_write_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, counter_ptr, capacity,
                       k_head_stride, v_head_stride, keys_head_stride, keys_pos_stride, values_head_stride, values_pos_stride,
                       HEADS: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """One token's keys and values into a static cache layer at its write counter, then the counter + 1 (what
    transformers' ``StaticLayer.update`` does with an arange, two adds and two ``index_copy_``): one program."""
    _write(k_ptr, v_ptr, keys_ptr, values_ptr, counter_ptr, capacity, k_head_stride, v_head_stride, keys_head_stride,
           keys_pos_stride, values_head_stride, values_pos_stride, HEADS, HP, DK, DKP, DV, DVP)


@triton.jit
def cache_write_rows_kernel(k_ptr, v_ptr, row_ptr, counter_ptr, k_head_stride, v_head_stride,
                            HEADS: tl.constexpr, HP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr):
    """``cache_write_kernel`` for a layer found through ``row_ptr`` (as ``partial_rows_kernel`` reads it)."""
    capacity = tl.load(row_ptr + 2)
    keys_ptr = tl.load(row_ptr).to(tl.pointer_type(k_ptr.dtype.element_ty))
    values_ptr = tl.load(row_ptr + 1).to(tl.pointer_type(v_ptr.dtype.element_ty))
    _write(k_ptr, v_ptr, keys_ptr, values_ptr,
           counter_ptr, capacity, k_head_stride, v_head_stride, capacity * DK, DK, capacity * DV, DV, HEADS, HP, DK, DKP, DV, DVP)
