"""The fast engine's static KV cache: how large it is, how it grows (a copy of what it holds, not a new prefill),
and where its next keys and values are written; after a reply, a cache the next turn would outgrow grows then, with its
decode graph. A mixin of ``fast.FastEngine``, whose attributes it uses (``model``, ``device``, ``kernels``, ``hybrid``,
the graphs it drops with the cache, ``_capture``)."""

from typing import List, Optional

import torch
from transformers import StaticCache

from .hybrid import HybridStates

CAPACITY_STEP = 1024  # cache sizes are multiples of this
GROWTH = 1.25  # a cache that must grow gets this much headroom, so it grows rarely ...
GROWTH_MAX = 512  # ... but at most this many positions (a long history's cache grows again: a copy and a capture, after a reply)
FIRST_CAPACITY = 4096  # tokens the first cache holds: most chats never need to grow it
NEXT_MESSAGE = 256  # tokens a next question is taken to add, when a cache is grown after a reply (_grow_ahead)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def point_counters(cache, position: int) -> None:
    """Aim a static cache's write counters (newer transformers keep one per layer, and write where it says, not where
    ``cache_position`` does) at ``position``, in place: a captured graph reads them from the same address."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(position)


class CacheMixin:

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions; a new cache starts empty (and needs a new graph)."""
        if needed <= self.capacity:
            return
        headroom = min(int(needed * (GROWTH - 1)), GROWTH_MAX) if self.capacity else 0
        capacity = _round_up(needed + headroom, CAPACITY_STEP)
        capacity = max(needed, min(capacity, _round_up(self.context_length, CAPACITY_STEP)))
        old, old_states, kept = self.cache, self.states, list(self.cached_ids)
        self._drop_cache()
        self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        self._counters_on_device()
        for module in self.kernels:  # decode steps write a token's keys and values with one kernel (kernels/decode.py)
            if hasattr(module, "patch_cache"):
                module.patch_cache(self.cache)
        self.capacity = capacity
        self.write_position = None
        if self.hybrid:
            self.states = HybridStates(self.cache)
            if not self.states.layers:
                raise RuntimeError("this transformers version keeps no recurrent state in a static cache (hybrid models need transformers 5)")
        if old is not None and kept:
            self._copy_from(old, old_states, kept)

    def _grow_ahead(self, max_new_tokens: int) -> None:
        """After a reply: grow a cache that the next turn would outgrow (this history, a new message of NEXT_MESSAGE
        tokens, as many new tokens as this reply could have), and capture its decode graph now, after the last
        token, rather than between the next reply's first two tokens (a pause of about 56 ms on an H100), unless the graph
        outlives the cache (decode_step.py)."""
        needed = len(self.cached_ids) + NEXT_MESSAGE + max_new_tokens
        if self.cache is None or needed <= self.capacity or needed > self.context_length:
            return
        try:
            self._reserve(needed)
            if self.use_graph and self.graph is None:
                self._capture()
        except torch.cuda.OutOfMemoryError:  # the reply is whole; the next turn builds the cache it needs
            self._drop_cache(release=True)

    def _counters_on_device(self) -> None:
        """Put a new cache's write counters on their layers' devices now. transformers' static layers (newer ones)
        keep theirs on the CPU until their first write, which copies it to the GPU with a blocking copy: in a prefill,
        layer after layer, the host waited for the GPU to finish everything queued before it, so it could no longer
        queue ahead (a first prompt into a new cache took about 30 ms more on an H100)."""
        # The same counter tensors serve every cache, zeroed (a new layer's starts at 0): a graph that outlives the
        # cache (decode_step.py) moves them at the addresses it captured.
        counters = self.__dict__.setdefault("_counters", {})
        devices = getattr(self, "_layer_devices", None)
        if devices is None:
            devices = self._layer_devices = {}
            for module in self.model.modules():
                index, weight = getattr(module, "layer_idx", None), getattr(getattr(module, "k_proj", None), "weight", None)
                if isinstance(index, int) and weight is not None:
                    devices[index] = weight.device
        for index, layer in enumerate(getattr(self.cache, "layers", ())):
            counter = getattr(layer, "cumulative_length", None)
            device = devices.get(index, self.device)
            if isinstance(counter, torch.Tensor) and not getattr(layer, "is_initialized", False):
                kept = counters.get(index)
                if kept is None or kept.device != device or kept.dtype != counter.dtype or kept.shape != counter.shape:
                    kept = counters[index] = counter.to(device, copy=True)
                layer.cumulative_length = kept.zero_() if counter.device.type == "cpu" and int(counter) == 0 else kept.copy_(counter)

    def _copy_from(self, old, old_states: Optional[HybridStates], kept: List[int]) -> None:
        """Carry the cached tokens over to a larger cache, so growing costs a copy, not a new prefill."""
        layers = [layer for layer in getattr(old, "layers", ()) if old_states is None or layer not in old_states.layers]
        if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
            return  # a cache of another make: the next prefill rebuilds it
        # One real token through the model initializes the new layers (and writes position 0 correctly).
        if self.states is not None:
            self.states.reset()
        self._forward(torch.tensor([kept[:1]], device=self.device), 0)
        targets = [layer for layer in self.cache.layers if self.states is None or layer not in self.states.layers]
        for source, target in zip(layers, targets):
            target.keys[:, :, : len(kept)].copy_(source.keys[:, :, : len(kept)])
            target.values[:, :, : len(kept)].copy_(source.values[:, :, : len(kept)])
        if self.states is not None:
            self.states.copy_from(old_states)
        self.cached_ids = kept
        self.write_position = None

    def _drop_cache(self, release: bool = False) -> None:
        """Drop the cache and the graphs that hold its addresses. ``release``: give the freed memory back to the driver
        too (after running out of memory, and on close); a cache that grows keeps it in PyTorch's allocator, whose
        blocks the next forwards reuse (PyTorch frees them itself before it would run out)."""
        # The graph's output buffers live in its private memory pool: drop them too, or the pool stays. A graph that
        # outlives the cache (it reads the cache's addresses from self.rows) stays, unless memory is given back.
        self.cache = self.states = self.parts = self.rows_for = None
        if release or not self.graph_outlives_cache:
            self.graph = self.static_token = self.static_position = self.static_logits = None
            self.graph_outlives_cache = False
        if self.prefill_graphs is not None:
            self.prefill_graphs.drop(everything=release)
        self.capacity, self.cached_ids = 0, []
        if release and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _write_at(self, position: int) -> None:
        """Point the cache's writes at ``position``.

        Older transformers write where ``cache_position`` says; newer static layers keep
        their own write counter and ignore it, so move that counter too (in place: a
        captured graph reads it from the same address).
        """
        if position == self.write_position:
            return
        point_counters(self.cache, position)
        self.write_position = position
