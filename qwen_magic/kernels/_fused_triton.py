"""The Triton kernels behind ``fused`` (imported only when a kernel first runs: this module needs triton).

Every kernel computes in float32 and rounds to the tensor dtype exactly where
transformers' eager code rounds (``_round``); launches pass ``enable_fp_fusion=False``
so that no product is fused into the add that follows it.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (to nearest, ties to even), returned as float32."""
    y = x.to(dtype).to(tl.float32)
    if INTERPRETED:
        if dtype == tl.bfloat16:
            # Triton's CPU interpreter rounds float32 -> bfloat16 by truncation; round as the GPU does
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def rms_norm_kernel(X, W, Y, stride_x, N, n_float, inv_n, eps,
                    BLOCK: tl.constexpr, OFFSET: tl.constexpr, DIVIDE: tl.constexpr, INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(x * x, axis=0)
    if DIVIDE:  # PyTorch's CPU mean: the sum, divided by N
        variance = tl.math.div_rn(total, n_float)
    else:  # its CUDA mean: the sum times 1/N
        variance = total * inv_n
    normed = x * tl.math.rsqrt(variance + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:  # Qwen3.5 / Qwen3-Next: x * (1 + w) in float32, rounded once
        y = normed * (1.0 + w)
    else:  # Qwen2 / Qwen3: x rounded to the input dtype, then weight * x
        y = w * _round(normed, X.dtype.element_ty, INTERPRETED)
    y = _round(y, Y.dtype.element_ty, INTERPRETED)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(X, O, x_base, o_base, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    dtype = X.dtype.element_ty
    x1 = tl.load(X + x_base + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    # q * cos and rotate_half(q) * sin, each rounded to the dtype, then their sum rounded
    a1 = _round(x1 * c1, dtype, INTERPRETED)
    b1 = _round((-x2) * s1, dtype, INTERPRETED)
    a2 = _round(x2 * c2, dtype, INTERPRETED)
    b2 = _round(x1 * s2, dtype, INTERPRETED)
    tl.store(O + o_base + d, _round(a1 + b1, dtype, INTERPRETED).to(O.dtype.element_ty), mask=mask)
    tl.store(O + o_base + HALF + d, _round(a2 + b2, dtype, INTERPRETED).to(O.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(Q, K, C, S, QO, KO, HQ, HK, SEQ,
                sqb, sqh, sqs, skb, skh, sks, sqob, sqoh, sqos, skob, skoh, skos, scb, scs, ssb, sss,
                HALF: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """One program per (batch, position, head) of q and then k; cos and sin are (batch, position, head_dim)."""
    pid = tl.program_id(0).to(tl.int64)
    heads = HQ + HK
    head = pid % heads
    bs = pid // heads
    b = bs // SEQ
    s = bs % SEQ
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    c1 = tl.load(C + b * scb + s * scs + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(C + b * scb + s * scs + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(S + b * ssb + s * sss + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(S + b * ssb + s * sss + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if head < HQ:
        _rotate(Q, QO, b * sqb + head * sqh + s * sqs, b * sqob + head * sqoh + s * sqos,
                c1, c2, s1, s2, HALF, BLOCK, INTERPRETED)
    else:
        h = head - HQ
        _rotate(K, KO, b * skb + h * skh + s * sks, b * skob + h * skoh + s * skos,
                c1, c2, s1, s2, HALF, BLOCK, INTERPRETED)


@triton.jit
def silu_mul_kernel(G, U, Y, N, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offsets, mask=mask, other=0.0).to(tl.float32)
    if INTERPRETED:
        e = tl.exp(-g)
    else:  # the accurate expf of PyTorch's CUDA silu, not Triton's fast exp2-based one
        e = libdevice.exp(-g)
    dtype = Y.dtype.element_ty
    act = _round(tl.math.div_rn(g, 1.0 + e), dtype, INTERPRETED)  # silu: x / (1 + exp(-x)), rounded
    tl.store(Y + offsets, _round(act * u, dtype, INTERPRETED).to(dtype), mask=mask)
