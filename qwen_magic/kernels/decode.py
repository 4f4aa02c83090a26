"""One decode step's attention in two Triton kernels (``_decode_triton``), for the fast engine's graphed steps.

``qwen_magic.attention.grouped_attention`` does a decode step's attention with PyTorch's operations
(a grouped matmul, the mask's inversion and fill, a softmax, a cast, a second matmul, a transpose: about
eight kernels a layer, over the whole static cache). :func:`attention` does the same step in two kernels
that read only the positions the mask allows: scores and the softmax in float32 (eager attention rounds
the scores to the model's dtype first; SDPA, the recipe's attention, keeps them in float32), the weights
rounded to the model's dtype for the product with the values, as eager attention does.

:func:`patch` marks a model's causal attention modules; ``grouped_attention`` sends a one-token query of
a marked module here while the engine's decode steps run (``qwen_magic.kernels.allowed()``), when
:func:`usable` accepts the tensors. Nothing else changes.
"""

import threading
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from . import allowed, mark_attention
from .device import on, unsupported

_MARK = "_qwen_magic_decode_kernel"
_ROW = "_qwen_magic_row"  # on a cache layer whose row fill_rows wrote: (its row, the parts' row, heads, head size)
BLOCK = 64  # cache positions a program
ROW_PROGRAMS = 64  # programs per key/value head of partial_rows_kernel at least (the grid of a 4,096-token cache): fixed in a graph
_rows = threading.local()  # .state inside rows(): {"last": what the layer written last attends to, "taken": counts}
_kernels = None
FORCE_CPU = False  # tests: take CPU tensors too (through Triton's interpreter, TRITON_INTERPRET=1)


def _device_ok(tensor) -> bool:
    return tensor.is_cuda or (FORCE_CPU and tensor.device.type == "cpu")


def available(device=None) -> Optional[str]:
    return unsupported(device)


def _build():
    global _kernels
    if _kernels is None:
        from . import _decode_triton

        _kernels = _decode_triton
    return _kernels


def usable(module, query, key, value, mask) -> bool:
    """Whether this call can take the kernels: a marked module, inside a decode step, one query token on
    CUDA in float16 or bfloat16, heads a multiple of the key/value heads, a boolean mask over the cache."""
    if not getattr(module, _MARK, False) or not allowed():
        return False
    if not _device_ok(query) or query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.dim() != 4 or query.shape[0] != 1 or query.shape[2] != 1 or key.shape[0] != 1 or query.shape[1] % key.shape[1]:
        return False
    if key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1] or value.shape[2] != key.shape[2] or query.shape[-1] > 256:
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        return False
    if mask is None or mask.dtype != torch.bool or mask.shape[-1] != key.shape[2] or mask.shape[-2] != 1 or mask.numel() != mask.shape[-1]:
        return False
    return True


def attention(query, key, value, mask, scaling: float, causal: bool = False) -> torch.Tensor:
    """``query`` (1, H, 1, D), ``key``/``value`` (1, KVH, S, D) (the static cache), ``mask`` (.., 1, S) boolean
    (True: attend) -> the output as attention interfaces return it, (1, 1, H, D). ``causal``: the module attends to
    every position up to its own (no window), so inside :func:`rows` a layer written through its row attends through
    it too (``partial_rows_kernel``: the cache found through device memory, the mask's positions from the counter)."""
    k = _build()
    heads, dim = query.shape[1], query.shape[-1]
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    chunks = -(-length // BLOCK)
    dim_padded = max(16, 1 << (dim - 1).bit_length())
    group_padded = max(16, 1 << (group - 1).bit_length())
    device = query.device
    state = getattr(_rows, "state", None)
    last = state["last"] if state is not None else None
    if causal and last is not None and last[0] is key and last[1] is value and last[5:] == (heads, dim):
        row, counter, parts = last[2:5]
        out = torch.empty((1, 1, heads, dim), dtype=query.dtype, device=device)
        with on(device):
            k.partial_rows_kernel[(kv_heads, max(chunks, ROW_PROGRAMS))](
                query, row, parts, counter, query.stride(1), float(scaling),
                G=group, GP=group_padded, D=dim, DP=dim_padded, BLOCK=BLOCK, num_warps=4)
            k.combine_rows_kernel[(heads,)](parts, row, counter, out, G=group, D=dim, DP=dim_padded, CB=128, PB=16, BLOCK=BLOCK, num_warps=4)
        state["taken"]["attention"] += 1
        return out
    parts = kv_heads * chunks * group
    top = torch.empty(parts, dtype=torch.float32, device=device)
    total = torch.empty(parts, dtype=torch.float32, device=device)
    acc = torch.empty(parts * dim, dtype=torch.float32, device=device)
    out = torch.empty((1, 1, heads, dim), dtype=query.dtype, device=device)
    with on(device):
        k.partial_kernel[(kv_heads, chunks)](
            query, key, value, mask, top, total, acc,
            query.stride(1), key.stride(1), key.stride(2), value.stride(1), value.stride(2), mask.stride(-1), length, float(scaling),
            chunks, G=group, GP=group_padded, D=dim, DP=dim_padded, BLOCK=BLOCK, num_warps=4)
        k.combine_kernel[(heads,)](top, total, acc, out, chunks, G=group, D=dim, DP=dim_padded, CB=128, PB=16, num_warps=4)
    return out


def check(device=None, dtype=torch.float16) -> Optional[str]:
    """Run the kernels once against PyTorch's attention over a masked cache; None when they agree."""
    device = torch.device("cuda") if device is None else torch.device(device)
    reason = available(device)
    if reason:
        return reason
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.float16  # usable() takes only half-precision steps; check the kernels in float16
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        # Qwen2.5's grouping and head size (7 query heads a key/value head, 128): the compiles a model uses
        query = torch.randn(1, 14, 1, 128, device=device, generator=generator).to(dtype)
        key = torch.randn(1, 2, 200, 128, device=device, generator=generator).to(dtype)
        value = torch.randn(1, 2, 200, 128, device=device, generator=generator).to(dtype)
        mask = torch.zeros(1, 1, 1, 200, dtype=torch.bool, device=device)
        mask[..., :150] = True
        out = attention(query, key, value, mask, 0.088).float()
        keys, values = key.float().repeat_interleave(7, dim=1), value.float().repeat_interleave(7, dim=1)
        scores = (query.float() @ keys.transpose(-1, -2)) * 0.088
        expected = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values).transpose(1, 2)
        ok = torch.allclose(out, expected, rtol=2e-2, atol=2e-2)
    except Exception as error:
        return f"the decode attention kernel failed to run: {type(error).__name__}: {error}".splitlines()[0][:300]
    return None if ok else "the decode attention kernel disagrees with PyTorch's attention"


# transformers' StaticLayer.update, as :func:`patch_cache` reproduces it (compared without comments and
# whitespace; another release's code is left alone).
_STATIC_UPDATE = """
if not self.is_initialized:
    self.lazy_initialization(key_states, value_states)
kv_length = key_states.shape[-2]
cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
self.cumulative_length.add_(kv_length)
try:
    self.keys.index_copy_(2, cache_position, key_states)
    self.values.index_copy_(2, cache_position, value_states)
except NotImplementedError:
    self.keys[:, :, cache_position] = key_states
    self.values[:, :, cache_position] = value_states
return self.keys, self.values
"""


def _update_verified(layer_class) -> bool:
    from . import fused  # noqa: F401 (fused_patch is imported through fused)
    from .fused_patch import _body, _squash

    return _body(layer_class.update) == _squash(_STATIC_UPDATE)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def patch_cache(cache) -> int:
    """Give each ``StaticLayer`` of ``cache`` (a static cache the engine owns) an ``update`` that writes one
    token's keys and values with one kernel during decode steps (:func:`cache_write_kernel`); anything else
    (prefill chunks, other layer kinds, outside decode steps) keeps transformers' own. Returns how many layers."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return 0
    count = 0
    if not _update_verified(StaticLayer):
        return 0
    for layer in getattr(cache, "layers", ()):
        if type(layer) is not StaticLayer:
            continue
        layer.update = _cache_update(layer, StaticLayer.update)
        count += 1
    return count


def _cache_update(layer, original):
    """``original``: the class's function (not the bound method, and the layer held weakly): the layer must not
    reference itself, or a dropped cache (its keys and values) would wait for the garbage collector."""
    import weakref

    owner = weakref.ref(layer)

    def update(key_states, value_states, *args, **kwargs):
        layer = owner()
        counter = getattr(layer, "cumulative_length", None)
        if (not allowed() or not getattr(layer, "is_initialized", False) or key_states.shape[-2] != 1 or key_states.shape[0] != 1
                or not _device_ok(key_states) or not isinstance(counter, torch.Tensor) or counter.numel() != 1
                or key_states.dtype != layer.keys.dtype or value_states.dtype != layer.values.dtype
                or key_states.stride(-1) != 1 or value_states.stride(-1) != 1 or layer.keys.stride(-1) != 1 or layer.values.stride(-1) != 1):
            return original(layer, key_states, value_states, *args, **kwargs)
        k = _build()
        heads, dk, dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        state = getattr(_rows, "state", None)
        found = getattr(layer, _ROW, None) if state is not None else None
        if state is not None:
            state["last"] = None
        if found is not None and found[4] == layer.keys.data_ptr():  # this layer's row (fill_rows) describes its cache
            row, parts, query_heads, dim, _ = found
            with on(key_states.device):
                k.cache_write_rows_kernel[(1,)](key_states, value_states, row, counter, key_states.stride(1), value_states.stride(1),
                                                HEADS=heads, HP=_pow2(heads), DK=dk, DKP=_pow2(dk), DV=dv, DVP=_pow2(dv), num_warps=4)
            state["last"] = (layer.keys, layer.values, row, counter, parts, query_heads, dim)
            state["taken"]["write"] += 1
            return layer.keys, layer.values
        with on(key_states.device):
            k.cache_write_kernel[(1,)](
                key_states, value_states, layer.keys, layer.values, counter, layer.keys.shape[2],
                key_states.stride(1), value_states.stride(1), layer.keys.stride(1), layer.keys.stride(2),
                layer.values.stride(1), layer.values.stride(2),
                HEADS=heads, HP=_pow2(heads), DK=dk, DKP=_pow2(dk), DV=dv, DVP=_pow2(dv), num_warps=4)
        return layer.keys, layer.values

    update._qwen_magic_original = original
    return update


@contextmanager
def rows():
    """Decode steps in which the layers that have a row (:func:`fill_rows`) write their keys and values and attend
    through it (the ``*_rows_kernel``s): a CUDA graph captured so reads the cache's addresses from device memory, and
    outlives the cache. Yields the counts ``{"write": layers written so, "attention": attentions done so}``."""
    before = getattr(_rows, "state", None)
    state = _rows.state = {"last": None, "taken": {"write": 0, "attention": 0}}
    try:
        yield state["taken"]
    finally:
        _rows.state = before


def fill_rows(cache, table, heads: int):
    """Describe ``cache`` (a static cache :func:`patch_cache` patched, every layer written once) in ``table``, an int64
    device tensor of (layers + 1, 4): row i holds layer i's keys and values addresses and its capacity; the last row
    the addresses of buffers for the chunks' parts (made here for ``heads`` query heads, and returned: they must live
    as long as the table describes this cache) and how many chunks they hold. Each layer then has its row (decode
    steps inside :func:`rows` take it). None, with nothing written, when a layer cannot be described so."""
    layers = list(getattr(cache, "layers", ()))
    if not layers or tuple(table.shape) != (len(layers) + 1, 4) or table.dtype != torch.int64:
        return None
    entries = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (not hasattr(layer.__dict__.get("update"), "_qwen_magic_original") or not getattr(layer, "is_initialized", False)
                or keys is None or values is None or keys.device != table.device or values.device != table.device
                or not keys.is_contiguous() or not values.is_contiguous() or keys.dim() != 4 or keys.shape[0] != 1
                or keys.shape[:3] != values.shape[:3] or keys.shape[-1] != values.shape[-1] or heads % keys.shape[1]):
            return None
        entries.append([keys.data_ptr(), values.data_ptr(), keys.shape[2], 0])
    slots = -(-max(entry[2] for entry in entries) // BLOCK)
    dim = max(layer.keys.shape[-1] for layer in layers)
    device = table.device
    top, total = (torch.empty(heads * slots, dtype=torch.float32, device=device) for _ in range(2))
    acc = torch.empty(heads * slots * dim, dtype=torch.float32, device=device)
    entries.append([top.data_ptr(), total.data_ptr(), acc.data_ptr(), slots])
    table.copy_(torch.tensor(entries, dtype=torch.int64), non_blocking=True)  # staged at once: no wait for the GPU
    parts = table[len(layers)]
    for index, layer in enumerate(layers):
        setattr(layer, _ROW, (table[index], parts, heads, layer.keys.shape[-1], layer.keys.data_ptr()))
    return top, total, acc


def patch(model) -> Callable[[], None]:
    """Mark ``model``'s causal self-attention modules (those with ``is_causal`` and a ``layer_idx``) for
    :func:`attention`; returns the function that removes the marks."""
    return mark_attention(model, _MARK)
