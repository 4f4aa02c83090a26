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
def _flagged(flag: str):
    """``_decoding.<flag>`` set in this thread while the context runs (nested ones keep the outer value after)."""
    before = getattr(_decoding, flag, False)
    setattr(_decoding, flag, True)
    try:
        yield
    finally:
        setattr(_decoding, flag, before)


def decoding():
    """The fast engine's decode steps (warm-ups, graph capture, eager steps): the kernels run here. Its prefill,
    and anything else using the model (transformers' generate for a window with pictures), keep the stock path."""
    return _flagged("on")


def prefilling():
    """The fast engine's prefill forwards: the fused norms, rotary embedding and SiLU·mul run here too (fused.py: the
    same arithmetic as eager, rounded where it rounds; fewer passes over a long prompt's activations, and no float32
    copies of them). The 4-bit matrix-vector kernels and the decode attention stay with decode steps."""
    return _flagged("prefill")


def mark_attention(model, mark: str):
    """Set attribute ``mark`` on ``model``'s causal self-attention modules (those with ``is_causal`` and a
    ``layer_idx``), for a kernel module's routing (decode.py, prefill.py); returns the function that removes the marks."""
    marked = []
    for module in model.modules():
        if getattr(module, "is_causal", False) and hasattr(module, "layer_idx") and not getattr(module, mark, False):
            setattr(module, mark, True)
            marked.append(module)

    def restore():
        while marked:
            module = marked.pop()
            if getattr(module, mark, False):
                delattr(module, mark)

    return restore


NAMES = ("nf4", "fused", "decode", "sample", "prefill")
_started = {}  # (device, dtype) -> the Future of start_checks' results
_started_lock = threading.Lock()


def _check_one(name: str, device, dtype):
    """Why module ``name`` cannot run on ``device`` (None: it can); with ``dtype``, after its check (which compiles it)."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
        reason = module.available(device)
        if reason is None and dtype is not None and hasattr(module, "check"):
            reason = module.check(device, dtype)
    except Exception as error:  # a broken triton install must not stop the engine
        reason = f"{name}: {type(error).__name__}: {error}"
    return reason


def _check_all(device, dtype) -> dict:
    """Every module's :func:`_check_one`, at once: Triton compiles mostly outside the GIL (LLVM, ptxas), so the
    checks take about as long as the slowest one instead of their sum."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if torch.device(device).type != "cuda":  # Triton's CPU interpreter (tests) patches the language while it runs: one at a time
        return {name: _check_one(name, device, dtype) for name in NAMES}
    try:  # Triton's driver (and its launcher utilities, compiled on a first use) set up once, before the threads
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception:  # no usable triton: each module's available() says so
        pass
    with ThreadPoolExecutor(len(NAMES), thread_name_prefix="qwen_magic-kernel-check") as pool:
        return dict(zip(NAMES, pool.map(lambda name: _check_one(name, device, dtype), NAMES)))


def _key(device, dtype):
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device), dtype


def start_checks(device, dtype) -> None:
    """Compile and check the kernels for ``device`` and ``dtype`` in the background, while a model's weights load
    (loader.py); :func:`load_kernels` takes the results (waiting for them if need be). On a machine whose Triton
    cache is empty (every new Colab runtime) the compiles took seconds in a row after the weights."""
    if os.environ.get("QWEN_MAGIC_KERNELS", "1") == "0":
        return
    from concurrent.futures import ThreadPoolExecutor

    key = _key(device, dtype)
    with _started_lock:
        if key in _started:
            return
        executor = ThreadPoolExecutor(1, thread_name_prefix="qwen_magic-kernel-checks")
        _started[key] = executor.submit(_check_all, device, dtype)
        executor.shutdown(wait=False)


def load_kernels(device, wanted: bool, dtype=None):
    """The kernel modules (qwen_magic.kernels) usable on ``device``, and why any (or part of one) is not (one line).
    A module with a ``check`` runs its kernels once against eager arithmetic in ``dtype`` first (or did, in the
    background, after :func:`start_checks`)."""
    global _engines
    if not wanted or os.environ.get("QWEN_MAGIC_KERNELS", "1") == "0":
        return [], ""
    with _started_lock:
        started = _started.pop(_key(device, dtype), None)
    results = started.result() if started is not None else _check_all(device, dtype)
    found, reasons = [], []
    for name in NAMES:
        reason = results[name]
        if not reason:
            module = importlib.import_module(f"{__name__}.{name}")
        if reason:
            reasons.append(reason)
        else:
            found.append(module)
            partly = getattr(module, "HALF_NOTE", "")  # nf4: its float16 kernel switched off by its check
            if partly:
                reasons.append(f"NF4 float16 kernel off ({partly}): the Triton one instead")
            if name == "nf4":
                from . import nf4_prefill

                if nf4_prefill.OFF:
                    reasons.append(f"NF4 prefill dequantization off ({nf4_prefill.OFF}): bitsandbytes' instead")
    if found:
        _engines += 1  # the caller calls release() when done with them
    return found, "; ".join(dict.fromkeys(reasons))
