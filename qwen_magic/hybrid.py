"""Recurrent state of hybrid models, for the fast engine: snapshots at prefix boundaries.

Qwen3.5, Qwen3.6 and Qwen3-Next put three Gated DeltaNet (linear-attention) layers
before each full-attention layer. Such a layer keeps a convolution state and a
recurrent state: a fold over every token seen. Keys and values can be cut back to
any shorter prefix; these states cannot. So a prefix is reused only where the
states are known for exactly that prefix:

- the live states, when the cache holds nothing beyond the prefix (the next turn of
  a conversation continues the tokens the last one fed);
- a snapshot (a copy of every layer's states) taken at the end of a prompt or of a
  reply: regenerate, undo, continue and a re-run cell go back to one of those;
- otherwise none: the states are reset and the prompt is prefilled from the start.

Snapshots are copies, restored by copying into the working buffers, never aliased:
the decode graph reads the working buffers from fixed addresses.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

SNAPSHOTS = 6  # the most kept at once; the least recently used goes first


def is_hybrid(config) -> bool:
    """Whether a model config has layers with recurrent state (linear attention, convolutions)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(kind in ("linear_attention", "conv", "hybrid", "mamba") for kind in (getattr(config, "layer_types", None) or ()))


def state_layers(cache) -> list:
    """The cache's layers that hold recurrent state (transformers' LinearAttention layers)."""
    return [layer for layer in getattr(cache, "layers", ()) if isinstance(getattr(layer, "conv_states", None), dict)]


@dataclass
class Snapshot:
    ids: tuple  # the prefix whose states these are
    tensors: List[Optional[torch.Tensor]]  # per layer and state: conv, recurrent, ... (None where not initialized)
    flags: List[bool]  # per layer and state: has_previous_state
    logits: Optional[torch.Tensor] = None  # after the prefix's last token, when taken at the end of a prompt

    @property
    def length(self) -> int:
        return len(self.ids)


def _slots(layer):
    for index in range(layer.number_of_states):
        yield layer.conv_states, index
        yield layer.recurrent_states, index


class HybridStates:
    """The recurrent layers of one static cache, and the snapshots taken of them."""

    def __init__(self, cache, limit: int = SNAPSHOTS):
        self.layers = state_layers(cache)
        self.limit = limit
        self.snapshots: "OrderedDict[tuple, Snapshot]" = OrderedDict()

    def take(self, ids: Sequence[int], logits: Optional[torch.Tensor] = None) -> Snapshot:
        tensors = [None if store[i] is None else store[i].clone() for layer in self.layers for store, i in _slots(layer)]
        flags = [layer.has_previous_state[i] for layer in self.layers for i in range(layer.number_of_states)]
        return Snapshot(tuple(ids), tensors, flags, None if logits is None else logits.clone())

    def put_back(self, snapshot: Snapshot) -> None:
        """Copy a snapshot into the working buffers (their addresses stay: a captured graph reads them)."""
        tensors = iter(snapshot.tensors)
        for layer in self.layers:
            for store, i in _slots(layer):
                saved = next(tensors)
                if saved is not None and store[i] is not None:
                    store[i].copy_(saved)
        flags = iter(snapshot.flags)
        for layer in self.layers:
            for i in range(layer.number_of_states):
                layer.has_previous_state[i] = next(flags)

    def reset(self) -> None:
        """Back to no tokens seen: the next forward starts the recurrence afresh, as a first prefill does."""
        for layer in self.layers:
            for i in range(layer.number_of_states):
                layer.has_previous_state[i] = False

    def record(self, ids: Sequence[int], logits: Optional[torch.Tensor] = None) -> None:
        key = tuple(ids)
        self.snapshots.pop(key, None)
        self.snapshots[key] = self.take(ids, logits)
        while len(self.snapshots) > self.limit:
            self.snapshots.popitem(last=False)

    def best(self, ids: Sequence[int], valid: int) -> Optional[Snapshot]:
        """The longest snapshot of a prefix of ``ids`` no longer than ``valid`` tokens (keys and values
        must still be cached for all of it); one covering all of ``ids`` must carry its logits."""
        found = None
        for snapshot in self.snapshots.values():
            n = snapshot.length
            if n > valid or (found is not None and n <= found.length):
                continue
            if n == len(ids) and snapshot.logits is None:
                continue
            if tuple(ids[:n]) == snapshot.ids:
                found = snapshot
        if found is not None:
            self.snapshots.move_to_end(found.ids)
        return found

    def clear(self) -> None:
        self.snapshots.clear()

    def copy_from(self, other: "HybridStates") -> None:
        """Carry the live states of another cache's layers over (the cache grew)."""
        self.put_back(other.take(()))
        self.snapshots = other.snapshots
