"""The Triton kernel behind :mod:`qwen_magic.kernels.prefill` (imported only when triton is there).

Causal attention of a prefill chunk against the static cache (flash attention's online softmax): a
program per (block of ``BLOCK_M`` query tokens, query head). Query token ``i`` of the chunk sits at cache
position ``start + i`` and sees positions ``0 .. start + i`` (causal attention aligned to the last key,
as after a cached prefix); a whole prompt is ``start = 0``. The query head ``h`` reads key/value head
``h // GROUP`` from the cache as it is (no copy per query head). Key blocks wholly before the block's
first query position take no mask; only the blocks on the diagonal do. Scores and the softmax are in
float32 (``exp2`` of scores pre-scaled by ``log2 e``), the weights are rounded to the model's dtype for
the product with the values, as flash attention does; the output is written in the layout attention
interfaces return, (batch, tokens, heads, dim). The chunk's length is a runtime argument (a new prompt
length does not compile the kernel again) and its start is read from device memory (one int32), so a prefill
captured in a CUDA graph replays at any start.
"""

import triton
import triton.language as tl


@triton.jit
def _block(acc, top, total, q, k_ptrs, v_ptrs, n0, rows, limit, qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
           k_pos_stride, v_pos_stride):
    cols = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptrs + n0 * k_pos_stride, mask=(cols < limit)[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * v_pos_stride, mask=(cols < limit)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + n0 * k_pos_stride)
        v = tl.load(v_ptrs + n0 * v_pos_stride)
    scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N] float32, in units of log2
    if MASKED:
        scores = tl.where(cols[None, :] <= rows[:, None], scores, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, axis=1))
    alpha = tl.exp2(top - new_top)
    p = tl.exp2(scores - new_top[:, None])
    total = total * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, new_top, total


@triton.jit(do_not_specialize=["M"])
def prefill_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, M, start_ptr, qk_scale,
                             q_head_stride, q_pos_stride, k_head_stride, k_pos_stride, v_head_stride, v_pos_stride,
                             o_pos_stride, o_head_stride,
                             GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             INTERPRETED: tl.constexpr):
    head = tl.program_id(0)
    start = tl.load(start_ptr)  # from the device: a CUDA graph of the prefill replays at any start
    block = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows (most keys) first: the last wave is short
    kv_head = head // GROUP
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    row_ok = offs_m < M
    q = tl.load(q_ptr + head * q_head_stride + offs_m[:, None] * q_pos_stride + dims[None, :], mask=row_ok[:, None], other=0.0)
    rows = start + offs_m  # each query token's cache position: it sees keys up to it
    limit = start + M  # positions written (keys past it are not read)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    k_ptrs = k_ptr + kv_head * k_head_stride + tl.arange(0, BLOCK_N)[:, None] * k_pos_stride + dims[None, :]
    v_ptrs = v_ptr + kv_head * v_head_stride + tl.arange(0, BLOCK_N)[:, None] * v_pos_stride + dims[None, :]
    first = start + block * BLOCK_M  # the block's first query position: keys before it are visible to every row
    free = (first // BLOCK_N) * BLOCK_N
    last = tl.minimum(first + BLOCK_M, limit)  # one past the last key any row of the block sees
    if INTERPRETED:  # the interpreter's range() takes no tensor bounds
        n0 = 0
        while n0 < free:
            acc, top, total = _block(acc, top, total, q, k_ptrs, v_ptrs, n0, rows, limit, qk_scale, BLOCK_N, False,
                                     k_pos_stride, v_pos_stride)
            n0 += BLOCK_N
        while n0 < last:
            acc, top, total = _block(acc, top, total, q, k_ptrs, v_ptrs, n0, rows, limit, qk_scale, BLOCK_N, True,
                                     k_pos_stride, v_pos_stride)
            n0 += BLOCK_N
    else:  # for loops: the compiler pipelines their loads
        for n0 in tl.range(0, free, BLOCK_N):
            acc, top, total = _block(acc, top, total, q, k_ptrs, v_ptrs, n0, rows, limit, qk_scale, BLOCK_N, False,
                                     k_pos_stride, v_pos_stride)
        for n0 in tl.range(free, last, BLOCK_N):
            acc, top, total = _block(acc, top, total, q, k_ptrs, v_ptrs, n0, rows, limit, qk_scale, BLOCK_N, True,
                                     k_pos_stride, v_pos_stride)
    out = acc / total[:, None]
    tl.store(o_ptr + offs_m[:, None] * o_pos_stride + head * o_head_stride + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
