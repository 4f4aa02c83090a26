"""The float16 batch-1 kernel behind :mod:`qwen_magic.kernels.nf4` (imported only when triton is there).

bitsandbytes' own batch-1 kernel computes, per element, ``w = half(code[q]) * half(absmax)`` in
float16, the product ``x * w`` in float16, and adds the products in float32. This kernel does the
same operations, in another summation order, reading bitsandbytes' packed weights as they are.

It is written in Gluon (Triton's language with explicit register layouts), because the layout is the
point: a program owns ``R`` rows; each thread holds ``U`` consecutive 32-bit words (8 codes a word) of
every one of those rows, so the weight comes in one 16-byte load a row and a thread's ``x`` (the same for
all rows) is loaded once, as 16-byte vectors, and kept in registers. (Plain Triton, free to choose, moved
the weights or ``x`` through shared memory every step to meet the layout of the inline assembly.) The
16-entry table lookup is done in registers by byte permutes (``prmt``, no memory access; see ``_WORD``).
The scale of each block is worked out in float32 as bitsandbytes does (with double quantization
``code2[absmax_u8] * absmax2 + offset``), rounded to float16 and used as a ``half2``. All of it is PTX that
sm_75 (T4) has: ``prmt``, ``lop3``, ``mul.rn.f16x2``, ``cvt.f32.f16``. With ``SPLIT`` each program covers a
slice of K (``pid 1``) and stores float32 partial sums, which ``_nf4_triton.reduce_kernel`` adds in a fixed
order (deterministic).

Word layout: byte ``j`` of a little-endian word holds elements ``2j`` (high nibble) and ``2j + 1``
(low nibble), so the word's nibbles from bit 0 are elements 1, 0, 3, 2, 5, 4, 7, 6.
"""

import triton  # noqa: F401  (gluon needs it imported)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# One 32-bit word (8 codes) of one row against its 8 x values, added into a float32 sum, as bitsandbytes
# does it: w = code * scale (float16), p = x * w (float16), sum += float(p).
# $0 the sum out; $1 the sum in; $2 the word; $3..$6 x as four half2 (elements 0-1, 2-3, 4-5, 6-7: the even
# element in the low half); $7 the scale as half2; $8..$11 the table's low bytes (entries 0-3, 4-7, 8-11,
# 12-15), $12..$15 its high bytes. The word's nibbles from bit 0 are elements 1, 0, 3, 2 (low half) and
# 5, 4, 7, 6 (high half); each half is a prmt selector of four nibbles. prmt picks a byte by the nibble's
# low 3 bits (its fourth bit would ask for sign replication): entries 0-7 come from the first table pair
# with the nibble as it is (the ones with the fourth bit set are wrong there and not used), entries 8-15
# from the second pair with the fourth bit cleared, and a third prmt takes byte k from the first result or
# the second (selector nibble k or k + 4, by the fourth bit). Then the low and high bytes are interleaved
# into two half2 per half word.
def _half_word(x_low: str, x_high: str, sum_in: str, sum_out: str) -> str:
    """PTX for the four codes of the selector ``s`` (one half of the word) against x's two half2 ``x_low`` and
    ``x_high``: ``sum_out = sum_in + float(p0) + float(p1) + float(p2) + float(p3)``."""
    return f"""and.b32 s7, s, 0x7777;
shr.b32 t, s, 1;
lop3.b32 sel, t, 0x4444, 0x3210, 0xEA;
prmt.b32 la, $8, $9, s;
prmt.b32 lb, $10, $11, s7;
prmt.b32 lo, la, lb, sel;
prmt.b32 ha, $12, $13, s;
prmt.b32 hb, $14, $15, s7;
prmt.b32 hi, ha, hb, sel;
prmt.b32 h0, lo, hi, 0x4051;
prmt.b32 h1, lo, hi, 0x6273;
mul.rn.f16x2 h0, h0, $7;
mul.rn.f16x2 h1, h1, $7;
mul.rn.f16x2 h0, h0, {x_low};
mul.rn.f16x2 h1, h1, {x_high};
mov.b32 {{a0, a1}}, h0;
mov.b32 {{a2, a3}}, h1;
cvt.f32.f16 f0, a0;
cvt.f32.f16 f1, a1;
cvt.f32.f16 f2, a2;
cvt.f32.f16 f3, a3;
add.f32 f0, f0, f1;
add.f32 f2, f2, f3;
add.f32 acc, {sum_in}, f0;
add.f32 {sum_out}, acc, f2;
"""


_WORD = gl.constexpr(
    """
{
.reg .b32 s, s7, t, sel, la, lb, lo, ha, hb, hi, h0, h1;
.reg .b16 a0, a1, a2, a3;
.reg .f32 f0, f1, f2, f3, acc;
mov.b32 s, $2;
""" + _half_word("$3", "$4", "$1", "acc") + "shr.b32 s, s, 16;\n" + _half_word("$5", "$6", "acc", "$0") + "}\n")
_CONSTRAINTS = gl.constexpr(",".join(["=r"] + ["r"] * 15))


@gluon.jit
def _load_step(words, x4, absmax_ptr, code2_ptr, absmax2_ptr, offset, rows64, row_ok, cols, xcols, quarter, first, end, KW,
               srows64, srow_ok, scols, L: gl.constexpr, L3: gl.constexpr, U: gl.constexpr, WB: gl.constexpr,
               BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, STREAM: gl.constexpr):
    """One step's operands: the ``[R, CW]`` words, the four ``half2`` of x per word (broadcast over the rows)
    and the float16 scale of each word's block as ``half2``."""
    w = first + cols
    w2 = gl.expand_dims(w, 0)
    mask = gl.expand_dims(w < end, 0) & row_ok
    if STREAM:  # read once: keep the weight out of L1 (x and the scales stay)
        packed = gl.load(words + rows64 * KW + w2, mask=mask, other=0, eviction_policy="evict_first")
    else:
        packed = gl.load(words + rows64 * KW + w2, mask=mask, other=0)
    xw = first + xcols
    xt = gl.load(x4 + gl.expand_dims(4 * xw, 1) + quarter, mask=gl.expand_dims(xw < end, 1), other=0)
    x02, x13 = gl.split(gl.reshape(xt, [xt.shape[0], 2, 2]))
    xa, xc = gl.split(x02)
    xb, xd = gl.split(x13)
    xa = gl.broadcast(gl.expand_dims(gl.convert_layout(xa, gl.SliceLayout(0, L)), 0), packed)[0]
    xb = gl.broadcast(gl.expand_dims(gl.convert_layout(xb, gl.SliceLayout(0, L)), 0), packed)[0]
    xc = gl.broadcast(gl.expand_dims(gl.convert_layout(xc, gl.SliceLayout(0, L)), 0), packed)[0]
    xd = gl.broadcast(gl.expand_dims(gl.convert_layout(xd, gl.SliceLayout(0, L)), 0), packed)[0]
    # one scale per row and thread (a thread's U words lie in one block): [R, threads], then spread over the words
    sw = first + scols * U
    smask = gl.expand_dims(sw < end, 0) & srow_ok
    block = (srows64 * KW + gl.expand_dims(sw, 0)) // WB
    if NESTED:
        a8 = gl.load(absmax_ptr + block, mask=smask, other=0).to(gl.int32)
        scale = gl.load(code2_ptr + a8) * gl.load(absmax2_ptr + block // BLOCKSIZE2, mask=smask, other=0.0) + offset
    else:
        scale = gl.load(absmax_ptr + block, mask=smask, other=0.0).to(gl.float32)
    s16 = scale.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    s3 = gl.expand_dims(s16 | (s16 << 16), 2)
    s3 = gl.broadcast(s3, gl.full([s3.shape[0], s3.shape[1], U], 0, gl.int32, L3))[0]
    s2 = gl.convert_layout(gl.reshape(s3, [s3.shape[0], s3.shape[1] * U]), L)
    return packed, xa, xb, xc, xd, s2


@gluon.jit(do_not_specialize=["N", "steps", "start1", "start2"])
def matvec_half_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, offset_ptr,
                       w1_ptr, absmax1_ptr, absmax21_ptr, offset1_ptr, start1,
                       w2_ptr, absmax_2_ptr, absmax22_ptr, offset2_ptr, start2,
                       code2_ptr, bias_ptr, out_ptr, N, KW, w_split, steps, l0, l1, l2, l3, h0, h1, h2, h3,
                       BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, HAS_BIAS: gl.constexpr,
                       SPLIT: gl.constexpr, R: gl.constexpr, U: gl.constexpr, SEGMENTS: gl.constexpr = 1,
                       STREAM: gl.constexpr = False, LOADS_ONLY: gl.constexpr = False):
    """``R`` rows a program; each thread holds ``U`` consecutive words of each row (one vector load a row), the
    threads of the program cover ``CW`` words a step; ``w_split`` words of K a program (``pid 1``). The next
    step's loads are issued before this step's arithmetic (registers double-buffered), so memory stays busy.

    ``SEGMENTS`` (2 or 3): weights that share ``x`` (q, k and v; gate and up) in one launch. Output rows
    ``start1`` on are the second weight's (its own tensors ``w1``, ``absmax1``, ...), ``start2`` on the third's;
    every weight's row count is a multiple of ``R``, so a program's rows lie in one weight."""
    W: gl.constexpr = gl.num_warps()
    L: gl.constexpr = gl.BlockedLayout([R, U], [1, 32], [1, W], [1, 0])  # rows in registers, words across threads
    LX: gl.constexpr = gl.BlockedLayout([U, 4], [32, 1], [W, 1], [1, 0])  # x: a word's four half2, per thread
    CW: gl.constexpr = U * 32 * W
    WB: gl.constexpr = BLOCKSIZE // 8  # words per quantization block
    L3: gl.constexpr = gl.BlockedLayout([R, 1, U], [1, 32, 1], [1, W, 1], [2, 1, 0])  # a thread's words, per thread
    LS: gl.constexpr = gl.SliceLayout(2, L3)  # one scale per row and thread
    first = gl.program_id(0) * R  # the program's first output row
    local = first  # ... and its first row in its own weight
    if SEGMENTS > 1:
        if first >= start1:
            w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, local = w1_ptr, absmax1_ptr, absmax21_ptr, offset1_ptr, first - start1
    if SEGMENTS > 2:
        if first >= start2:
            w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, local = w2_ptr, absmax_2_ptr, absmax22_ptr, offset2_ptr, first - start2
    rows = local + gl.arange(0, R, layout=gl.SliceLayout(1, L))
    row_ok = gl.expand_dims(first + gl.arange(0, R, layout=gl.SliceLayout(1, L)) < N, 1)
    rows64 = gl.expand_dims(rows.to(gl.int64), 1)
    srows = local + gl.arange(0, R, layout=gl.SliceLayout(1, LS))
    srow_ok = gl.expand_dims(first + gl.arange(0, R, layout=gl.SliceLayout(1, LS)) < N, 1)
    srows64 = gl.expand_dims(srows.to(gl.int64), 1)
    scols = gl.arange(0, CW // U, layout=gl.SliceLayout(0, LS))
    words = w_ptr.cast(gl.pointer_type(gl.int32), bitcast=True)
    x4 = x_ptr.cast(gl.pointer_type(gl.int32), bitcast=True)
    cols = gl.arange(0, CW, layout=gl.SliceLayout(0, L))
    xcols = gl.arange(0, CW, layout=gl.SliceLayout(1, LX))
    quarter = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LX)), 0)
    acc = gl.zeros([R, CW], gl.float32, L)
    t0 = gl.full([R, CW], l0, gl.int32, L)  # the table as tensors of the tile's layout (kept in registers)
    t1 = gl.full([R, CW], l1, gl.int32, L)
    t2 = gl.full([R, CW], l2, gl.int32, L)
    t3 = gl.full([R, CW], l3, gl.int32, L)
    t4 = gl.full([R, CW], h0, gl.int32, L)
    t5 = gl.full([R, CW], h1, gl.int32, L)
    t6 = gl.full([R, CW], h2, gl.int32, L)
    t7 = gl.full([R, CW], h3, gl.int32, L)
    offset = 0.0
    if NESTED:
        offset = gl.load(offset_ptr)
    start = gl.program_id(1) * w_split
    end = gl.minimum(start + w_split, KW)
    packed, xa, xb, xc, xd, s2 = _load_step(words, x4, absmax_ptr, code2_ptr, absmax2_ptr, offset, rows64, row_ok, cols, xcols,
                                            quarter, start, end, KW, srows64, srow_ok, scols, L, L3, U, WB, BLOCKSIZE2, NESTED, STREAM)
    for step in range(0, steps):  # a runtime count: one compile serves every K of a tile configuration
        # the next step's operands (masked off past the slice) before this step's arithmetic
        packed_n, xa_n, xb_n, xc_n, xd_n, s2_n = _load_step(words, x4, absmax_ptr, code2_ptr, absmax2_ptr, offset, rows64, row_ok,
                                                            cols, xcols, quarter, start + (step + 1) * CW, end, KW, srows64,
                                                            srow_ok, scols, L, L3, U, WB, BLOCKSIZE2, NESTED, STREAM)
        if LOADS_ONLY:  # a measurement of the memory side alone (wrong results)
            acc += (packed ^ xa ^ xb ^ xc ^ xd ^ s2).to(gl.float32)
        else:
            acc = gl.inline_asm_elementwise(_WORD, _CONSTRAINTS, [acc, packed, xa, xb, xc, xd, s2, t0, t1, t2, t3, t4, t5, t6, t7],
                                            dtype=gl.float32, is_pure=True, pack=1)
        packed, xa, xb, xc, xd, s2 = packed_n, xa_n, xb_n, xc_n, xd_n, s2_n
    y = gl.sum(acc, axis=1)
    rows_out = gl.program_id(0) * R + gl.arange(0, R, layout=gl.SliceLayout(1, L))
    ok = rows_out < N
    if SPLIT:
        gl.store(out_ptr + gl.program_id(1) * N + rows_out, y, mask=ok)
    else:
        if HAS_BIAS:
            y += gl.load(bias_ptr + rows_out, mask=ok, other=0.0).to(gl.float32)
        gl.store(out_ptr + rows_out, y.to(out_ptr.dtype.element_ty), mask=ok)


def table_words(code):
    """The 16-entry code table (float32 values) as the kernel's eight table words: float16 bits, low bytes then high."""
    import struct

    import numpy

    bits = [int(b) for b in numpy.asarray(code, dtype=numpy.float32).astype(numpy.float16).view(numpy.uint16)]
    lows = [sum((bits[4 * g + k] & 0xFF) << (8 * k) for k in range(4)) for g in range(4)]
    highs = [sum((bits[4 * g + k] >> 8) << (8 * k) for k in range(4)) for g in range(4)]
    return [struct.unpack("<i", struct.pack("<I", v))[0] for v in lows + highs]
