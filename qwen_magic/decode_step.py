"""The fast engine's decode step: one token through the model, replayed as a CUDA graph (captured on a side stream,
after warm-up steps the first time), or eagerly where graphs are off (the CPU, tests). Where the decode kernels find
the cache through device memory (``self.rows``, kernels/decode.fill_rows: every layer's keys and values addresses),
the graph is captured once and outlives the cache: a cache that grows is described in the rows again, not captured
again (a capture is a Python forward: 45-60 ms of host time on an H100 host, a pause between two tokens when a
question outgrew its cache). Otherwise (a hybrid model's recurrent states, transformers 4's cache, no kernels) the graph
is captured once per cache. A model split over several GPUs captures one graph per device segment (split.py). A mixin of ``fast.FastEngine``, whose
attributes it uses (``model``, ``cache``, ``capacity``, ``states``, ``kernels``, ``split``, ``rope_delta``,
``use_graph``, ``_write_at``)."""

from contextlib import nullcontext

import torch

from .graph_capture import capturing
from .kernels import decoding
from .split import capture_split


class DecodeStepMixin:

    def _capture(self) -> None:
        with self._kernels_on():  # warm-up steps compile them, the capture records them
            if self.split is not None:
                return capture_split(self)
            return self._capture_single()

    def _kernels_on(self):
        """Decode steps (and only they: a prefill stays the recipe's own) run through the Triton kernels."""
        return decoding() if self.kernels else nullcontext()

    def _rows_kernel(self):
        """kernels/decode.py where decode steps may find the cache through ``self.rows`` (a graph that outlives the
        cache): its kernels loaded, one device, no recurrent layers (their states are the cache's own tensors)."""
        if self.split is not None or self.hybrid:
            return None
        return next((module for module in self.kernels if hasattr(module, "fill_rows")), None)

    def _fill_rows(self) -> bool:
        """Describe the current cache in ``self.rows`` (the addresses a graph that outlives the cache reads), once per
        cache, after its layers were written; False where it cannot (the steps then take the cache's own addresses)."""
        if self.rows_for is self.cache and self.cache is not None:
            return True
        kernel = self._rows_kernel()
        if kernel is None or self.cache is None:
            return False
        layers = len(getattr(self.cache, "layers", ()))
        if self.rows is None:
            self.rows = torch.zeros((layers + 1, 4), dtype=torch.int64, device=self.device)  # at one address for good
        text = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        parts = kernel.fill_rows(self.cache, self.rows, getattr(text, "num_attention_heads", 0) or 0)
        if parts is None:
            return False
        self.parts, self.rows_for = parts, self.cache
        return True

    def _through_rows(self):
        """Decode steps that write and attend through ``self.rows`` where it describes the cache (kernels/decode.rows)."""
        return self._rows_kernel().rows() if self._fill_rows() else nullcontext(None)  # described: the kernel is there

    def _capture_single(self) -> None:
        self.static_token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        # Warm-up runs really write keys and values: aim them at the last slot, which no turn has reached yet.
        self.static_position = torch.full((1,), self.capacity - 1, dtype=torch.long, device=self.device)
        saved = self.states.take(()) if self.states is not None else None  # warm-up steps fold into the recurrent state
        # Warm-up steps let libraries set themselves up outside the capture; once is enough per engine, so a
        # cache that grows later captures its new graph without them (a shorter pause between two tokens). A cache
        # not written yet makes its keys and values at its first write, which must not be inside the capture (it
        # would be recorded: every replay would clear the cache): one warm-up step first.
        made = all(getattr(layer, "is_initialized", True) for layer in getattr(self.cache, "layers", ()))
        warm = 2 if not self.captured else 0 if made else 1
        first = 0 if made else min(warm, 1)
        self._warm_up(first, through_rows=False)  # writes a new cache's layers (made at their first write)
        self._fill_rows()  # on the main stream, once the layers are there
        self._warm_up(warm - first, through_rows=True)  # compiles the rows' kernels, outside the capture
        self.write_position = None
        self._write_at(self.capacity - 1)
        rows = self._through_rows()  # before the capture begins (describing a cache copies to the device)
        self.capture_stream().wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, self.capture_stream()), rows as taken:
            self.static_logits = self._step_eager(self.static_token, self.static_position)
        self.graph = graph
        self.captured = True
        # Every layer wrote and attended through the rows: nothing in the graph holds the cache's own addresses.
        layers = len(getattr(self.cache, "layers", ()))
        self.graph_outlives_cache = taken is not None and layers > 0 and taken == {"write": layers, "attention": layers}
        self.write_position = None  # the counter, if any, is where the warm-up left it
        if saved is not None:
            self.states.put_back(saved)

    def _warm_up(self, steps: int, through_rows: bool) -> None:
        """Eager steps on the capture stream, writing at the last slot (which no turn has reached yet)."""
        if not steps:
            return
        main, side = torch.cuda.current_stream(self.device), self.capture_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(steps):
                self.write_position = None
                self._write_at(self.capacity - 1)
                with self._through_rows() if through_rows else nullcontext():
                    self._step_eager(self.static_token, self.static_position)
        main.wait_stream(side)

    def capture_stream(self):
        """The one side stream this engine's warm-up runs and graph captures use. PyTorch gives cuBLAS a 32 MiB
        workspace per stream it runs on, kept for the process: a new stream per capture kept one more each time."""
        if getattr(self, "_capture_stream", None) is None:
            self._capture_stream = torch.cuda.Stream(device=self.device)
        return self._capture_stream

    def _segmented(self):
        """Eager steps of a split model go through the segment hooks too (copies at each boundary)."""
        return self.split.eager(self.device) if self.split is not None else nullcontext()

    def _step_eager(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        rotary = position if self.rope_delta is None else position + self.rope_delta
        out = self.model(
            input_ids=token, cache_position=position, position_ids=rotary.view(1, 1), use_cache=True,
            **{self.cache_keyword: self.cache},
        )
        return out.logits[:, -1, :]

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Feed one token (a (1, 1) device tensor) at ``position``; logits for the next. No host sync.

        With a graph the logits are its output buffer, valid until the next step.
        """
        if not self.use_graph:
            self._write_at(position)
            with self._segmented(), self._kernels_on(), self._through_rows():
                logits = self._step_eager(token, torch.tensor([position], device=self.device))
        else:
            if self.graph is not None and self.graph_outlives_cache and not self._fill_rows():
                self.graph = None  # a cache the rows cannot describe (not reached with the engine's own caches): capture anew
            if self.graph is None:
                self._capture()
            self._write_at(position)
            self.static_token.copy_(token)
            self.static_position.fill_(position)
            self.graph.replay()
            logits = self.static_logits
        self.write_position = position + 1
        return logits
