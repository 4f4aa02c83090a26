"""Optional GPU kernels (Triton). Nothing here is imported by ``import qwen_magic``; each module
imports torch (and triton, lazily) itself."""

import importlib
import os
import threading
from contextlib import contextmanager

_decoding = threading.local()
_engines = 0  # fast engines using the kernels now: while any is open, they run inside decoding() alone


def allowed(prefill: bool = False) -> bool:
    """Whether a patched module may take its kernel now (always, unless an open engine keeps them to its decode steps;
    ``prefill``: a kernel that also takes the engine's prefill forwards, inside prefilling())."""
    return _engines == 0 or getattr(_decoding, "on", False) or (prefill and getattr(_decoding, "prefill", False))


def release() -> None:
    """An engine that got kernels from load_kernels is closed."""
    global _engines
    _engines = max(0, _engines - 1)


@contextmanager
def decoding():
    """The fast engine's decode steps (warm-ups, graph capture, eager steps): the kernels run here. Its prefill,
    and anything else using the model (transformers' generate for a window with pictures), keep the stock path."""
    before = getattr(_decoding, "on", False)
    _decoding.on = True
    try:
        yield
    finally:
        _decoding.on = before


@contextmanager
def prefilling():
    """The fast engine's prefill forwards: the fused norms, rotary embedding and SiLU·mul run here too (fused.py: the
    same arithmetic as eager, rounded where it rounds; fewer passes over a long prompt's activations, and no float32
    copies of them). The 4-bit matrix-vector kernels and the decode attention stay with decode steps."""
    before = getattr(_decoding, "prefill", False)
    _decoding.prefill = True
    try:
        yield
    finally:
        _decoding.prefill = before


def load_kernels(device, wanted: bool, dtype=None):
    """The kernel modules (qwen_magic.kernels) usable on ``device``, and why any (or part of one) is not (one line).
    A module with a ``check`` runs its kernels once against eager arithmetic in ``dtype`` first."""
    global _engines
    if not wanted or os.environ.get("QWEN_MAGIC_KERNELS", "1") == "0":
        return [], ""
    found, reasons = [], []
    for name in ("nf4", "fused", "decode", "sample", "prefill"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            reason = module.available(device)
            if reason is None and dtype is not None and hasattr(module, "check"):
                reason = module.check(device, dtype)
        except Exception as error:  # a broken triton install must not stop the engine
            reason = f"{name}: {type(error).__name__}: {error}"
        if reason:
            reasons.append(reason)
        else:
            found.append(module)
            partly = getattr(module, "HALF_NOTE", "")  # nf4: its float16 kernel switched off by its check
            if partly:
                reasons.append(f"NF4 float16 kernel off ({partly}): the Triton one instead")
    if found:
        _engines += 1  # the caller calls release() when done with them
    return found, "; ".join(dict.fromkeys(reasons))
