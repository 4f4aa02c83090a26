"""The Triton kernels behind :mod:`qwen_magic.kernels.nf4` (imported only when triton is there).

``matvec_kernel`` reads one tile of ``BLOCK_N`` output rows and, per loop step, ``BLOCK_K`` input
columns of bitsandbytes' packed 4-bit weight, as a 3-D tile ``[BLOCK_N, NB, HB]`` of bytes:
``NB = BLOCK_K // SUB`` quantization sub-blocks of ``HB = SUB // 2`` bytes each (``SUB`` is
``min(blocksize, BLOCK_K)``). When every row starts at a block boundary (``K % blocksize == 0``,
``ALIGNED``) the scale is loaded once per ``[row, sub-block]`` and broadcast over its bytes;
otherwise it is gathered per element. Each byte holds two codes, the high nibble first (the
element with the even index), so the byte tile meets ``x`` split into even and odd columns.

``X_PAIRS`` reads ``x`` as ``[1, NB, SUB]`` (contiguous, vector loads) and splits it into even and
odd columns; otherwise two stride-2 loads. ``GATHER_ASM`` does the table lookups with inline PTX
(``ld.global.nc.f32``), elementwise ops that keep the bytes' register layout, where ``tl.load``
gathers get a layout of their own and a shuffle through shared memory (CUDA only).

Codes go through the 16-entry table (a gather from a 64-byte table that stays in L1), are scaled by
the block's absmax in float32 (double quantization: ``code2[absmax_u8] * absmax2[block // blocksize2]
+ offset``, the same float32 operations bitsandbytes does), rounded to the compute dtype as
bitsandbytes' dequantized weight is (``ROUND``), multiplied by ``x`` in float32 and summed in float32.

With ``SPLIT`` the program covers one slice of K (``pid 1``) and stores its float32 partial sums
into ``[splits, N]``; ``reduce_kernel`` then adds the slices in a fixed order (deterministic,
unlike atomics), adds the bias and casts.
"""

import triton
import triton.language as tl


def _matvec(x_ptr, w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
            N, K, KB, k_split,
            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
            ALIGNED: tl.constexpr, ROUND: tl.constexpr, SPLIT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, STEPS: tl.constexpr,
            X_PAIRS: tl.constexpr = False, GATHER_ASM: tl.constexpr = False):
    NB: tl.constexpr = BLOCK_K // SUB
    HB: tl.constexpr = SUB // 2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    row_bytes = (rows64 * KB)[:, None, None]  # KB = K // 2 (K is even: every row starts on a byte)
    sub = tl.arange(0, NB)[None, :, None]
    byte = sub * HB + tl.arange(0, HB)[None, None, :]  # [1, NB, HB] byte offset inside the tile

    k_start = pid_s * k_split  # k_split is a multiple of BLOCK_K; the last slice is masked at K
    acc = tl.zeros([BLOCK_N, NB, HB], dtype=tl.float32)
    if NESTED:
        offset = tl.load(offset_ptr)
    for step in range(0, STEPS):  # STEPS = k_split // BLOCK_K (a constant: the interpreter can't loop to a runtime bound)
        k0 = k_start + step * BLOCK_K
        col = k0 + 2 * byte  # column of the high nibble; the low nibble is col + 1 (K is even)
        if ALIGNED:  # whole sub-blocks in or out: a mask constant over the bytes (vector loads)
            col_mask = (k0 + sub * SUB) < K
        else:
            col_mask = col < K
        mask = row_mask[:, None, None] & col_mask
        packed = tl.load(w_ptr + row_bytes + (k0 // 2 + byte), mask=mask, other=0).to(tl.int32)
        if GATHER_ASM:  # the table lookups as elementwise PTX loads: they keep the bytes' layout (no shuffle through shared memory)
            w_hi = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [code_ptr + (packed >> 4)], dtype=tl.float32, is_pure=True, pack=1)
            w_lo = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [code_ptr + (packed & 15)], dtype=tl.float32, is_pure=True, pack=1)
        else:
            w_hi = tl.load(code_ptr + (packed >> 4))
            w_lo = tl.load(code_ptr + (packed & 15))

        if ALIGNED:  # one scale per [row, sub-block], broadcast over its HB bytes
            block = rows64[:, None, None] * (K // BLOCKSIZE) + (k0 + sub * SUB) // BLOCKSIZE
            block_mask = mask
        else:  # blocks run across rows: one index per element (both nibbles share it, blocksize is even)
            block = (rows64[:, None, None] * K + col) // BLOCKSIZE
            block_mask = mask
        if NESTED:
            a8 = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=block_mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0).to(tl.float32)

        w_hi = w_hi * scale
        w_lo = w_lo * scale
        if ROUND == 1:  # the dequantized weight bitsandbytes would hand to the matmul, in float16
            w_hi = w_hi.to(tl.float16).to(tl.float32)
            w_lo = w_lo.to(tl.float16).to(tl.float32)
        elif ROUND == 2:  # ... in bfloat16: round to nearest even on the bits (no bf16 hardware needed)
            u = w_hi.to(tl.uint32, bitcast=True)
            w_hi = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            u = w_lo.to(tl.uint32, bitcast=True)
            w_lo = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)

        if X_PAIRS:  # x read contiguously as [1, NB, HB, 2] (vector loads), then split in even and odd
            xcol = k0 + sub * SUB + tl.arange(0, SUB)[None, None, :]  # [1, NB, SUB], contiguous
            if ALIGNED:
                x_mask = col_mask  # [1, NB, 1]: whole sub-blocks
            else:
                x_mask = xcol < K
            xs = tl.load(x_ptr + xcol, mask=x_mask, other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xs, [1, NB, HB, 2]))
        else:
            x_even = tl.load(x_ptr + col, mask=col_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + col + 1, mask=col_mask, other=0.0).to(tl.float32)
        acc += w_hi * x_even + w_lo * x_odd

    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT:
        tl.store(out_ptr + pid_s * N + rows, y, mask=row_mask)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def _reduce(part_ptr, bias_ptr, out_ptr, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    y = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        y += tl.load(part_ptr + s * N + rows, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


matvec_kernel = triton.jit(_matvec)
reduce_kernel = triton.jit(_reduce)


def interpreting(kernel) -> bool:
    """Whether ``kernel`` runs in Triton's interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return kernel.__class__.__name__ == "InterpretedFunction"


def _dequant(w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n_bytes,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, ROUND: tl.constexpr,
             BLOCK: tl.constexpr):
    """bitsandbytes' dequantize_4bit: ``BLOCK`` packed bytes a program, ``2 * BLOCK`` values out, in the
    flattened order of ``W`` (the high nibble of byte ``i`` is element ``2i``). The same float32 operations as
    bitsandbytes (compiled without fp fusion, so the nested scale's multiply and add round apart as there),
    rounded once to the output dtype (``ROUND`` 2: bfloat16 by round to nearest even on the bits)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    byte = start + tl.arange(0, BLOCK)
    mask = byte < n_bytes
    packed = tl.load(w_ptr + byte, mask=mask, other=0).to(tl.int32)
    block = (2 * byte) // BLOCKSIZE  # both nibbles of a byte share a block (the blocksize is even)
    if NESTED:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    w_hi = tl.load(code_ptr + (packed >> 4)) * scale
    w_lo = tl.load(code_ptr + (packed & 15)) * scale
    values = tl.reshape(tl.join(w_hi, w_lo), [2 * BLOCK])
    if ROUND == 2:
        u = values.to(tl.uint32, bitcast=True)
        values = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    element = 2 * start + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < 2 * n_bytes)


dequant_kernel = triton.jit(_dequant, do_not_specialize=["n_bytes"])
