"""Sibling 4-bit layers that multiply the same input (an attention's q, k and v projections; an MLP's gate and up)
in one launch of the float16 kernel (:class:`.nf4_half.GroupPlan`), in decode steps.

The model's own code stays as it is: it calls ``q_proj(h)``, ``k_proj(h)`` and ``v_proj(h)`` one after the other
with the same tensor ``h``. The first call computes all three products and keeps the others' outputs for that very
tensor (``is``, not equality); the next calls take them. Any other order, input or setting falls back to one launch
a layer. One launch instead of three saves the small layers' poor occupancy (a k/v projection alone ran at
300 GB/s on an H100) and two launches a layer; every row's arithmetic is what its own launch would do.
"""

from typing import Dict, List, Optional, Tuple

GROUPS = True  # False (tests, QWEN_MAGIC_NF4_GROUP=0): one launch a layer
NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_ATTRIBUTE = "_qwen_magic_siblings"


class Siblings:
    def __init__(self, modules: List):
        self.modules = modules
        self.pending: Optional[Tuple[object, Dict]] = None  # (the input, {module: its output}) not yet taken
        self.plans: Dict = {}
        self.bias = None  # (key, the biases one after the other)
        self.broken = False  # the weights cannot share a launch: never try again

    def take(self, module, x, compute):
        """``module``'s output for ``x`` from a shared launch (made now if ``module`` comes first), or None."""
        pending = self.pending
        if pending is not None and pending[0] is x and module in pending[1]:
            out = pending[1].pop(module)
            if not pending[1]:
                self.pending = None
            return out
        if module is not self.modules[0] or self.broken or not _enabled():
            return None
        plan = self._plan(compute, x.device)
        if plan is None:
            return None
        from .nf4 import _flat

        outputs = plan(_flat(x, compute), self._bias()).split(plan.sizes)
        self.pending = (x, dict(zip(self.modules[1:], outputs[1:])))
        return outputs[0]

    def _plan(self, compute, device):
        import torch

        from . import nf4, nf4_half

        key = tuple(nf4._key(m.weight, m.weight.quant_state) for m in self.modules)
        plan = self.plans.get((compute, device))
        if plan is not None and plan.key == key:
            return plan
        states = [m.weight.quant_state for m in self.modules]
        if compute != torch.float16 or any(nf4._half_unsupported(state, compute, device) for state in states):
            return None  # the float16 kernel alone launches groups (bfloat16/float32: one launch a layer)
        if len({m.bias is None for m in self.modules}) > 1:
            self.broken = True
            return None
        try:
            plan = nf4_half.GroupPlan([(m.weight, m.weight.quant_state) for m in self.modules], device,
                                      sm_count=nf4._sm_count(device))
        except ValueError:
            self.broken = True
            return None
        self.plans[(compute, device)] = plan
        return plan

    def _bias(self):
        import torch

        if self.modules[0].bias is None:
            return None
        key = tuple(m.bias.data_ptr() for m in self.modules)
        if self.bias is None or self.bias[0] != key:
            self.bias = (key, torch.cat([m.bias.detach().reshape(-1) for m in self.modules]))
        return self.bias[1]


def _enabled() -> bool:
    import os

    return GROUPS and os.environ.get("QWEN_MAGIC_NF4_GROUP", "1") != "0"


def of(module) -> Optional[Siblings]:
    return module.__dict__.get(_ATTRIBUTE)


def attach(model, is_patched) -> List:
    """Mark every group of patched 4-bit siblings in ``model``; returns the modules marked (for :func:`detach`)."""
    import bitsandbytes as bnb

    marked = []
    for parent in model.modules():
        for names in NAMES:
            members = [getattr(parent, name, None) for name in names]
            if not all(isinstance(m, bnb.nn.Linear4bit) and is_patched(m) and of(m) is None for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            siblings = Siblings(members)
            for m in members:
                m.__dict__[_ATTRIBUTE] = siblings
                marked.append(m)
    return marked


def detach(marked: List) -> None:
    for module in marked:
        module.__dict__.pop(_ATTRIBUTE, None)
