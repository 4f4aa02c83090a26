"""Generation: messages and settings in, a stream of text out. No IPython here.

An engine's ``start(messages, settings)`` returns a ``ReplyStream``: iterate it for
text pieces as tokens arrive, call ``request_stop()`` or ``stop()`` to end it early
(the kernel's interrupt does that through the caller), then read ``result`` for
the whole reply, its token ids, counts and finish reason.

Tokens are produced in a worker thread by a *producer* (``produce(emit, stop)``),
so the caller's thread stays free to show them and to receive the interrupt. Two
engines: ``GenerateEngine`` (``model.generate``, runs anywhere) and the CUDA-graph
decode loop in ``fast.py``.
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .errors import OutOfMemory
from .prompt import prepare
from .settings import GenerationSettings


@dataclass
class Reply:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # "stop", "length" or "interrupted"
    first_token_seconds: Optional[float]
    seconds: float
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused from the last turn
    completion_tokens: Optional[int] = None  # a server's own count, where the ids are not at hand
    reasoning: Optional[str] = None  # a thinking model's reasoning, apart from ``text`` (set by the chat layer)

    @property
    def new_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_ids)

    @property
    def tokens_per_second(self) -> Optional[float]:
        """Decode speed: tokens after the first over the time after the first."""
        if self.first_token_seconds is None or self.new_tokens < 2:
            return None
        decode_time = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / decode_time if decode_time > 0 else None


class IncrementalDecoder:
    """Text for a growing list of token ids, released only in whole characters.

    Byte-level tokens can split a character (most Chinese characters take several);
    a piece ending in U+FFFD is held back until the next token completes it.
    Works on a sliding slice of ids, so each token costs O(1) decoding.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.released = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids) -> str:
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            piece = text[len(prefix):]
            self.released += piece
            return piece
        return ""

    def flush(self) -> str:
        """What is still held back once no token will follow (bytes that never made a character)."""
        text = self.text()
        piece = text[len(self.released):] if text.startswith(self.released) else ""
        self.released += piece
        return piece

    def text(self) -> str:
        return self._decode(self.ids)


class TextPieces:
    """The IncrementalDecoder's surface for producers that emit text (a server) rather than token ids."""

    def __init__(self):
        self.ids: List[str] = []  # the pieces as they came

    def push(self, piece: str) -> str:
        self.ids.append(piece)
        return piece

    def flush(self) -> str:
        return ""

    def text(self) -> str:
        return "".join(self.ids)


def end_token_ids(model, tokenizer) -> set:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


_DONE = object()

Producer = Callable[[Callable[[List[int]], None], threading.Event], None]


class ReplyStream:
    """Runs a producer in a worker thread; iterating yields whole-character text pieces."""

    def __init__(self, tokenizer, prompt_tokens: int, produce: Producer, *, max_new_tokens: int, end_ids: set, info=None,
                 opens_thinking: Optional[bool] = False, started: Optional[float] = None):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else TextPieces()
        self.prompt_tokens = prompt_tokens
        self.opens_thinking = opens_thinking  # the prompt opened a think block (None: not known)
        self.info = {} if info is None else info  # filled by the producer, e.g. "cached_tokens"
        self.stop_event = threading.Event()
        self.error: Optional[BaseException] = None
        self.result: Optional[Reply] = None
        self._queue = queue.Queue()
        self._end_ids = end_ids
        self._max_new_tokens = max_new_tokens
        self._interrupted = False
        # When the question began to be prepared (``started``: a picture's processing counts), else now.
        self._started = time.perf_counter() if started is None else started
        self._first_token_at: Optional[float] = None
        self._thread = threading.Thread(target=self._run, args=(produce,), daemon=True)
        self._thread.start()

    def _run(self, produce):
        try:
            produce(self._queue.put, self.stop_event)
        except BaseException as error:  # handed to the caller's thread, never lost
            self.error = error
        finally:
            self._queue.put(_DONE)

    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _DONE:
                self._finish()
                rest = self.decoder.flush()
                if rest:
                    yield rest
                return
            if self._first_token_at is None:
                self._first_token_at = time.perf_counter()
            piece = self.decoder.push(item)
            if piece:
                yield piece

    def request_stop(self) -> None:
        """Ask generation to end after the current token; iteration then finishes normally."""
        self._interrupted = True
        self.stop_event.set()

    def stop(self) -> None:
        """End generation now (the user interrupted) and keep what was generated so far."""
        self.request_stop()
        while True:  # a second Ctrl-C must not leave the worker running
            try:
                self._thread.join()
                break
            except KeyboardInterrupt:
                continue
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            self.decoder.push(item)
        self._finish()

    def _finish(self) -> None:
        if self.result is not None:
            return
        self._thread.join()
        if self.error is not None and not self._interrupted:
            if isinstance(self.error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                raise OutOfMemory(
                    "Out of GPU memory while generating: lower --max-new-tokens or QwenMagics.max_context_tokens, "
                    "or load a smaller model. The conversation is unchanged."
                ) from None
            raise self.error
        ids = list(self.decoder.ids)
        if self._interrupted:
            reason = "interrupted"
        elif self.info.get("finish_reason") in ("stop", "length"):
            reason = self.info["finish_reason"]
        elif ids and ids[-1] in self._end_ids:
            reason = "stop"
        elif len(ids) >= self._max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        texts = isinstance(self.decoder, TextPieces)
        self.result = Reply(
            text=self.decoder.text(),
            token_ids=[] if texts else ids,
            prompt_tokens=self.info.get("prompt_tokens", self.prompt_tokens),
            finish_reason=reason,
            first_token_seconds=None if self._first_token_at is None else self._first_token_at - self._started,
            # A producer's work after its last token (the fast engine growing its cache) is not the reply's time.
            seconds=self.info.get("finished_at", time.perf_counter()) - self._started,
            cached_tokens=self.info.get("cached_tokens", 0),
            completion_tokens=self.info.get("completion_tokens", len(ids)) if texts else None,
        )


# --- the plain engine: model.generate


class _Emitter(BaseStreamer):
    """Receives token ids from ``generate`` and passes them on, skipping the prompt it sends first."""

    def __init__(self, emit):
        self.emit = emit
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.emit(value.reshape(-1).tolist())

    def end(self):
        pass


class _StopFlag(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generation_kwargs(model, tokenizer, settings: GenerationSettings) -> dict:
    """Our settings as ``generate`` keywords; anything not given comes from the model's own config.

    Keywords rather than a whole GenerationConfig, as the classic recipe passes them:
    transformers then warns only about flags we set, not ones inherited from the model.
    """
    kwargs = {"max_new_tokens": settings.max_new_tokens}
    if settings.do_sample and settings.temperature > 0:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        if settings.top_k is not None:
            kwargs["top_k"] = settings.top_k
    else:
        kwargs["do_sample"] = False
    if settings.repetition_penalty is not None:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    if model.generation_config.pad_token_id is None:  # avoids generate's warning on every call
        kwargs["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return kwargs


def model_device(model):
    return getattr(model, "device", None) or next(model.parameters()).device


class GenerateEngine:
    """``model.generate`` as the classic recipe calls it; works on any device and model."""

    name = "transformers generate"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = end_token_ids(model, tokenizer)

    def start(self, messages, settings: GenerationSettings, continue_final: bool = False) -> ReplyStream:
        began = time.perf_counter()  # the reply's clock counts the chat template and the tokenizer too
        ids, opened = prepare(self.tokenizer, messages, continue_final, settings.thinking)
        inputs = torch.tensor([ids], device=model_device(self.model))
        kwargs = generation_kwargs(self.model, self.tokenizer, settings)

        def produce(emit, stop_event):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                self.model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    streamer=_Emitter(emit),
                    stopping_criteria=StoppingCriteriaList([_StopFlag(stop_event)]),
                    **kwargs,
                )

        return ReplyStream(self.tokenizer, len(ids), produce, max_new_tokens=settings.max_new_tokens, end_ids=self.end_ids,
                           opens_thinking=opened, started=began)

    def close(self):
        self.model = None


def generate_reply(engine, messages, settings: GenerationSettings) -> Reply:
    """The whole reply at once (no streaming)."""
    stream = engine.start(messages, settings)
    for _ in stream:
        pass
    return stream.result
