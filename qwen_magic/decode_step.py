"""The fast engine's decode step: one token through the model, replayed as a CUDA graph captured once per cache
(on a side stream, after warm-up steps the first time), or eagerly where graphs are off (the CPU, tests). A model
split over several GPUs captures one graph per device segment (split.py). A mixin of ``fast.FastEngine``, whose
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
        side = self.capture_stream()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2 if not self.captured else 0 if made else 1):
                self.write_position = None
                self._write_at(self.capacity - 1)
                self._step_eager(self.static_token, self.static_position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.write_position = None
        self._write_at(self.capacity - 1)
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, side):
            self.static_logits = self._step_eager(self.static_token, self.static_position)
        self.graph = graph
        self.captured = True
        self.write_position = None  # the counter, if any, is where the warm-up left it
        if saved is not None:
            self.states.put_back(saved)

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
            with self._segmented(), self._kernels_on():
                logits = self._step_eager(token, torch.tensor([position], device=self.device))
        else:
            if self.graph is None:
                self._capture()
            self._write_at(position)
            self.static_token.copy_(token)
            self.static_position.fill_(position)
            self.graph.replay()
            logits = self.static_logits
        self.write_position = position + 1
        return logits
