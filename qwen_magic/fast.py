"""The fast engine: a static KV cache reused across turns and a decode step replayed as a CUDA graph.

Per turn it tokenizes the windowed prompt exactly as the classic recipe does,
keeps the longest prefix whose keys and values are already in the cache, and
prefills only the rest. Decoding feeds one token at a time through a CUDA graph
(decode_step.py: captured once where the decode kernels find the cache through device memory,
else once per cache), samples on the GPU, and lets the host read each token one step late, so
the GPU never waits for Python.

Hybrid models (Qwen3.5, Qwen3-Next: linear-attention layers with a recurrent state)
reuse a prefix only where that state is known for exactly that prefix (hybrid.py).

On a CPU (tests) the same loop runs without the graph.

A model split over several GPUs (a device map) decodes as one graph per device
segment, replayed in order (split.py).

Graphed decode steps run through the Triton kernels of qwen_magic.kernels where they
load (fused norms, rotary embedding and SiLU·mul; a 4-bit matrix-vector product for
narrow layers; attention; the sampler). A prefill takes the fused norms, rotary embedding
and SiLU·mul (the same arithmetic as eager) and, on cards where it is faster, the prefill
attention kernel and a one-kernel dequantization of each 4-bit weight before PyTorch's product
(kernels/nf4_prefill.py: bitsandbytes' own weights, bit for bit). A prefill forward builds no mask
where its attention reads none, and the prompt goes to the device once: nothing in a
prefill waits for the GPU, so the host queues chunk after chunk ahead of it. Where every
attention takes the prefill kernel, a prompt's new part of up to 1,024 tokens is padded to a
bucket and replayed as a CUDA graph, and longer ones are padded to a multiple of 128
(prefill_graph.py). The cache itself (size, growth, write position): static_cache.py; a cache that the
next turn would outgrow grows after the reply, with its graphs, not between two tokens of the next one; a
question that outgrows the cache makes a larger one in its prefill, and its steps replay the graph they had where
it outlives the cache.
"""

import inspect
import os
import threading
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from .attention import (ATTENTION, _filled, grouped_attention, maskless_prefill, no_plan_kernels,  # noqa: F401 (grouped_attention: tests)
                        register_attention)
from .engine import ReplyStream, end_token_ids, model_device
from .hybrid import HybridStates, is_hybrid
from .static_cache import CAPACITY_STEP, FIRST_CAPACITY, GROWTH, GROWTH_MAX, NEXT_MESSAGE, CacheMixin, _round_up  # noqa: F401 (constants: tests, benchmarks)
from .decode_step import DecodeStepMixin
from .kernels import load_kernels, prefilling, release
from .prefill_graph import PAD, PrefillGraphs, meet_product_shapes
from .prompt import encode, prepare, render
from .sampler import Sampler
from .settings import GenerationSettings
from .split import decoder_for

PREFILL_CHUNK = 2730  # tokens per prefill forward on long prompts: bounds activation memory (see _chunk_end)
MOST_CHUNKS = 3  # ... but a prompt longer than this many of them goes in this many chunks (see _chunk_end)


def cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _chunk_end(begin: int, start: int, end: int, step: int = 1) -> int:
    """Where a prefill forward from ``start`` stops, in a prefill of positions ``begin`` to ``end``. Up to 1.5 ×
    PREFILL_CHUNK tokens (4,095) go in one forward, as the recipe's (each forward dequantizes every 4-bit weight
    once, and a short last chunk would cost that for little work); more go in equal chunks of about PREFILL_CHUNK
    (8,000 tokens: three of 2,667), which keeps a long prompt's activations (and the peak memory with 8,000 tokens
    of history: 6.53 GiB for the 7B at most, issue 13) below those of a 4,095-token forward. Past MOST_CHUNKS ×
    PREFILL_CHUNK tokens, MOST_CHUNKS equal chunks (16,000 tokens: three of 5,334): every chunk dequantizes each
    4-bit weight again, which at 16,000 tokens in six chunks made the prefill slower than the recipe's one forward
    (0.58 s against 0.56 on an H100; three chunks: 0.53), and a third of a prompt's activations (the 7B: about 165
    KiB a token) stay about the size of its cache (56 KiB a token). ``step``: chunks a multiple of it (a padded
    prefill's: only the last one is padded; 8,000 tokens: 2,688 + 2,688 + 2,624)."""
    total = end - begin
    if total <= 3 * PREFILL_CHUNK // 2:
        return end
    size = -(-total // min(-(-total // PREFILL_CHUNK), MOST_CHUNKS))
    return min(end, start + -(-size // step) * step)


def _marked(model) -> bool:
    """Whether every causal attention module of ``model`` is marked for the prefill kernel (kernels/prefill.py)."""
    modules = [m for m in model.modules() if getattr(m, "is_causal", False) and hasattr(m, "layer_idx")]
    return bool(modules) and all(getattr(m, "_qwen_magic_prefill_kernel", False) for m in modules)


class FastEngine(DecodeStepMixin, CacheMixin):
    def __init__(self, model, tokenizer, *, context_length: int, use_graph: Optional[bool] = None,
                 placement: Optional[Dict[str, str]] = None, kernels: Optional[bool] = None, padded: Optional[bool] = None):
        """``placement``: module name -> device label, to cut decode steps into segments by it (tests);
        by default a model split over several CUDA devices is cut by its device map when graphed.
        ``kernels``: graphed decode steps use the Triton kernels of qwen_magic.kernels where they run
        (default: with a graph, unless QWEN_MAGIC_KERNELS=0). ``padded``: short prefills padded to a bucket and
        replayed as CUDA graphs (prefill_graph.py; default: with a graph, where every attention takes the prefill
        kernel; tests turn it on for the CPU, where the padded forward runs eagerly)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        experts = getattr(text_config, "num_experts", 0) or getattr(text_config, "num_local_experts", 0)
        self.note = ""  # why the CUDA graph is off, for the load summary
        if use_graph is None:
            use_graph = self.device.type == "cuda" and not experts
            if self.device.type == "cuda" and experts:
                # transformers picks the experts each token visits with host-side loops, which a graph cannot hold
                self.note = " (no CUDA graph: mixture-of-experts layers route tokens on the host)"
        self.use_graph = use_graph
        self.name = "static KV cache + CUDA graph" if self.use_graph else "static KV cache"
        self.context_length = context_length
        self.end_ids = end_token_ids(model, tokenizer)
        self.lock = threading.Lock()
        self.cache = None
        self.capacity = 0
        self.cached_ids: List[int] = []  # tokens whose keys and values the cache holds, from position 0
        self.graph = None
        self.captured = False  # a graph was captured once: later captures skip the warm-up steps
        self.graph_outlives_cache = False  # the graph finds the cache through self.rows: a new cache keeps it (decode_step.py)
        self.rows = self.rows_for = self.parts = None
        self.cache_keyword = cache_keyword(model)
        self.hybrid = is_hybrid(model.config)
        # A vision-language model's hooks (vision.py): decode positions are the text position plus rope_delta (a
        # device tensor, filled in place: a captured graph reads it), and chunk_inputs(start, end) -> (end, kwargs)
        # gives a prefill chunk its pictures and 3-D positions.
        self.rope_delta = torch.zeros(1, dtype=torch.long, device=self.device) if getattr(model.config, "vision_config", None) is not None else None
        self.chunk_inputs = None
        self.states: Optional[HybridStates] = None  # the recurrent layers of a hybrid model's cache
        self.split = decoder_for(model, placement) if placement is not None or self.use_graph else None
        if self.split is not None and self.hybrid:
            self.split.close()
            raise RuntimeError("a hybrid model split over several GPUs runs on transformers generate")
        self.kernels, missing = load_kernels(self.device, kernels if kernels is not None else use_graph, getattr(model, "dtype", None))
        # Patched once (the kernels keep per-weight plans), taken only inside decoding(): see _kernels_on.
        self.unpatch = [module.patch(model) for module in self.kernels]
        if self.kernels:
            self.name += " + Triton kernels"
            if missing and use_graph:
                self.note += f" (not all kernels: {missing})"
        elif missing and use_graph:
            self.note += f" (no Triton kernels: {missing})"
        # Only models on SDPA get the grouped attention (and get SDPA back on close).
        self.grouped = getattr(model.config, "_attn_implementation", None) in ("sdpa", ATTENTION)
        if self.grouped:
            register_attention()
            model.set_attn_implementation(ATTENTION)
        self.maskless = self.grouped and maskless_prefill(model)  # prefill forwards build no mask
        self.start_tensor = torch.zeros(1, dtype=torch.int32, device=self.device)  # a forward's start, for the prefill kernel
        self.keep_row = torch.zeros(1, dtype=torch.long, device=self.device)  # a padded forward's last real row
        kernel_prefill = (self.maskless and any(module.__name__.endswith(".prefill") for module in self.kernels) and _marked(model)
                          and getattr(model, "dtype", None) in (torch.float16, torch.bfloat16))  # what the kernel takes on a GPU
        if padded is None:
            padded = (use_graph and kernel_prefill and not self.hybrid and self.split is None and self.rope_delta is None
                      and os.environ.get("QWEN_MAGIC_PREFILL_GRAPHS", "1") != "0")
        self.prefill_graphs = PrefillGraphs(self) if padded else None

    def _forward(self, ids: torch.Tensor, start: int, extra=None, size: Optional[int] = None) -> torch.Tensor:
        """Logits after ``ids`` at positions ``start``..; ``size``: padded to that many tokens (prefill_graph.py says
        why that is safe), the logits still those of the last real token."""
        length, keep = ids.shape[1], 1
        padding = size is not None and size > length
        if padding:
            ids = torch.cat([ids, ids.new_zeros((1, size - length))], 1)
            keep = self.keep_row
            keep.fill_(length - 1)
        positions = torch.arange(start, start + ids.shape[1], device=self.device)
        self._write_at(start)
        self.write_position = None if padding else start + length  # padded: the counters moved past the padding
        _filled.end = start + ids.shape[1]
        _filled.maskless, _filled.length = self.maskless, ids.shape[1]
        self.start_tensor.fill_(start)
        _filled.start = self.start_tensor
        kwargs = {"position_ids": positions[None], self.cache_keyword: self.cache, **(extra or {})}
        try:
            with no_plan_kernels(), (prefilling() if self.kernels else nullcontext()):
                out = self.model(input_ids=ids, cache_position=positions, use_cache=True, logits_to_keep=keep, **kwargs)
        finally:
            _filled.end, _filled.maskless, _filled.start = None, False, None
        return out.logits[:, -1, :]

    def prefill(self, ids: List[int], reserve: int = 0, stop_event=None, marks=()) -> torch.Tensor:
        """Logits after ``ids``, computing keys and values only past the prefix already cached.

        ``marks``: prefix lengths where a hybrid model's states are worth a snapshot (the end of
        the history before the generation prompt, which the next turn's prompt starts with).
        """
        self._reserve(len(ids) + reserve)
        common = common_prefix(self.cached_ids, ids)
        keep = min(common, len(ids) - 1)
        if self.states is not None:
            keep, logits = self._recurrent_prefix(ids, common, keep)
            if logits is not None:
                return logits
        self.cached_ids = self.cached_ids[:keep]
        logits = None
        marks = sorted(m for m in marks if keep < m < len(ids)) if self.states is not None else []
        start = keep
        # The new tokens go to the device once (a copy per chunk from a list would wait for the chunk before it).
        tokens = torch.tensor([ids[keep:]], dtype=torch.long)
        if self.device.type == "cuda":
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        padded = self.prefill_graphs is not None and not marks and self.chunk_inputs is None
        if padded:
            logits = self.prefill_graphs.run(tokens, keep, len(ids) - keep)  # a short prompt: one graph replay
            if logits is not None:
                self.cached_ids, self.reused = list(ids), keep
                return logits
        while start < len(ids):
            if stop_event is not None and stop_event.is_set() and logits is not None:
                break
            end = min([_chunk_end(keep, start, len(ids), PAD if padded else 1)] + [m for m in marks if m > start])
            extra = None
            if self.chunk_inputs is not None:
                end, extra = self.chunk_inputs(start, end)
            size = None
            if padded:  # a length of a few kinds: each new matrix-product shape costs cuBLAS a kernel the first time
                size = _round_up(end - start, PAD)
                size = size if start + size <= self.capacity else None
            logits = self._forward(tokens[:, start - keep:end - keep], start, extra, size)
            self.cached_ids = ids[:end]
            if end in marks:
                self.states.record(self.cached_ids)
            start = end
        self.reused = keep
        if self.states is not None and len(self.cached_ids) == len(ids):
            self.states.record(ids, logits)  # regenerate and a re-run cell come back to this prompt
        return logits

    def _recurrent_prefix(self, ids: List[int], common: int, keep: int):
        """For a hybrid model: the longest reusable prefix whose recurrent state is known, made live.

        Returns (prefix length, None), or (len(ids), logits) when a snapshot covers the whole prompt.
        """
        live = len(self.cached_ids)
        if common == live and 0 < live <= keep:
            return live, None  # the states hold exactly this prefix already
        snapshot = self.states.best(ids, common)
        if snapshot is None:
            self.states.reset()
            return 0, None
        self.states.put_back(snapshot)
        self.cached_ids = list(ids[:snapshot.length])
        if snapshot.length == len(ids):
            self.reused = len(ids)
            self.write_position = None
            return len(ids), snapshot.logits.clone()
        return snapshot.length, None

    # --- a reply

    def warm_up(self) -> None:
        """Allocate a first cache and capture its graph, so the first reply does not wait for them; the chat
        template (compiled on its first use) and the sampler take their first call here too."""
        with self.lock, torch.inference_mode():
            try:
                ids = prepare(self.tokenizer, [{"role": "user", "content": "Hello"}])[0]
            except Exception:  # a tokenizer without a usable chat template: the first reply will say so
                ids = self.tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
            logits = self.prefill(ids, reserve=FIRST_CAPACITY)
            token = Sampler(self.model, GenerationSettings(), ids, self.device, self.kernels)(logits)
            self.step(token, len(ids))
            self.cached_ids = []  # what the warm-up wrote is not a conversation
            if self.states is not None:
                self.states.clear()
            if self.prefill_graphs is not None:
                self.prefill_graphs.capture()
                meet_product_shapes(self, 3 * PREFILL_CHUNK // 2)

    def start(self, messages, settings: GenerationSettings, continue_final: bool = False) -> ReplyStream:
        began = time.perf_counter()  # the reply's clock counts the chat template and the tokenizer too, as the recipe's
        ids, opened = prepare(self.tokenizer, messages, continue_final, settings.thinking)
        marks = ()
        if self.hybrid and not continue_final:
            # The history without the generation prompt: every later turn's prompt starts with it.
            marks = (len(encode(self.tokenizer, render(self.tokenizer, messages, thinking=settings.thinking, generation_prompt=False))),)
        info = {}

        def produce(emit, stop_event):
            with self.lock, torch.inference_mode():
                try:
                    self._generate(ids, settings, emit, stop_event, info, marks)
                except torch.cuda.OutOfMemoryError:
                    self._drop_cache(release=True)  # give its memory back; the next turn builds a new one
                    raise
                except BaseException:
                    self.cached_ids = []  # the cache may be half written: rebuild next time
                    raise

        return ReplyStream(self.tokenizer, len(ids), produce, max_new_tokens=settings.max_new_tokens, end_ids=self.end_ids,
                           info=info, opens_thinking=opened, started=began)

    def _generate(self, ids, settings, emit, stop_event, info, marks=()) -> None:
        clock = time.perf_counter
        info["timings"] = timings = {"start": clock()}
        sampler = Sampler(self.model, settings, ids, self.device, self.kernels)
        logits = self.prefill(ids, reserve=settings.max_new_tokens, stop_event=stop_event, marks=marks)
        timings["prefill_queued"] = clock()
        info["cached_tokens"] = self.reused
        if stop_event.is_set() and len(self.cached_ids) < len(ids):
            return  # interrupted during a long prefill: no reply at all
        host = torch.empty(settings.max_new_tokens, dtype=torch.long, pin_memory=self.device.type == "cuda")
        token, position = sampler(logits), len(ids)
        last = settings.max_new_tokens - 1
        for i in range(settings.max_new_tokens):
            host[i:i + 1].copy_(token.view(1), non_blocking=True)
            ready = torch.cuda.Event() if self.device.type == "cuda" else None
            if ready is not None:
                ready.record()
            if i == 0:
                # The first token shows as soon as the prefill ends, before a step (or a graph capture) is queued.
                if ready is not None:
                    ready.synchronize()
                value = int(host[0])
                timings["first_token"] = clock()
                emit([value])
                if value in self.end_ids or stop_event.is_set() or i == last:
                    break
            following = None
            if i < last:
                # Queue the next step before reading this token: the GPU keeps working meanwhile.
                following = sampler(self.step(token, position))
            if i > 0:
                if ready is not None:
                    ready.synchronize()
                value = int(host[i])
            if following is not None:
                self.cached_ids.append(value)
                position += 1
            if i > 0:
                emit([value])
                if value in self.end_ids or stop_event.is_set() or following is None:
                    break
            token = following
        info["finished_at"] = clock()  # what follows is not the reply's time
        if self.states is not None and len(self.cached_ids) > len(ids):
            self.states.record(self.cached_ids)  # the next turn may drop this reply (thinking), or undo it
        if not stop_event.is_set():
            self._grow_ahead(settings.max_new_tokens)
        if self.prefill_graphs is not None and self.prefill_graphs.stale:
            try:
                self.prefill_graphs.capture()  # the cache was rebuilt: the next short prompt's graphs, after this reply
            except torch.cuda.OutOfMemoryError:  # the reply is whole; the next turn prefills eagerly
                self.prefill_graphs.drop(everything=True)

    def close(self) -> None:
        """Free the cache and graph, and give the model back its own attention."""
        self._drop_cache(release=True)
        if self.split is not None:
            self.split.close()
        while self.unpatch:
            self.unpatch.pop()()
        if self.kernels:
            self.kernels = []
            release()
        if self.model is not None and self.grouped:
            self.model.set_attn_implementation("sdpa")
        self.model = None
