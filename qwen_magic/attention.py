"""Attention against the fast engine's static cache (registered with transformers as ``qwen_magic_gqa``).

A prefill reads only the part of the cache written so far (through the Triton prefill kernel,
kernels/prefill.py, for modules the engine marked); a decode step (a few query tokens) groups the
query heads that share a key/value head, so the cache is read once.
"""

import threading

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

try:
    from torch.nn.attention.bias import causal_lower_right as _lower_right
except ImportError:  # older torch: the mask cut to the filled length
    _lower_right = None

# torch >= 2.5: SDPA takes fewer key/value heads than query heads (enable_gqa), also through the causal bias.
_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")

SMALL_QUERY = 64  # up to this many query tokens, attention groups heads instead of copying keys and values
ATTENTION = "qwen_magic_gqa"

# During the engine's forwards: how many cache positions hold real keys (``.end``), and whether the forward's
# attention would read no mask (``.maskless``: the model's prefills take paths that need none, see maskless_prefill)
# when it has more than SMALL_QUERY query tokens (``.length``); ``.start``: the forward's first position as a device
# tensor for the prefill kernel (None: from end - length); ``.graphed``: a prefill captured in a CUDA graph, which
# only the prefill kernel may serve (the other paths bake host values).
_filled = threading.local()


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention against a static cache: a prefill reads only the filled part, decode groups heads.

    A prefill (more than SMALL_QUERY query tokens) attends to the positions written so
    far, not to the whole static cache: from position 0 that is exactly the classic
    recipe's causal attention (no mask, so SDPA takes its flash kernel, as the recipe
    does), and after a cached prefix causal attention aligned to the last key (torch's
    lower-right causal bias: flash again, no mask, no per-shape plan; cuDNN's plan
    builds stalled the first prompt of each length).

    transformers' SDPA path copies each key/value head once per query head that
    shares it (7 times for Qwen2.5-7B) over the whole cache length, on every
    decode step. Folding each group of query heads into the query length reads the
    cache once. The arithmetic is transformers' eager attention (scores in the
    model's dtype, softmax in float32). Longer queries (prefill) take SDPA as usual.
    """
    if is_causal is False or not getattr(module, "is_causal", True):
        # Not the text model's causal attention over the cache (a vision tower's attention over a picture's
        # patches, which a prefill with pictures runs too): SDPA as the recipe calls it (a prefill runs under
        # no_plan_kernels(): not on cuDNN's kernel, whose plans are built per thread and per shape).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    end = getattr(_filled, "end", None)
    if length > SMALL_QUERY and end is not None and end <= key.shape[2]:
        if getattr(module, "sliding_window", None) is None and not dropout and _prefill_kernel_takes(module, query, key, value):
            # The Triton kernel (kernels/prefill.py): causal from the chunk's first position, reading the cache as it is.
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            start = getattr(_filled, "start", None)  # the engine's device copy of end - length (a graph replays it)
            if start is None or start.device != query.device:  # a layer on another card of a split model
                start = end - length
            return _prefill_kernel.attention(query, key, value, start, scale), None
        if getattr(_filled, "graphed", False):
            raise RuntimeError("a graphed prefill reached an attention path other than the prefill kernel")
        key, value = key[:, :, :end], value[:, :, :end]
        if end == length and getattr(module, "sliding_window", None) is None:
            # The whole prompt from position 0: plain causal attention, as the recipe runs it (the prefill runs under
            # no_plan_kernels(), so not on cuDNN's kernel: its plans are cached per thread, and every reply is written
            # by a new thread, so each first question paid a plan build, about 80 ms at 100 tokens on an H200).
            return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
        if getattr(module, "sliding_window", None) is None and not dropout and not heads % kv_heads and _lower_right is not None:
            # After a cached prefix, or an earlier chunk: causal attention aligned to the last key, with no mask
            # to build or read (SDPA's flash kernel where it runs; a materialized mask elsewhere).
            if _GQA:  # the kernel reads each key/value head for its group of query heads (no 7x copy of the cache)
                output = F.scaled_dot_product_attention(query, key, value, attn_mask=_lower_right(length, end), scale=scaling,
                                                        enable_gqa=heads != kv_heads)
            else:
                key, value = repeat_kv(key, heads // kv_heads), repeat_kv(value, heads // kv_heads)
                output = F.scaled_dot_product_attention(query, key, value, attn_mask=_lower_right(length, end), scale=scaling)
            return output.transpose(1, 2).contiguous(), None
        if attention_mask is not None:
            attention_mask = attention_mask[..., :end]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if getattr(_filled, "graphed", False):
        raise RuntimeError("a graphed prefill reached an attention path other than the prefill kernel")
    if length > SMALL_QUERY or attention_mask is None or dropout or heads % kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    if length == 1 and _decode_kernel_takes(module, query, key, value, attention_mask):
        causal = getattr(module, "sliding_window", None) is None  # every position up to its own: what a row's kernel reads
        return _decode_kernel.attention(query, key, value, attention_mask, scale, causal), None
    grouped = query.reshape(batch, kv_heads, group * length, dim)  # query head h reads key/value head h // group
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scale
    mask = attention_mask[:, :, None].expand(batch, attention_mask.shape[1], group, length, attention_mask.shape[-1])
    mask = mask.reshape(batch, attention_mask.shape[1], group * length, attention_mask.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(weights, value).reshape(batch, heads, length, dim)
    return output.transpose(1, 2).contiguous(), None


_decode_kernel = None  # qwen_magic.kernels.decode, once a model's attention was marked for it


def _decode_kernel_takes(module, query, key, value, mask) -> bool:
    """Whether a decode step's attention goes to the Triton kernels (kernels/decode.py): only for modules
    the engine marked (it imports that module then, so this one needs no triton)."""
    global _decode_kernel
    if not getattr(module, "_qwen_magic_decode_kernel", False):
        return False
    if _decode_kernel is None:
        from .kernels import decode as _decode

        _decode_kernel = _decode
    return _decode_kernel.usable(module, query, key, value, mask)


_prefill_kernel = None  # qwen_magic.kernels.prefill, once a model's attention was marked for it


def _prefill_kernel_takes(module, query, key, value) -> bool:
    """Whether a prefill's attention goes to the Triton kernel (kernels/prefill.py): only for modules the engine marked."""
    global _prefill_kernel
    if not getattr(module, "_qwen_magic_prefill_kernel", False):
        return False
    if _prefill_kernel is None:
        from .kernels import prefill as _prefill

        _prefill_kernel = _prefill
    return _prefill_kernel.usable(module, query, key, value)


def no_plan_kernels():
    """SDPA without cuDNN's backend, whose plan is built (slowly) for each new shape and thread: around a
    whole prefill forward (entered once, not per attention call: a picture's vision tower makes thousands)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: whatever it picks
        import contextlib

        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def maskless_prefill(model) -> bool:
    """Whether every causal attention of ``model`` takes a prefill (more than SMALL_QUERY query tokens, the
    engine's) on a path that reads no mask: the prefill kernel, SDPA's causal flag from position 0, or its
    lower-right causal bias (no sliding window, whole groups of query heads, a torch with that bias)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads, kv_heads = getattr(text, "num_attention_heads", 0), getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0)
    if _lower_right is None or not heads or not kv_heads or heads % kv_heads:
        return False
    modules = [m for m in model.modules() if getattr(m, "is_causal", False) and hasattr(m, "layer_idx")]
    return bool(modules) and all(getattr(m, "sliding_window", None) is None for m in modules)


def _mask(*args, **kwargs):
    """transformers' SDPA mask, except in a prefill forward whose attention reads none (``_filled.maskless``, set by
    the engine where :func:`maskless_prefill` holds): None, with no work. transformers' mask code compares the static
    cache's write position, a GPU tensor, with 0 on the host: a wait for the GPU at every prefill forward, after
    which the GPU idles while the host queues the next chunk's first kernels."""
    if getattr(_filled, "maskless", False) and getattr(_filled, "length", 0) > SMALL_QUERY:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, _mask)
