"""Where the Triton kernels can run, and on which device each launch runs.

Triton launches a kernel on the current CUDA device's stream, whatever device its tensors are on.
For a model split over several cards the current device is the first card while a later card's
layers run (accelerate's hooks move tensors, not the current device): a kernel for those layers
would run on the first card's stream, out of order with the work that made its inputs. Every
launch goes through :func:`on`, which makes the tensors' device current for it.
"""

import contextlib
from typing import Optional

import torch


def unsupported(device=None) -> Optional[str]:
    """None when Triton's kernels can run on ``device`` (default: the current CUDA device), else why not, in one line."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    except Exception as error:  # a broken install
        return f"triton does not import ({type(error).__name__}: {error})".splitlines()[0]
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if getattr(torch.version, "hip", None):
        return "the kernels are written for NVIDIA GPUs, not ROCm"
    major, minor = torch.cuda.get_device_capability(device.index if device.index is not None else torch.cuda.current_device())
    if (major, minor) < (7, 5):
        return f"the kernels need compute capability 7.5 or newer; this GPU has {major}.{minor}"
    return None


def on(device: torch.device):
    """A context in which ``device`` is the current CUDA device (nothing to do on the CPU or when it already is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
