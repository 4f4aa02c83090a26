"""A model split over several GPUs of one machine (accelerate's device map) on the fast engine.

One CUDA graph captures work on one device only, so the decode step is cut into
*segments*: runs of modules, in the order they execute, that live on one device.
Each segment is captured as its own graph on its own device; a replay copies what
crosses a boundary (hidden state, attention mask, rotary cos/sin, positions) from
the earlier segment's output into static buffers on the next device, then replays
that segment's graph, and so on. The logits come back to the input device, where
the engine samples as on one card.

The cut is made by forward pre-hooks on the modules of the device map (they run
before accelerate's own hooks, which then find everything already in place): at the
first module of a new segment the capture on the old device ends, every tensor
argument is given a static buffer on the new device (the copy is recorded, not
done), and the capture on the new device begins. A tensor that reaches a later
module of the segment from another device gets a buffer too.

Without CUDA (tests) the same hooks cut an eager step, doing the copies at once:
two segments on one CPU (labels ``cpu:0`` and ``cpu:1``) exercise the logic.

The static cache needs nothing special: its layers allocate their keys and values
on the first write, on the device of the layer that writes them.
"""

import re
from contextlib import ExitStack, contextmanager
from typing import Dict, List, Optional

import torch

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
HEAD = re.compile(r"(?:^|\.)lm_head$")
ROTARY = re.compile(r"(?:^|\.)rotary_emb$")
VERIFY_TOLERANCE = 1e-3  # a replay must match an eager step at least this well, or the engine falls back


def label(value) -> str:
    """A device map value (0, "cuda:1", "cpu", "disk", torch.device) as a string like ``cuda:0``."""
    if isinstance(value, int):
        return f"cuda:{value}"
    value = str(value)
    return f"cuda:{value}" if value.isdigit() else value


def placement(model) -> Dict[str, str]:
    """Module name -> device label, from accelerate's ``hf_device_map`` (empty when the model was not dispatched)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return {name: label(value) for name, value in device_map.items()}


def _devices(placement: Dict[str, str]) -> List[str]:
    seen = []
    for value in placement.values():
        if value not in seen:
            seen.append(value)
    return seen


def is_split(placement: Dict[str, str]) -> bool:
    """Whether the map spreads the model over several CUDA devices and nothing else (no CPU or disk offload)."""
    devices = _devices(placement)
    return len(devices) >= 2 and all(d.startswith("cuda") for d in devices)


def device_of(value: str) -> torch.device:
    """The device a label names; ``cpu:N`` (tests' stand-in for several devices) is the CPU."""
    device = torch.device(value)
    return torch.device("cpu") if device.type == "cpu" else device


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or (a.index or 0) == (b.index or 0))


def _ranges(numbers: List[int]) -> str:
    numbers = sorted(numbers)
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}–{n}")
            start = None
    return ", ".join(parts)


def describe(placement: Dict[str, str], sizes: Optional[Dict[str, int]] = None) -> str:
    """How the model is split, for the load summary:
    ``split over 2 GPUs: cuda:0 layers 0–13 (2.1 GiB), cuda:1 layers 14–27 + head (2.3 GiB)``."""
    devices = _devices(placement)
    parts = []
    for device in devices:
        names = [n for n, d in placement.items() if d == device]
        layers = [int(m.group(1)) for m in map(LAYER.search, names) if m]
        what = [f"layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}"] if layers else []
        if any(HEAD.search(n) for n in names):
            what.append("head")
        text = f"{device} {' + '.join(what)}".rstrip() if what else device
        if sizes and device in sizes:
            text += f" ({sizes[device] / 2**30:.1f} GiB)"
        parts.append(text)
    gpus = sum(d.startswith("cuda") for d in devices)
    kind = f"{gpus} GPUs" if gpus == len(devices) else f"{len(devices)} devices"
    return f"split over {kind}: " + ", ".join(parts)


def device_bytes(model) -> Dict[str, int]:
    """Bytes of weights and buffers on each device."""
    sizes: Dict[str, int] = {}
    seen = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        key = str(tensor.device)
        sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
    return sizes


class Segment:
    """A run of modules on one device: its graph, and the copies into it that come before it."""

    def __init__(self, label: Optional[str], device: torch.device):
        self.label, self.device = label, device
        self.staged = {}  # id(source) -> (source, buffer): a source keeps its buffer, and stays alive
        self.transfers = []  # (source, buffer), copied in this order before the segment runs
        self.graph = None
        self.context = None  # the stream context its capture runs in
        self.calls = 0

    def __repr__(self):
        return f"Segment({self.label}, {len(self.transfers)} transfers)"


class SplitGraph:
    """The captured segments: replay them in order, copying what crosses each boundary first."""

    def __init__(self, segments: List[Segment], logits: torch.Tensor, home: torch.Tensor):
        self.segments, self.logits, self.home = segments, logits, home

    def replay(self) -> None:
        for segment in self.segments:
            for source, buffer in segment.transfers:
                buffer.copy_(source)
            segment.graph.replay()
        if self.home is not self.logits:
            self.home.copy_(self.logits)


class SplitDecoder:
    """The hooks that cut one forward pass into segments, eager (copies at once) or captured (copies recorded)."""

    def __init__(self, model, placement: Dict[str, str]):
        self.model = model
        self.labels = {}
        for name, value in placement.items():
            if name and value != "disk":
                self.labels[model.get_submodule(name)] = value
        self.devices = []
        for value in self.labels.values():
            device = device_of(value)
            if not any(same_device(device, d) for d in self.devices):
                self.devices.append(device)
        self.mode = None  # None (hooks idle), "eager" or "capture"
        self.segments: List[Segment] = []
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True) for module in self.labels]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.segments = []

    # --- the hook

    def _pre(self, module, args, kwargs):
        if self.mode is None:
            return None
        value = self.labels[module]
        segment = self.segments[-1]
        boundary = False
        if value != segment.label:
            device = device_of(value)
            if segment.calls == 0 and same_device(segment.device, device):
                segment.label = value  # the opening segment: the first module runs where the inputs are
            else:
                boundary = True
                if self.mode == "capture":
                    self._end(segment)
                segment = Segment(value, device)
                self.segments.append(segment)
        args, kwargs = self._stage((args, kwargs), segment, everything=boundary)
        if boundary and self.mode == "capture":
            self._begin(segment)
        segment.calls += 1
        return args, kwargs

    def _stage(self, value, segment: Segment, everything: bool):
        if isinstance(value, torch.Tensor):
            known = segment.staged.get(id(value))
            if known is not None:
                return known[1]
            if not everything and same_device(value.device, segment.device):
                return value
            buffer = torch.empty_like(value, device=segment.device)
            segment.staged[id(value)] = (value, buffer)
            segment.transfers.append((value, buffer))
            if self.mode == "eager":
                buffer.copy_(value)
            return buffer
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self._stage(v, segment, everything) for v in value)
        if isinstance(value, list):
            return [self._stage(v, segment, everything) for v in value]
        if type(value) is dict:
            return {k: self._stage(v, segment, everything) for k, v in value.items()}
        return value  # the cache, flags, None: untouched

    # --- capture

    def _begin(self, segment: Segment) -> None:
        segment.graph = torch.cuda.CUDAGraph()
        segment.context = torch.cuda.stream(self.streams[segment.device.index])
        segment.context.__enter__()
        segment.graph.capture_begin()

    def _end(self, segment: Segment) -> None:
        try:
            segment.graph.capture_end()
        finally:
            if segment.context is not None:
                segment.context.__exit__(None, None, None)
                segment.context = None

    @contextmanager
    def eager(self, device: torch.device):
        """Hooks cut the forward passes run inside into segments, copying at each boundary as they go."""
        self.mode, self.segments = "eager", [Segment(None, device)]
        try:
            yield
        finally:
            self.mode, self.segments = None, []

    @contextmanager
    def _outputs_stay(self):
        """accelerate's root hook moves the output back to the input device: not inside a capture (the
        last segment's device would wait on another's); the replay copies the logits home instead."""
        changed = []
        for module in self.model.modules():
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                if getattr(h, "io_same_device", False):
                    h.io_same_device = False
                    changed.append(h)
        try:
            yield
        finally:
            for h in changed:
                h.io_same_device = True

    def capture(self, step, device: torch.device, warm_up=None) -> SplitGraph:
        """Capture ``step()`` (one decode step, fixed input buffers on ``device``) as one graph per segment.

        ``warm_up()`` (default ``step``) runs twice first, eagerly through the same hooks; it may do what the
        capture must not (point the cache's write counters, on every device).
        """
        self.streams = {}
        for d in self.devices + [device]:
            if d.index not in self.streams:
                self.streams[d.index] = torch.cuda.Stream(device=d)
                self.streams[d.index].wait_stream(torch.cuda.current_stream(d))
        # Warm-up on the capture streams (cuBLAS and bitsandbytes set up there), through the segment hooks.
        with ExitStack() as stack:
            for stream in self.streams.values():
                stack.enter_context(torch.cuda.stream(stream))
            stack.enter_context(torch.cuda.device(device))
            for _ in range(2):
                with self.eager(device):
                    (warm_up or step)()
        for index, stream in self.streams.items():
            torch.cuda.current_stream(index).wait_stream(stream)
        for index in self.streams:
            torch.cuda.synchronize(index)
        self.mode, self.segments = "capture", [Segment(None, device)]
        try:
            with self._outputs_stay():
                self._begin(self.segments[0])
                try:
                    logits = step()
                except BaseException:
                    try:  # close the capture that was open, keeping the error that stopped it
                        self._end(self.segments[-1])
                    except Exception:
                        pass
                    raise
                self._end(self.segments[-1])
            segments = self.segments
        finally:
            # A failed capture leaves no stream context behind (the one that failed is closed above).
            self.mode, self.segments = None, []
        empty = [s for s in segments if s.calls == 0]
        if empty:
            raise RuntimeError(f"a decode segment ran no module ({empty[0].label or device})")
        home = logits if same_device(logits.device, device) else torch.empty_like(logits, device=device)
        return SplitGraph(segments, logits, home)


def colocate_rotary(model, mapping: Dict[str, str]) -> Dict[str, str]:
    """The map with the rotary embedding on the first layer's device, and the module moved there.

    accelerate leaves the rotary embedding (no weights, a table of frequencies) on the last card,
    while the layers it feeds start on the first: a decode step then crosses between the cards
    four times instead of twice. Computed on the first layer's card, its cos/sin tables are the
    same numbers (the same float32 arithmetic) and need no copy; the model's own hooks and
    ``hf_device_map`` are told, so ``generate`` on the same model runs it there too.
    """
    first = next((value for name, value in mapping.items() if (found := LAYER.search(name)) and found.group(1) == "0"), None)
    moved = dict(mapping)
    for name, value in mapping.items():
        if first is None or not ROTARY.search(name) or value == first:
            continue
        module = model.get_submodule(name)
        if next(module.parameters(), None) is not None:
            continue
        device = device_of(first)
        module.to(device)
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "execution_device", None) is not None:
                h.execution_device = device
        device_map = getattr(model, "hf_device_map", None)
        if isinstance(device_map, dict) and name in device_map:
            device_map[name] = device.index if isinstance(device_map[name], int) and device.type == "cuda" else first
        moved[name] = first
    return moved


def decoder_for(model, mapping: Optional[Dict[str, str]] = None) -> Optional[SplitDecoder]:
    """The segment hooks for a model split over several CUDA devices (or for the map given); None otherwise."""
    if mapping is None:
        mapping = placement(model)
        if not is_split(mapping):
            return None
        mapping = colocate_rotary(model, mapping)
    return SplitDecoder(model, mapping)


def capture_split(self) -> None:
    """The fast engine's capture for a split model (``self``: the FastEngine): one graph per device
    segment, checked once against an eager step before it is used."""
    self.static_token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
    self.static_position = torch.full((1,), self.capacity - 1, dtype=torch.long, device=self.device)

    def warm_up():
        self.write_position = None
        self._write_at(self.capacity - 1)  # the last slot, which no turn has reached yet
        return self._step_eager(self.static_token, self.static_position)

    self.graph = self.split.capture(lambda: self._step_eager(self.static_token, self.static_position), self.device, warm_up)
    self.static_logits = self.graph.home
    # Work the hooks did not see (on another device than the segment being captured) would be left out
    # of the graphs: a replay at another token and position must equal a plain eager step.
    position = max(self.capacity - 2, 0)
    token = torch.ones((1, 1), dtype=torch.long, device=self.device)
    self.write_position = None
    self._write_at(position)
    expected = self._step_eager(token, torch.tensor([position], device=self.device)).float()
    self.write_position = None
    self._write_at(position)
    self.static_token.copy_(token)
    self.static_position.fill_(position)
    self.graph.replay()
    got = self.static_logits.float()
    finite = torch.isfinite(got) & torch.isfinite(expected)  # a random model may overflow: compare the rest
    error = ((got - expected)[finite].norm() / expected[finite].norm().clamp_min(1e-30)).item()
    if not torch.equal(torch.isfinite(got), torch.isfinite(expected)):
        error = float("inf")
    self.write_position = None
    if not error < VERIFY_TOLERANCE:
        self.graph = self.static_logits = None
        bad = lambda t: int((~torch.isfinite(t)).sum())  # noqa: E731
        raise RuntimeError(f"the decode graphs of the split model do not reproduce an eager step (relative error {error:.1e}; "
                           f"{bad(got)} of {got.numel()} logits not finite in the graphs, {bad(expected)} in the eager step)")
