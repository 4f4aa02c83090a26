"""The sampler's two Triton kernels behind :mod:`qwen_magic.kernels.sample` (imported only when triton is there).

Each vocabulary entry becomes one int64 key that orders like its score, ties broken toward the smaller
token id (as ``argmax`` and a sort keep them): the score's float32 bits made to order as a signed
integer, in the high word; ``LIMIT - id`` in the low word. ``candidates_kernel`` scores a block of the
vocabulary (repetition penalty, temperature: the same float32 operations PyTorch does) and keeps its
``K`` largest keys; ``finish_kernel`` keeps the ``K`` largest of all blocks and picks the token: the
largest (greedy), or top-k, top-p and an exponential race over what is left (sampling).
"""

import triton
import triton.language as tl

LIMIT = tl.constexpr(2**31 - 1)  # token ids are below this
SMALLEST = tl.constexpr(-(2**63))  # the key of a masked slot: below every score


@triton.jit
def _key(score, ids):
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return (ordered.to(tl.int64) << 32) | (ids.to(tl.int64) * -1 + LIMIT)


@triton.jit
def _unkey(key):
    ordered = (key >> 32).to(tl.int32)
    score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return score, (key & 0xFFFFFFFF) * -1 + LIMIT


@triton.jit(do_not_specialize=["V"])
def candidates_kernel(logits_ptr, seen_ptr, keys_ptr, V, penalty, inv_penalty, inv_temperature,
                      BLOCK: tl.constexpr, K: tl.constexpr, PENALTY: tl.constexpr, SCALE: tl.constexpr):
    """Block ``pid`` of the vocabulary: its ``K`` largest keys, in descending order, at ``keys[pid * K:]``."""
    pid = tl.program_id(0)
    ids = pid * BLOCK + tl.arange(0, BLOCK)
    ok = ids < V
    score = tl.load(logits_ptr + ids, mask=ok, other=0.0).to(tl.float32)
    if PENALTY:  # transformers' RepetitionPenaltyLogitsProcessor (a division by a scalar is PyTorch's multiply by its inverse)
        seen = tl.load(seen_ptr + ids, mask=ok, other=0)
        score = tl.where(seen != 0, tl.where(score < 0, score * penalty, score * inv_penalty), score)
    if SCALE:  # TemperatureLogitsWarper, as PyTorch divides by a scalar
        score = score * inv_temperature
    key = tl.where(ok, _key(score, ids), SMALLEST)
    if K == 1:
        tl.store(keys_ptr + pid, tl.max(key, axis=0))
    else:
        tl.store(keys_ptr + pid * K + tl.arange(0, K), tl.topk(key, K))


@triton.jit(do_not_specialize=["count", "seed", "top_k"])
def finish_kernel(keys_ptr, count, out_ptr, seen_ptr, draws_ptr, seed, top_k, threshold,
                  K: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, MARK: tl.constexpr,
                  CHUNK: tl.constexpr = 512):
    """The token from ``count`` candidate keys: the largest, or a draw (``draws`` counts them, for the random stream).
    The candidates are read ``CHUNK`` at a time (a run-time count: one compile serves every vocabulary size)."""
    if GREEDY:
        best = tl.full([CHUNK], SMALLEST, tl.int64)
        start = 0
        while start < count:  # (a while loop: Triton's interpreter takes no run-time range)
            slots = start + tl.arange(0, CHUNK)
            best = tl.maximum(best, tl.load(keys_ptr + slots, mask=slots < count, other=SMALLEST))
            start += CHUNK
        _, token = _unkey(tl.max(best, axis=0))
    else:
        top = tl.full([K], SMALLEST, tl.int64)
        start = 0
        while start < count:
            slots = start + tl.arange(0, CHUNK)
            chunk = tl.topk(tl.load(keys_ptr + slots, mask=slots < count, other=SMALLEST), K)
            top = tl.topk(tl.reshape(tl.join(top, chunk), [2 * K]), K)  # descending
            start += CHUNK
        score, ids = _unkey(top)
        rank = tl.arange(0, K)
        keep = top != SMALLEST
        if TOP_K:  # TopKLogitsWarper keeps every score at least the k-th largest (ties included)
            kth = tl.max(tl.where(rank == top_k - 1, score, float("-inf")), axis=0)
            keep = keep & (score >= kth)
        largest = tl.max(tl.where(keep, score, float("-inf")), axis=0)
        weight = tl.where(keep, tl.exp(score - largest), 0.0)
        if TOP_P:  # TopPLogitsWarper: drop the smallest while their mass (this one's included) is at most 1 - top_p
            below = tl.cumsum(weight / tl.sum(weight, axis=0), axis=0, reverse=True)
            keep = keep & ((below > threshold) | (rank == 0))
            weight = tl.where(keep, weight, 0.0)
        draw = tl.load(draws_ptr)
        uniform = tl.rand(seed, draw * K + rank)
        race = -tl.log(1.0 - uniform)  # Exp(1): the token with the largest p / E is a draw from p
        ratio = tl.where(keep, (weight / tl.sum(weight, axis=0)) / race, -1.0)
        best = tl.max(ratio, axis=0)
        token = tl.min(tl.where(ratio == best, ids, LIMIT), axis=0)
        tl.store(draws_ptr, draw + 1)
    tl.store(out_ptr, token.to(tl.int64))
    if MARK:
        tl.store(seen_ptr + token, 1)
