"""One CUDA graph capture, without what ``torch.cuda.graph`` does before it.

``torch.cuda.graph`` first waits for the whole device (``torch.cuda.synchronize()``), empties PyTorch's caching
allocator (``torch.cuda.empty_cache()``: every free block back to the driver) and its pinned host memory cache, and
in older torch runs ``gc.collect()``. For the fast engine that cost twice: the capture itself took longer (the pause
between two tokens when a growing cache needs a new decode graph), and the next prefill found no cached blocks and
no pinned buffer, so it paid ``cudaMalloc`` and ``cudaHostAlloc`` again (a prompt length seen after a capture looked
slower than its repeat). The engine's captures run on their own side stream, after warm-up runs on it, so none of
that is needed: the capture records, it runs nothing. The garbage collector is held off meanwhile, so that no
tensor of another stream is freed into the capture.
"""

import gc
from contextlib import contextmanager

import torch


@contextmanager
def capturing(graph: "torch.cuda.CUDAGraph", stream: "torch.cuda.Stream", pool=None):
    """Capture the work queued inside the block into ``graph``, on ``stream``, in ``pool`` (a graph pool handle
    shared with other graphs) or a private pool of its own."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(*(() if pool is None else (pool,)))
            try:
                yield graph
            finally:
                graph.capture_end()
    finally:
        if collecting:
            gc.enable()
