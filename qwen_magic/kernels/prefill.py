"""A prefill's causal attention in one Triton kernel (``_prefill_triton``), for the fast engine's prefill.

A long first question spent a fifth of its GPU time in attention: the fast engine prefills in chunks
against its static cache, which takes PyTorch's flash kernel (FlashAttention-2) with the causal mask
aligned to the last key, at about half the speed of the cuDNN kernel the recipe's one forward gets on an
H100 (51 against 26 ms at 8,000 tokens). cuDNN is no choice here: it builds a plan for every new shape
(every prompt length, every chunk's key length), tens of milliseconds each. This kernel compiles once:
lengths are runtime arguments.

The arithmetic is flash attention's (scores and softmax in float32, online; weights rounded to the model's
dtype for the product with the values), so it differs from SDPA's kernels by rounding only, as they
differ from one another; the GPU tests bound it against the recipe's logits.

:func:`patch` marks a model's causal attention modules; ``qwen_magic.attention.grouped_attention`` sends a
marked module's prefill (more than ``SMALL_QUERY`` query tokens against the engine's cache) here when
:func:`usable` accepts the tensors. Used on compute capability 9.0 and newer, where it was measured faster
than SDPA's kernels; elsewhere :func:`patch` marks nothing and prefills keep SDPA.
"""

import math
import os
from typing import Callable, Optional

import torch

from . import mark_attention
from .device import on, unsupported

_MARK = "_qwen_magic_prefill_kernel"
MIN_CAPABILITY = (9, 0)  # where it was measured faster than SDPA's kernels (an H100)
# Tiles measured on an H100 (benchmarks/bench_prefill_attention.py --sweep): the quickest on chunks after a prefix.
BLOCK_M, BLOCK_N, WARPS, STAGES = 128, 64, 8, 3
MAX_DIM = 128  # larger heads (Qwen3.5's 256) would need other tiles to fit shared memory: SDPA takes them
_kernels = None
FORCE_CPU = False  # tests: take CPU tensors too (through Triton's interpreter, TRITON_INTERPRET=1)
_LOG2E = 1.0 / math.log(2.0)


def available(device=None) -> Optional[str]:
    return unsupported(device)


def used_on(device) -> bool:
    """Whether prefills on ``device`` take the kernel (a CUDA card of MIN_CAPABILITY or newer; CPU tensors in tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return FORCE_CPU
    if device.type != "cuda" or os.environ.get("QWEN_MAGIC_PREFILL_KERNEL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def _build():
    """The kernel module, and whether Triton's CPU interpreter runs it (both fixed once triton is imported)."""
    global _kernels
    if _kernels is None:
        from . import _prefill_triton

        _kernels = _prefill_triton, os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _kernels


def usable(module, query, key, value) -> bool:
    """Whether this prefill call can take the kernel: a marked module, batch 1, float16 or bfloat16 on CUDA (any
    float on the CPU in tests), heads a multiple of the key/value heads, a power-of-two head size 16..MAX_DIM."""
    if not getattr(module, _MARK, False):
        return False
    if query.is_cuda:
        if query.dtype not in (torch.float16, torch.bfloat16):
            return False
    elif not (FORCE_CPU and query.device.type == "cpu"):
        return False
    if key.dtype != query.dtype or value.dtype != query.dtype or key.device != query.device or value.device != query.device:
        return False
    if query.dim() != 4 or key.dim() != 4 or query.shape[0] != 1 or key.shape[0] != 1 or query.shape[1] % key.shape[1]:
        return False
    dim = query.shape[-1]
    if dim < 16 or dim > MAX_DIM or dim & (dim - 1) or key.shape[-1] != dim or value.shape[-1] != dim or value.shape[1] != key.shape[1]:
        return False
    return query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1


def attention(query, key, value, start, scaling: float) -> torch.Tensor:
    """``query`` (1, H, M, D): the chunk's queries at cache positions ``start .. start + M - 1``; ``key``/``value``
    (1, KVH, S, D) with S >= start + M (the static cache) -> causal attention, (1, M, H, D) as attention
    interfaces return it. ``start``: an int, or a one-element int32 tensor on the query's device (the engine's,
    filled once a forward; a CUDA graph reads it at replay)."""
    k, interpreted = _build()
    if not torch.is_tensor(start):
        start = torch.full((1,), start, dtype=torch.int32, device=query.device)
    heads, length, dim = query.shape[1], query.shape[2], query.shape[3]
    group = heads // key.shape[1]
    out = torch.empty((1, length, heads, dim), dtype=query.dtype, device=query.device)
    if length == 0:
        return out
    with on(query.device):
        k.prefill_attention_kernel[(heads, -(-length // BLOCK_M))](
            query, key, value, out, length, start, float(scaling) * _LOG2E,
            query.stride(1), query.stride(2), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
            out.stride(1), out.stride(2),
            GROUP=group, D=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, INTERPRETED=interpreted, num_warps=WARPS, num_stages=STAGES)
    return out


def reference(query, key, value, start: int, scaling: float) -> torch.Tensor:
    """What :func:`attention` computes, in float32 with PyTorch's operations (tests and :func:`check`)."""
    heads, length = query.shape[1], query.shape[2]
    end = start + length
    keys = key[:, :, :end].float().repeat_interleave(heads // key.shape[1], dim=1)
    values = value[:, :, :end].float().repeat_interleave(heads // key.shape[1], dim=1)
    scores = (query.float() @ keys.transpose(-1, -2)) * scaling
    visible = torch.arange(end, device=query.device)[None, :] <= (start + torch.arange(length, device=query.device))[:, None]
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(1, 2)


def check(device=None, dtype=torch.float16) -> Optional[str]:
    """Run the kernel once (compiling it) against :func:`reference`, with Qwen2.5's grouping and head size; None when
    they agree, or when prefills on ``device`` do not take the kernel (nothing to compile)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    reason = available(device) if device.type != "cpu" else None
    if reason:
        return reason
    if not used_on(device):
        return None
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.float16  # usable() takes only half precision on a GPU
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        query = torch.randn(1, 14, 150, 128, device=device, generator=generator).to(dtype)
        key = torch.randn(1, 2, 256, 128, device=device, generator=generator).to(dtype)
        value = torch.randn(1, 2, 256, 128, device=device, generator=generator).to(dtype)
        out = attention(query, key, value, 70, 0.088).float()
        ok = torch.allclose(out, reference(query, key, value, 70, 0.088), rtol=2e-2, atol=2e-2)
    except Exception as error:
        return f"the prefill attention kernel failed to run: {type(error).__name__}: {error}".splitlines()[0][:300]
    return None if ok else "the prefill attention kernel disagrees with PyTorch's attention"


def patch(model) -> Callable[[], None]:
    """Mark ``model``'s causal self-attention modules for :func:`attention` where prefills take the kernel (see
    :func:`used_on`); returns the function that removes the marks."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return mark_attention(model, _MARK) if used_on(device) else (lambda: None)
