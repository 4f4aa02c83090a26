"""Triton launches a kernel on the current CUDA device's stream, whatever device its tensors are on.

For a model split over several cards the current device is the first card while a later card's
layers run (accelerate's hooks move tensors, not the current device): a kernel for those layers
would run on the first card's stream, out of order with the work that made its inputs. Every
launch goes through :func:`on`, which makes the tensors' device current for it.
"""

import contextlib

import torch


def on(device: torch.device):
    """A context in which ``device`` is the current CUDA device (nothing to do on the CPU or when it already is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
