"""Vision-language models (Qwen2.5-VL, Qwen3-VL, multimodal Qwen3.5): prompts with pictures, and their engine.

The model is given what the classic recipe gives it: ``processor.apply_chat_template``
on messages whose pictures are image parts, then ``processor(text=..., images=...)``,
then ``model.generate``. Messages arrive as the chat keeps them, ``{"role", "content",
"images": [PNG bytes, ...]}``; each becomes ``[{"type": "image"}, ..., {"type": "text"}]``.

The window counts the tokens the processor makes: the rendered text's tokens, with each
image's one ``<|image_pad|>`` standing for as many tokens as its grid holds (the
processor's own ``image_grid_thw``, computed once per picture).

With the fast engine (its static cache and CUDA graph) a window with pictures is exact too:
its prefill passes the processor's pixel values and image grids with the multimodal rotary
positions ``generate`` computes (``get_rope_index``: three rows, time, height, width), and
each decode step takes the text position plus the prompt's ``rope_deltas``. A later turn
reuses cached keys and values only over a prefix whose tokens, pictures and 3-D positions
are all the same; a hybrid model (Qwen3.5) also drops state snapshots taken over other pictures.
A window without pictures is a plain text prompt, with the same greedy tokens as the text model's.
"""

import hashlib
import inspect
import threading
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from transformers import StoppingCriteriaList

from .engine import ReplyStream, _Emitter, _StopFlag, end_token_ids, generation_kwargs, model_device
from .fast import ATTENTION, common_prefix
from .picture_cache import PictureCache
from .prompt import encode, prepare, render
from .settings import GenerationSettings



def parts(message: dict) -> dict:
    """A chat message as the processor's template takes it: image parts first, then the text."""
    pictures = message.get("images") or ()
    if not pictures:
        return {"role": message["role"], "content": message["content"]}
    return {"role": message["role"], "content": [{"type": "image"} for _ in pictures] + [{"type": "text", "text": message["content"]}]}


def pictures_of(messages) -> List[bytes]:
    return [png for message in messages for png in message.get("images") or ()]


def _options(thinking):
    return {} if thinking is None else {"enable_thinking": thinking}


class VisionPrompt:
    """Renders, counts and encodes messages with pictures through the model's processor."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._tokens: Dict[str, int] = {}  # image tokens by the picture's hash
        self._lock = threading.Lock()
        self._pictures = PictureCache()  # decoded and processed once, for every later turn that still shows them

    def render(self, messages, continue_final: bool = False, thinking=None, generation_prompt: bool = True) -> str:
        if continue_final:
            return self.render(messages[:-1], thinking=thinking) + messages[-1]["content"]
        return self.processor.apply_chat_template([parts(m) for m in messages], tokenize=False,
                                                  add_generation_prompt=generation_prompt, **_options(thinking))

    def image_tokens(self, png: bytes) -> int:
        """Tokens one picture takes in the prompt: its grid of patches over the merge size squared, as the processor counts."""
        name = hashlib.sha256(png).hexdigest()
        with self._lock:
            if name not in self._tokens:
                # Through the processor itself (its own image settings), which keeps the processed picture for
                # the turn's inputs: a new picture goes through the image processor once, not once per use.
                inputs, _ = self.inputs([{"role": "user", "content": "", "images": [png]}])
                grid = inputs["image_grid_thw"][0]
                self._tokens[name] = int(grid.prod()) // self.processor.image_processor.merge_size ** 2
            return self._tokens[name]

    def count(self, messages, thinking=None) -> int:
        text = self.render(messages, thinking=thinking)
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return tokens + sum(self.image_tokens(png) - 1 for png in pictures_of(messages))

    def inputs(self, messages, continue_final: bool = False, thinking=None):
        """The model's inputs, exactly as the classic recipe makes them; and the prompt text."""
        text = self.render(messages, continue_final, thinking)
        pngs = pictures_of(messages)
        if not pngs:
            return self.processor(text=[text], return_tensors="pt"), text
        with self._pictures.lock:
            pictures = self._pictures.take(pngs)
            with self._pictures.standing_in(self.processor, pictures):
                inputs = self.processor(text=[text], images=[picture.image for picture in pictures], return_tensors="pt")
        return inputs, text


class Layout:
    """What a prompt puts in the cache: token ids, its 3-D rotary positions (3, n) and the pictures' spans.

    ``delta``: the prompt's rope_deltas; a token at text position ``i`` past the prompt sits at ``i + delta``.
    """

    def __init__(self, ids: List[int], positions: Optional[torch.Tensor] = None, delta: int = 0, spans=()):
        self.ids = ids
        self.positions = positions  # None: positions 0, 1, 2, ... on all three rows (no pictures)
        self.delta = delta
        self.spans = list(spans)  # (start, end, picture hash) of each picture's image tokens

    def rotary(self, n: int) -> torch.Tensor:
        """The 3-D positions of the first ``n`` tokens of this prompt followed by its reply."""
        plain = torch.arange(n, dtype=torch.long)
        if self.positions is None:
            return plain.expand(3, n)
        known = self.positions[:, :n]
        return torch.cat([known, (plain[known.shape[1]:] + self.delta).expand(3, -1)], dim=1)


def image_spans(ids: List[int], image_token: int, hashes: List[str]):
    """(start, end, hash) of each run of image tokens, in order; one run per picture."""
    spans, start = [], None
    for i, token in enumerate(ids + [None]):
        if token == image_token and start is None:
            start = i
        elif token != image_token and start is not None:
            spans.append((start, i, hashes[len(spans)]))
            start = None
    return spans


def reusable(cached: Optional[Layout], cached_ids: List[int], new: Layout) -> int:
    """How many cached tokens a new prompt may keep: equal tokens, equal pictures and equal 3-D positions."""
    if cached is None:
        return 0
    n = common_prefix(cached_ids, new.ids)
    if n:
        same = (cached.rotary(n) == new.rotary(n)).all(dim=0)
        if not bool(same.all()):
            n = int((~same).nonzero()[0])
    old_spans = {(start, end): name for start, end, name in cached.spans}
    for start, end, name in new.spans:
        if start < n and old_spans.get((start, end)) != name:
            n = start  # another picture of the same size: the same tokens, other keys and values
            break
    for start, end, _ in new.spans:
        if start < n < end:
            n = start  # never keep part of a picture
    return n


class VisionEngine:
    """Windows with pictures: the fast engine with the processor's inputs and 3-D positions where it was picked,
    else ``model.generate`` as the classic recipe calls it.

    ``text_engine`` (a fast.FastEngine): runs every window, pictures or not, on its cache and graph.
    """

    def __init__(self, model, processor, text_engine=None):
        self.model = model
        self.prompt = VisionPrompt(processor)
        self.tokenizer = processor.tokenizer
        self.end_ids = end_token_ids(model, self.tokenizer)
        self.text_engine = text_engine
        # Windows with pictures take the fast engine too (prefill with the processor's inputs and 3-D positions,
        # graphed decode at text position + rope_deltas); tests may turn it off to reach generate.
        self.pictures_on_fast = text_engine is not None
        self.name = text_engine.name if text_engine is not None else "transformers generate"
        self.image_token = getattr(model.config, "image_token_id", None)
        self.layout: Optional[Layout] = None  # what the fast engine's cache holds (its prompt part)
        self.pictures_of_snapshots: Dict[tuple, tuple] = {}  # a hybrid model's state snapshots: the pictures in each

    def start(self, messages, settings: GenerationSettings, continue_final: bool = False) -> ReplyStream:
        from .thinking import opens_thinking

        began = time.perf_counter()  # the processor's work is part of the wait for the first token
        if self.text_engine is not None and (self.pictures_on_fast or not pictures_of(messages)):
            return self._fast(messages, settings, continue_final, began)

        inputs, text = self.prompt.inputs(messages, continue_final, settings.thinking)
        head = text[: len(text) - len(messages[-1]["content"])] if continue_final else text
        inputs = inputs.to(model_device(self.model))
        kwargs = generation_kwargs(self.model, self.tokenizer, settings)

        def produce(emit, stop_event):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with self._recipe_attention(), torch.inference_mode():
                self.model.generate(**inputs, streamer=_Emitter(emit),
                                    stopping_criteria=StoppingCriteriaList([_StopFlag(stop_event)]), **kwargs)

        return ReplyStream(self.tokenizer, int(inputs["input_ids"].shape[1]), produce, max_new_tokens=settings.max_new_tokens,
                           end_ids=self.end_ids, opens_thinking=opens_thinking(head), started=began)

    # --- the fast engine

    def _fast(self, messages, settings: GenerationSettings, continue_final: bool, began: Optional[float] = None) -> ReplyStream:
        from .thinking import opens_thinking

        fast = self.text_engine
        hashes = [hashlib.sha256(png).hexdigest() for png in pictures_of(messages)]
        if not hashes:  # a text prompt, tokenized as the text model's
            ids, opened = prepare(self.tokenizer, messages, continue_final, settings.thinking)
            layout, inputs = Layout(ids), None
        else:
            inputs, text = self.prompt.inputs(messages, continue_final, settings.thinking)
            head = text[: len(text) - len(messages[-1]["content"])] if continue_final else text
            opened = opens_thinking(head)
            ids = inputs["input_ids"][0].tolist()
            positions, delta = self._rotary(inputs)
            layout = Layout(ids, positions, delta, image_spans(ids, self.image_token, hashes))
        marks = ()
        if fast.hybrid and not continue_final:
            marks = self._history_mark(messages, settings.thinking, layout, bool(hashes))
        info = {}

        def produce(emit, stop_event):
            with fast.lock, torch.inference_mode():
                keep = reusable(self.layout, fast.cached_ids, layout)
                if keep < common_prefix(fast.cached_ids, ids):
                    # Same tokens over other pictures: keys and values up to ``keep`` hold; a hybrid model's live
                    # states hold all of the old prefix, which cannot be cut back, so it starts afresh.
                    fast.cached_ids = fast.cached_ids[:keep] if fast.states is None else []
                if fast.states is not None:
                    self._forget_other_pictures(layout)
                self.layout = layout
                fast.rope_delta.fill_(layout.delta)
                fast.chunk_inputs = self._chunks(layout, inputs) if inputs is not None else None
                try:
                    fast._generate(ids, settings, emit, stop_event, info, marks)
                except torch.cuda.OutOfMemoryError:
                    fast._drop_cache(release=True)
                    raise
                except BaseException:
                    fast.cached_ids = []
                    raise
                finally:
                    fast.chunk_inputs = None
                    if fast.states is not None:
                        self._note_snapshots(layout)

        return ReplyStream(self.tokenizer, len(ids), produce, max_new_tokens=settings.max_new_tokens, end_ids=self.end_ids,
                           info=info, opens_thinking=opened, started=began)

    def _rotary(self, inputs):
        """The prompt's 3-D positions (3, n) and rope_deltas, as ``generate`` computes them (on the host)."""
        inner = self.model.model
        accepted = inspect.signature(inner.get_rope_index).parameters
        options = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
        positions, deltas = inner.get_rope_index(inputs["input_ids"], **options)
        return positions[:, 0].to("cpu", torch.long), int(deltas.view(-1)[0])

    def _history_mark(self, messages, thinking, layout: Layout, pictures: bool):
        """A hybrid model's snapshot point: the history without the generation prompt (as fast.FastEngine.start)."""
        if not pictures:
            return (len(encode(self.tokenizer, render(self.tokenizer, messages, thinking=thinking, generation_prompt=False))),)
        whole = self.prompt.render(messages, thinking=thinking)
        history = self.prompt.render(messages, thinking=thinking, generation_prompt=False)
        if not whole.startswith(history):
            return ()
        mark = len(layout.ids) - len(encode(self.tokenizer, whole[len(history):]))
        return (mark,) if all(not start < mark < end for start, end, _ in layout.spans) else ()

    def _chunks(self, layout: Layout, inputs):
        """fast.FastEngine.chunk_inputs for one prompt: a chunk never splits a picture, and carries its
        pictures' pixel values and grids and its tokens' 3-D positions."""
        device = model_device(self.model)
        grids = inputs["image_grid_thw"]
        rows = torch.cumsum(torch.cat([grids.new_zeros(1), grids.prod(dim=-1)]), dim=0).tolist()
        pixels = inputs["pixel_values"]
        positions = layout.positions.to(device)

        def chunk(start: int, end: int):
            for first, last, _ in layout.spans:
                if first < end < last:
                    end = last
                if first < start < last:
                    raise RuntimeError("a prefill chunk starts inside a picture")
            extra = {"position_ids": positions[:, None, start:end]}
            inside = [k for k, (first, last, _) in enumerate(layout.spans) if start <= first and last <= end]
            if inside:
                extra["pixel_values"] = torch.cat([pixels[rows[k]:rows[k + 1]] for k in inside]).to(device)  # as the recipe passes them
                extra["image_grid_thw"] = grids[inside].to(device)
            return end, extra

        return chunk

    # A hybrid model's snapshots are named by token ids alone; two pictures of one size give the same ids.
    def _pictures_in(self, layout: Layout, n: int) -> tuple:
        return tuple(name for start, end, name in layout.spans if end <= n)

    def _note_snapshots(self, layout: Layout) -> None:
        snapshots = self.text_engine.states.snapshots if self.text_engine.states is not None else {}
        for key in snapshots:
            if key not in self.pictures_of_snapshots and tuple(layout.ids[:len(key)]) == key:
                self.pictures_of_snapshots[key] = self._pictures_in(layout, len(key))
        for key in list(self.pictures_of_snapshots):
            if key not in snapshots:
                del self.pictures_of_snapshots[key]

    def _forget_other_pictures(self, layout: Layout) -> None:
        snapshots = self.text_engine.states.snapshots
        for key in list(snapshots):
            n = common_prefix(list(key), layout.ids)
            if self.image_token in key[:n] and self.pictures_of_snapshots.get(key) != self._pictures_in(layout, n):
                del snapshots[key]
                self.pictures_of_snapshots.pop(key, None)

    @contextmanager
    def _recipe_attention(self):
        """The fast engine gives the model its grouped decode attention; ``generate`` runs on the
        recipe's own SDPA (the captured graph keeps its kernels), and no fast turn runs meanwhile."""
        fast = self.text_engine
        if fast is None or not fast.grouped:
            yield
            return
        with fast.lock:
            self.model.set_attn_implementation("sdpa")
            try:
                yield
            finally:
                self.model.set_attn_implementation(ATTENTION)

    def close(self):
        if self.text_engine is not None:
            self.text_engine.close()
        self.model = self.text_engine = None
        self.layout = None
