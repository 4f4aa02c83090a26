"""A model behind an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, LM Studio, ``transformers serve``).

The same conversation, window, settings, streaming, interrupt and stats as the
in-kernel model; only the engine differs. Uses the official ``openai`` client
(``pip install "qwen-magic[server]"``). The API key is read from an environment
variable and never shown or saved.
"""

import os
import time
from dataclasses import dataclass
from typing import List, Optional

from .engine import ReplyStream
from .errors import QwenError
from .settings import GenerationSettings

TIMEOUT = 60.0  # seconds without an answer (or a stream without a chunk) before giving up


class ServerError(QwenError):
    pass


class ApproximateTokenizer:
    """Counts about one token per three characters, for a model whose tokenizer is not at hand.

    Its "ids" are the text pieces themselves, so trimming by tokens still cuts text.
    """

    chat_template = None
    eos_token_id = None
    pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [text[i:i + 3] for i in range(0, len(text), 3)]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ids)


def _client(url: str, api_key_env: str):
    try:
        from openai import OpenAI
    except ImportError:
        raise ServerError('Talking to a server needs the openai client: run %pip install "qwen-magic[server]" (or openai).') from None
    return OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "none", timeout=TIMEOUT, max_retries=1)


def explain(error: Exception, url: str, model: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY") -> ServerError:
    """One line for what went wrong talking to the server, and what to check."""
    import openai

    status = getattr(error, "status_code", None)
    if isinstance(error, openai.APITimeoutError):
        return ServerError(f"The server at {url} did not answer within {TIMEOUT:.0f} s: is it overloaded or stalled?")
    if isinstance(error, openai.APIConnectionError):
        return ServerError(f"Cannot reach a server at {url}: is it running, and is the URL right (it usually ends in /v1)?")
    if status in (401, 403):
        return ServerError(f"The server refused the API key ({status}): put the right key in the environment variable {api_key_env} (or name another with --api-key-env).")
    if status == 404 or (status == 400 and model and "model" in str(error).lower()) or status == 400:
        hint = f"%qwen_load --server {url} lists the models it has." if model else "check the URL (it usually ends in /v1)."
        return ServerError(f"The server at {url} has no model {model!r} or no such endpoint ({status}): {hint}")
    if status is not None and status >= 500:
        return ServerError(f"The server at {url} failed ({status}); see its log. The conversation is unchanged.")
    return ServerError(f"The server at {url} answered with an error: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


def list_models(url: str, api_key_env: str) -> List[str]:
    client = _client(url, api_key_env)
    try:
        return [model.id for model in client.models.list()]
    except Exception as error:
        raise explain(error, url, api_key_env=api_key_env) from None


@dataclass
class RemoteModel:
    """What the magics hold for a model behind a server: the same surface as loader.LoadedModel."""

    engine: "RemoteEngine"
    tokenizer: object
    name: str
    url: str
    context_length: int
    exact_window: bool
    seconds: float
    model: object = None
    chat_template: bool = True

    def summary(self) -> str:
        window = "token-exact window" if self.exact_window else "approximate window (no tokenizer at hand: counted at ~3 characters a token)"
        return (f"Connected to {self.url} · model {self.name} · context {self.context_length:,} tokens · {window} · "
                f"{self.seconds:.1f} s · engine: {self.engine.name}")


class ReasoningTags:
    """A server with a reasoning parser sends the thinking apart (``delta.reasoning_content``, or
    ``delta.reasoning`` in newer vLLM); put it back in ``<think>`` tags, so one reader serves all."""

    def __init__(self):
        self.thinking = False

    def pieces(self, delta):
        extra = getattr(delta, "model_extra", None) or {}
        reasoning = getattr(delta, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")
        if reasoning:
            yield reasoning if self.thinking else "<think>" + reasoning
            self.thinking = True
        if delta.content:
            yield ("</think>" + delta.content) if self.thinking else delta.content
            self.thinking = False


class RemoteEngine:
    name = "OpenAI-compatible server"

    def __init__(self, url: str, model: str, tokenizer, api_key_env: str = "OPENAI_API_KEY"):
        self.url, self.model, self.tokenizer, self.api_key_env = url, model, tokenizer, api_key_env
        self.client = _client(url, api_key_env)
        self.noted_extras = False

    def request(self, messages, settings: GenerationSettings, continue_final: bool = False) -> dict:
        greedy = not settings.do_sample or settings.temperature == 0
        body = dict(model=self.model, messages=messages, max_tokens=settings.max_new_tokens, stream=True,
                    stream_options={"include_usage": True}, temperature=0.0 if greedy else settings.temperature)
        if not greedy:
            body["top_p"] = settings.top_p
        if settings.seed is not None:
            body["seed"] = settings.seed
        extra = {}
        if settings.top_k is not None:
            extra["top_k"] = settings.top_k
        if settings.repetition_penalty is not None:
            extra["repetition_penalty"] = settings.repetition_penalty
        if continue_final:
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if settings.thinking is not None:  # what vLLM and SGLang pass to the chat template
            extra["chat_template_kwargs"] = {"enable_thinking": settings.thinking}
        if extra:
            body["extra_body"] = extra
            if not self.noted_extras and set(extra) & {"top_k", "repetition_penalty"}:
                self.noted_extras = True
                print("Note: top_k and repetition_penalty are not in the OpenAI protocol; they are sent as extra fields, "
                      "which vLLM and SGLang read and other servers may ignore.")
        return body

    def start(self, messages, settings: GenerationSettings, continue_final: bool = False) -> ReplyStream:
        body = self.request(messages, settings, continue_final)
        info = {}
        prompt_tokens = len(self.tokenizer(str(messages))["input_ids"])  # replaced by the server's count when given

        tags = ReasoningTags()

        def produce(emit, stop_event):
            try:
                stream = self.client.chat.completions.create(**body)
                try:
                    for chunk in stream:
                        if chunk.usage is not None:
                            info["prompt_tokens"] = chunk.usage.prompt_tokens
                            info["completion_tokens"] = chunk.usage.completion_tokens
                        for choice in chunk.choices or []:
                            if choice.delta:
                                for piece in tags.pieces(choice.delta):
                                    emit(piece)
                            if choice.finish_reason:
                                info["finish_reason"] = choice.finish_reason
                        if stop_event.is_set():
                            break  # the user interrupted: close the stream, keep what came
                finally:
                    stream.close()
            except Exception as error:
                if stop_event.is_set():
                    return
                raise explain(error, self.url, self.model, self.api_key_env) from None

        # Whether the server's template opened a think block is not known here: None lets the
        # reply's own tags decide (a closing tag alone ends the reasoning).
        return ReplyStream(None, prompt_tokens, produce, max_new_tokens=settings.max_new_tokens, end_ids=set(), info=info,
                           opens_thinking=None)

    def close(self):
        self.client = None


def connect(url: str, model: str, api_key_env: str = "OPENAI_API_KEY", context_length: Optional[int] = None) -> RemoteModel:
    """Check the server has ``model``, and find its tokenizer (tokenizer files only) for a token-exact window."""
    started = time.perf_counter()
    available = list_models(url, api_key_env)  # also checks that the server answers
    if model not in available:  # some servers (transformers serve, Ollama) load models on demand
        print(f"Note: the server does not list {model!r} (it lists {', '.join(available) or 'nothing'}); it may load it on demand.")
    tokenizer, exact, length = ApproximateTokenizer(), False, context_length or 32768
    try:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer, exact = AutoTokenizer.from_pretrained(model), True
        length = context_length or getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", length)
    except Exception:  # no tokenizer locally or on the Hub: count approximately
        pass
    engine = RemoteEngine(url, model, tokenizer, api_key_env)
    return RemoteModel(engine=engine, tokenizer=tokenizer, name=model, url=url, context_length=int(length),
                       exact_window=exact, seconds=time.perf_counter() - started)
