"""Optional GPU kernels (Triton). Nothing here is imported by ``import qwen_magic``; each module
imports torch (and triton, lazily) itself."""

import importlib
import os


def load_kernels(device, wanted: bool):
    """The kernel modules (qwen_magic.kernels) usable on ``device``, and why any is not (one line)."""
    if not wanted or os.environ.get("QWEN_MAGIC_KERNELS", "1") == "0":
        return [], ""
    found, reasons = [], []
    for name in ("nf4", "fused"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            reason = module.available(device)
        except Exception as error:  # a broken triton install must not stop the engine
            reason = f"{name}: {type(error).__name__}: {error}"
        if reason:
            reasons.append(reason)
        else:
            found.append(module)
    return found, "; ".join(dict.fromkeys(reasons))
