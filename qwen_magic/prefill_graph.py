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
into a graph, and raise in the warm-up run here instead). Graphs hold the addresses of the cache they write, so
a prompt from position 0 (a first question with nothing cached, a new or rebuilt cache) takes graphs that write a
staging cache of their own (58 MiB for the 7B), whose first n positions are then copied into the engine's: they
are captured once and outlive the engine's cache. A new part after cached tokens takes graphs that write the
engine's cache in place, captured when the engine warms up and again after a reply whenever the cache was rebuilt.

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
from .graph_capture import capturing
from .kernels import prefilling
from .static_cache import point_counters

BUCKETS = (128, 256, 512, 768, 1024)  # padded prompt lengths (each more than attention.SMALL_QUERY: the kernel's path)
# Longer prefills (eager) are padded to a multiple of this, so their matrix products take few shapes, each met once at
# load (meet_product_shapes): on an H100 cuBLAS spent about 5 ms of host time on a product shape's first call (a kernel
# set up per shape), 15-20 ms on a prompt length's first prefill.
PAD = 128


def bucket_for(n: int) -> Optional[int]:
    return next((b for b in BUCKETS if n <= b), None)


class _Entry:
    def __init__(self, size: int, at: int, device, cache, end: int):
        self.ids = torch.zeros((1, size), dtype=torch.long, device=device)
        self.base = torch.arange(size, device=device)
        self.positions = self.base + at
        self.last = torch.full((1,), size - 1, dtype=torch.long, device=device)
        self.cache, self.end = cache, end  # the cache its forward writes, and how many positions it has
        self.graph = None
        self.logits = None


def _made(cache, like) -> bool:
    """Whether every layer of ``cache`` holds its keys and values; a new static cache makes them at its first write,
    so make them here, of ``like``'s layers' kind (a first prompt's keys and values come from the staging cache)."""
    for layer, model in zip(getattr(cache, "layers", ()), getattr(like, "layers", ())):
        if getattr(layer, "keys", None) is not None or getattr(model, "keys", None) is None:
            continue
        make = getattr(layer, "lazy_initialization", None)
        if make is None:
            return False
        keys, values = model.keys[:, :, :0], model.values[:, :, :0]
        try:
            make(keys, values)
        except TypeError:  # transformers 4: the keys alone
            make(keys)
    layers = getattr(cache, "layers", ())
    return bool(layers) and len(layers) == len(getattr(like, "layers", ())) and all(
        getattr(layer, "keys", None) is not None for layer in layers)


class PrefillGraphs:
    """Two sets of graphs, one per bucket each: ``fresh`` for a prompt from position 0 (a first question with nothing
    cached; a new or rebuilt cache), which write a staging cache of their own (BUCKETS[-1] positions) whose keys and
    values are then copied into the engine's, so they outlive the engine's cache; and ``entries`` for a new part
    after cached tokens, which write the engine's cache where it is (captured again after a rebuild)."""

    def __init__(self, engine):
        self.engine = engine
        self.entries: Dict[int, _Entry] = {}
        self.fresh: Dict[int, _Entry] = {}
        self.staging = None
        self.stale = True  # the cache changed since the last capture
        self.failed = ""  # why graphs are off (eager prefills from then on)
        self.graphed = engine.use_graph  # else (tests, and the CPU) the padded forward runs eagerly
        self.pool = None
        self.warmed = set()  # (bucket, fresh) whose forward ran once outside a capture

    def drop(self, everything: bool = False) -> None:
        """Forget the graphs that write the engine's cache (it is gone), or ``everything`` (out of memory, closing).
        Their memory pool goes with the last graph (PyTorch frees a pool no graph holds, and asserts on a capture into
        it: the next capture takes a new one)."""
        self.entries.clear()
        if everything:
            self.fresh.clear()
            self.staging = None
        if not self.fresh:
            self.pool = None
        self.stale = True

    def run(self, tokens: torch.Tensor, start: int, n: int) -> Optional[torch.Tensor]:
        """Logits after ``tokens`` (a (1, n) device tensor) at positions ``start``.., through a graph; None where
        none takes them (too long, past the cache, not captured)."""
        size = bucket_for(n)
        engine = self.engine
        if size is None or self.failed:
            return None
        entry = self.fresh.get(size) if start == 0 else self.entries.get(size)
        if entry is None or start + size > entry.end:
            return None
        entry.ids[:, :n].copy_(tokens)
        engine.start_tensor.fill_(start)
        torch.add(entry.base, start, out=entry.positions)
        entry.last.fill_(n - 1)
        engine.write_position = None
        if entry.cache is engine.cache:
            engine._write_at(start)
        else:
            point_counters(entry.cache, start)
        if entry.graph is not None:
            entry.graph.replay()
            logits = entry.logits
        else:
            logits = self._forward(entry)
        if entry.cache is not engine.cache:  # the prompt's keys and values, into the engine's cache
            if not _made(engine.cache, entry.cache):
                return None  # a cache of another make: the eager prefill writes it
            for source, target in zip(entry.cache.layers, engine.cache.layers):
                target.keys[:, :, :n].copy_(source.keys[:, :, :n])
                target.values[:, :, :n].copy_(source.values[:, :, :n])
        engine.write_position = None  # the counters moved past the padding
        return logits

    def _forward(self, entry: _Entry) -> torch.Tensor:
        engine = self.engine
        _filled.end, _filled.maskless, _filled.length = entry.end, True, entry.ids.shape[1]
        _filled.start, _filled.graphed = engine.start_tensor, True
        try:
            with no_plan_kernels(), (prefilling() if engine.kernels else nullcontext()):
                out = engine.model(input_ids=entry.ids, cache_position=entry.positions, position_ids=entry.positions[None],
                                   use_cache=True, logits_to_keep=entry.last, **{engine.cache_keyword: entry.cache})
        finally:
            _filled.end, _filled.maskless, _filled.start, _filled.graphed = None, False, None, False
        return out.logits[:, -1, :]

    def capture(self) -> None:
        """The graphs not captured yet: a fresh one per bucket (once), and one per bucket for the engine's cache where
        it fits past the cached tokens (its capture writes keys and values into the cache's last positions). A failure
        switches graphs off for this engine."""
        engine = self.engine
        self.stale = False
        try:
            with torch.inference_mode():
                if self.staging is None:
                    from transformers import StaticCache

                    self.staging = StaticCache(config=engine.model.config, max_cache_len=BUCKETS[-1])
                for size in BUCKETS:
                    if size not in self.fresh:
                        self.fresh[size] = self._capture(size, 0, self.staging, BUCKETS[-1])
                for size in BUCKETS:
                    at = engine.capacity - size
                    if size not in self.entries and at >= len(engine.cached_ids):
                        self.entries[size] = self._capture(size, at, engine.cache, engine.capacity)
        except torch.cuda.OutOfMemoryError:  # not a path graphs cannot hold: the caller says the card is full
            self.drop(everything=True)
            engine.write_position = None
            raise
        except Exception as error:  # a path a graph cannot hold: eager prefills, said in the load summary
            self.drop(everything=True)
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            engine.note += f" (short prefills not graphed: {self.failed})"
            engine.write_position = None

    def _capture(self, size: int, at: int, cache, end: int) -> _Entry:
        engine = self.engine
        entry = _Entry(size, at, engine.device, cache, end)

        def aim():
            engine.start_tensor.fill_(at)
            engine.write_position = None
            if cache is engine.cache:
                engine._write_at(at)
            else:
                point_counters(cache, at)

        aim()
        if not self.graphed:
            engine.write_position = None
            return entry
        # One eager run first, on a side stream: kernels compile, libraries pick their algorithms, a cache makes its
        # keys and values (never inside a capture: they would live in the graph's pool), and a path that a graph cannot
        # hold raises here, outside any capture. Once per bucket and kind: a rebuilt cache's graphs are captured at once.
        current = torch.cuda.current_stream(engine.device)
        side = engine.capture_stream()
        kind = (size, cache is self.staging)
        if kind not in self.warmed or not _made(cache, self.staging):
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._forward(entry)
            current.wait_stream(side)  # the counters are aimed again after the warm-up's writes, not before
            self.warmed.add(kind)
            aim()
        side.wait_stream(current)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # all buckets share one pool: they never replay at once
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, side, self.pool):
            entry.logits = self._forward(entry)
        aim()
        graph.replay()  # a graph's first replay uploads it to the card (milliseconds): here, not in a first question
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
