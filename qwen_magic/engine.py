"""Generation: messages and settings in, a stream of text out. No IPython here.

``start_reply`` runs ``model.generate`` in a worker thread and hands back a
``ReplyStream``: iterate it for text pieces as tokens arrive, call ``stop()`` to
end it early (the kernel's interrupt does that through the caller), then read
``result`` for the whole reply, its token ids, counts and finish reason.
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .prompt import prompt_ids
from .settings import GenerationSettings

ENGINE_NAME = "transformers generate"


@dataclass
class Reply:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # "stop", "length" or "interrupted"
    first_token_seconds: Optional[float]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

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


class _TokenQueue(BaseStreamer):
    """Receives token ids from ``generate`` (in the worker thread) and queues them."""

    def __init__(self):
        self.queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        pass


class _StopFlag(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


_DONE = object()


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


def end_token_ids(model, tokenizer) -> set:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class ReplyStream:
    def __init__(self, model, tokenizer, messages, settings: GenerationSettings):
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_event = threading.Event()
        self.tokens = _TokenQueue()
        self.error: Optional[BaseException] = None
        self.result: Optional[Reply] = None
        self._end_ids = end_token_ids(model, tokenizer)
        self._max_new_tokens = settings.max_new_tokens
        self._interrupted = False
        ids = prompt_ids(tokenizer, messages)
        self.prompt_tokens = len(ids)
        device = getattr(model, "device", None) or next(model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        kwargs = dict(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            **generation_kwargs(model, tokenizer, settings),
            streamer=self.tokens,
            stopping_criteria=StoppingCriteriaList([_StopFlag(self.stop_event)]),
        )
        self._started = time.perf_counter()
        self._first_token_at: Optional[float] = None
        self._thread = threading.Thread(target=self._run, args=(model, kwargs, settings.seed), daemon=True)
        self._thread.start()

    def _run(self, model, kwargs, seed):
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as error:  # handed to the caller's thread, never lost
            self.error = error
        finally:
            self.tokens.queue.put(_DONE)

    def __iter__(self):
        while True:
            try:
                item = self.tokens.queue.get(timeout=0.05)
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
            item = self.tokens.queue.get()
            if item is _DONE:
                break
            self.decoder.push(item)
        self._finish()

    def _finish(self) -> None:
        if self.result is not None:
            return
        self._thread.join()
        if self.error is not None and not self._interrupted:
            raise self.error
        ids = list(self.decoder.ids)
        if self._interrupted:
            reason = "interrupted"
        elif ids and ids[-1] in self._end_ids:
            reason = "stop"
        elif len(ids) >= self._max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        started = self._started
        self.result = Reply(
            text=self.decoder.text(),
            token_ids=ids,
            prompt_tokens=self.prompt_tokens,
            finish_reason=reason,
            first_token_seconds=None if self._first_token_at is None else self._first_token_at - started,
            seconds=time.perf_counter() - started,
        )


def start_reply(model, tokenizer, messages, settings: GenerationSettings) -> ReplyStream:
    return ReplyStream(model, tokenizer, messages, settings)


def generate_reply(model, tokenizer, messages, settings: GenerationSettings) -> Reply:
    """The whole reply at once (no streaming)."""
    stream = start_reply(model, tokenizer, messages, settings)
    for _ in stream:
        pass
    return stream.result
