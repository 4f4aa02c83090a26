"""Short prefills replayed as CUDA graphs: the fast engine's first questions and new messages of up to 1,024 tokens.

A prefill of a few hundred tokens is host-bound on a fast card: on an H100 (7B shape, NF4) its GPU work is about
20 ms, but queuing it (28 layers of Python, 196 four-bit products, the norms and kernels between them) takes the
host about 35 ms, more when the machine is busy. So prompts whose new part fits a bucket (:data:`BUCKETS`) are
padded to it and replayed from a CUDA graph, captured once per bucket and cache: the host queues one replay.

Padding: the padded tokens follow the prompt. Causal attention keeps them out of every real token's output, and
the keys and values they write land past the prompt, in cache positions that the next tokens overwrite before
anything reads them (a bucket is used only where it fits the cache). The real tokens' outputs differ from an
unpadded forward's only where a matrix product over more rows sums in another order (cuBLAS picks its kernels by
shape): rounding, bounded by the GPU tests against the recipe's logits.

What a graph reads at replay, filled just before it: the token ids (the first n of its bucket), the positions
(start + 0 .. B - 1: the rotary embedding's and the cache writes'), the row whose logits are kept (n - 1), the
start as the prefill attention kernel reads it, and the cache's write counters. Only where every attention of the
model takes that kernel (kernels/prefill.py: it reads its start from the device; the other paths bake host values
into a graph, and raise in the warm-up run here instead). Captured when the engine warms up, and again after a
reply whenever its cache was rebuilt (graphs hold the cache's addresses).

Without CUDA graphs (the CPU; tests asking for padding on an eager engine) the same padded forward runs eagerly in
place of a replay: the graph's arithmetic, step by step.

Longer prefills (eager, chunk by chunk) are padded the same way to a multiple of :data:`PAD`, so that their matrix
products come in few shapes, which :func:`meet_product_shapes` runs once at load: cuBLAS sets a kernel up (about
5 ms of host time on an H100) the first time it meets a product shape, and a prompt length seen for the first time
paid that for each of its projections (15-20 ms).
"""

from contextlib import nullcontext
from typing import Dict, Optional

import torch

from .attention import _filled, no_plan_kernels
from .kernels import prefilling

BUCKETS = (128, 256, 512, 768, 1024)  # padded prompt lengths (each more than attention.SMALL_QUERY: the kernel's path)
# Longer prefills (eager) are padded to a multiple of this, so their matrix products take few shapes, each met once at
# load (meet_product_shapes): on an H100 cuBLAS spent about 5 ms of host time on a product shape's first call (a kernel
# set up per shape), 15-20 ms on a prompt length's first prefill.
PAD = 128


def bucket_for(n: int) -> Optional[int]:
    return next((b for b in BUCKETS if n <= b), None)


class _Entry:
    def __init__(self, size: int, at: int, device):
        self.ids = torch.zeros((1, size), dtype=torch.long, device=device)
        self.base = torch.arange(size, device=device)
        self.positions = self.base + at
        self.last = torch.full((1,), size - 1, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None


class PrefillGraphs:
    def __init__(self, engine):
        self.engine = engine
        self.entries: Dict[int, _Entry] = {}
        self.stale = True  # the cache changed since the last capture
        self.failed = ""  # why graphs are off (eager prefills from then on)
        self.graphed = engine.use_graph  # else (tests, and the CPU) the padded forward runs eagerly
        self.pool = None

    def drop(self) -> None:
        """Forget the graphs (the cache they write is gone); their memory pool goes with them (PyTorch frees a pool
        no graph holds, and asserts on a capture into it: the next capture takes a new one)."""
        self.entries.clear()
        self.pool = None
        self.stale = True

    def run(self, tokens: torch.Tensor, start: int, n: int) -> Optional[torch.Tensor]:
        """Logits after ``tokens`` (a (1, n) device tensor) at positions ``start``.., through a graph; None where
        none takes them (too long, past the cache, not captured)."""
        size = bucket_for(n)
        entry = self.entries.get(size) if size is not None else None
        engine = self.engine
        if entry is None or self.failed or start + size > engine.capacity:
            return None
        entry.ids[:, :n].copy_(tokens)
        engine.start_tensor.fill_(start)
        torch.add(entry.base, start, out=entry.positions)
        entry.last.fill_(n - 1)
        engine.write_position = None
        engine._write_at(start)
        if entry.graph is not None:
            entry.graph.replay()
            logits = entry.logits
        else:
            logits = self._forward(entry)
        engine.write_position = None  # the counters moved past the padding
        return logits

    def _forward(self, entry: _Entry) -> torch.Tensor:
        engine = self.engine
        _filled.end, _filled.maskless, _filled.length = engine.capacity, True, entry.ids.shape[1]
        _filled.start, _filled.graphed = engine.start_tensor, True
        try:
            with no_plan_kernels(), (prefilling() if engine.kernels else nullcontext()):
                out = engine.model(input_ids=entry.ids, cache_position=entry.positions, position_ids=entry.positions[None],
                                   use_cache=True, logits_to_keep=entry.last, **{engine.cache_keyword: engine.cache})
        finally:
            _filled.end, _filled.maskless, _filled.start, _filled.graphed = None, False, None, False
        return out.logits[:, -1, :]

    def capture(self) -> None:
        """A graph per bucket for the current cache, where it fits past the cached tokens (its capture writes
        keys and values into the cache's last positions). A failure switches graphs off for this engine."""
        engine = self.engine
        self.stale = False
        for size in BUCKETS:
            at = engine.capacity - size
            if size in self.entries or at < len(engine.cached_ids):
                continue
            try:
                with torch.inference_mode():
                    self.entries[size] = self._capture(size, at)
            except Exception as error:  # a path a graph cannot hold: eager prefills, said in the load summary
                self.entries.clear()
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                engine.note += f" (short prefills not graphed: {self.failed})"
                engine.write_position = None
                return

    def _capture(self, size: int, at: int) -> _Entry:
        engine = self.engine
        entry = _Entry(size, at, engine.device)
        engine.start_tensor.fill_(at)
        engine.write_position = None
        engine._write_at(at)
        if not self.graphed:
            engine.write_position = None
            return entry
        # One eager run first, on a side stream: kernels compile, libraries pick their algorithms, and a path that
        # a graph cannot hold raises here, outside any capture.
        current = torch.cuda.current_stream(engine.device)
        side = engine.capture_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(entry)
        current.wait_stream(side)
        engine.write_position = None
        engine._write_at(at)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # the buckets share one pool: they never replay at once
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            entry.logits = self._forward(entry)
        entry.graph = graph
        engine.write_position = None
        return entry


def meet_product_shapes(engine, most: int) -> None:
    """Every matrix product a padded prefill forward can run (the decoder layers' projections at each multiple of
    PAD past the graphs' buckets, up to ``most`` tokens: one forward's most), once, on random inputs of the same shapes,
    dtypes and layout: cuBLAS sets its kernels up at load, not in a first question."""
    import torch.nn.functional as F

    dtype = getattr(engine.model, "dtype", None)
    if engine.device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return
    shapes = set()
    for name, module in engine.model.named_modules():
        weight = getattr(module, "weight", None)
        if ".layers." not in name or weight is None or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        shapes.add((module.out_features, module.in_features, getattr(module, "bias", None) is not None))
    sizes = range(BUCKETS[-1] + PAD, -(-most // PAD) * PAD + 1, PAD)
    inputs = {}
    for n, k, bias in sorted(shapes):
        if k not in inputs:
            inputs[k] = torch.randn(sizes[-1], k, dtype=dtype, device=engine.device)
        weight = torch.randn(n, k, dtype=dtype, device=engine.device)
        extra = torch.randn(n, dtype=dtype, device=engine.device) if bias else None
        for m in sizes:
            F.linear(inputs[k][:m], weight, extra)
        del weight, extra
    del inputs
