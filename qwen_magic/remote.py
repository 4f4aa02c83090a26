"""A model behind an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, LM Studio, ``transformers serve``).

The same conversation, window, settings, streaming, interrupt and stats as the
in-kernel model; only the engine differs. Uses the official ``openai`` client
(``pip install "qwen-magic[server]"``). The API key is read from an environment
variable and never shown or saved.
"""

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from .engine import ReplyStream
from .errors import QwenError
from .prompt import prompt_ids
from .settings import GenerationSettings

TIMEOUT = 60.0  # seconds without an answer (or a stream without a chunk) before giving up: QwenMagics.server_timeout
POLL = 0.1  # seconds between looks at the stop request while the server is silent


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


def _client(url: str, api_key_env: str, timeout: float = TIMEOUT):
    try:
        from openai import OpenAI
    except ImportError:
        raise ServerError('Talking to a server needs the openai client: run %pip install "qwen-magic[server]" (or openai).') from None
    return OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout, max_retries=1)


def _timed_out(error: BaseException) -> bool:
    """A read that waited too long, whichever HTTP library (httpx, httpx2) the openai client runs on."""
    import openai

    return isinstance(error, (openai.APITimeoutError, TimeoutError)) or any("Timeout" in k.__name__ for k in type(error).__mro__)


def stalled(url: str, timeout: float) -> ServerError:
    return ServerError(f"The server at {url} sent nothing for {timeout:g} s: is it stalled or overloaded? "
                       "The conversation is unchanged; %config QwenMagics.server_timeout = SECONDS waits longer.")


def closed_early(url: str) -> ServerError:
    return ServerError(f"The server at {url} closed the stream before the reply was finished (did it crash, or was "
                       "the connection cut?); the conversation is unchanged.")


def explain(error: Exception, url: str, model: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
            timeout: float = TIMEOUT) -> ServerError:
    """One line for what went wrong talking to the server, and what to check."""
    import openai

    status = getattr(error, "status_code", None)
    if _timed_out(error):
        return stalled(url, timeout)
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


def explain_midstream(error: Exception, url: str, timeout: float = TIMEOUT) -> ServerError:
    """One line for a stream that went wrong after the reply had begun."""
    import openai

    if _timed_out(error):
        return stalled(url, timeout)
    if isinstance(error, ValueError):  # json.JSONDecodeError: an event that is not JSON
        return ServerError(f"The server at {url} sent an event that is not JSON ({_first_line(error)}); see its log. "
                           "The conversation is unchanged.")
    if isinstance(error, openai.APIError) and not isinstance(error, (openai.APIStatusError, openai.APIConnectionError)):
        return ServerError(f"The server at {url} reported an error in the middle of the reply: {_first_line(error)}. "
                           "The conversation is unchanged.")
    return closed_early(url)  # the connection was cut, the server went away


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _shut(stream) -> None:
    """Shut the stream's socket, so a read blocked on a silent server returns now (and the server stops)."""
    try:
        network = stream.response.extensions["network_stream"]
        network.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    except Exception:  # an HTTP library without that extension: the reader ends at its timeout instead
        pass


def list_models(url: str, api_key_env: str, timeout: float = TIMEOUT) -> List[str]:
    client = _client(url, api_key_env, timeout)
    try:
        return [model.id for model in client.models.list()]
    except Exception as error:
        raise explain(error, url, api_key_env=api_key_env, timeout=timeout) from None


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
    sees_images: bool = False  # the model's config has a vision part: pictures go as image_url parts

    def summary(self) -> str:
        window = "token-exact window" if self.exact_window else "approximate window (no tokenizer at hand: counted at ~3 characters a token)"
        return (f"Connected to {self.url} · model {self.name} · context {self.context_length:,} tokens · {window} · "
                f"{self.seconds:.1f} s · " + ("sees images · " if self.sees_images else "") + f"engine: {self.engine.name}")


def openai_message(message: dict) -> dict:
    """A chat message as the OpenAI protocol has it: pictures as ``image_url`` parts with a data URL
    (what vLLM and SGLang take for Qwen2.5-VL and Qwen3-VL), then the text."""
    pictures = message.get("images")
    if not pictures:
        return {"role": message["role"], "content": message["content"]}
    from .images import data_url

    return {"role": message["role"], "content": [{"type": "image_url", "image_url": {"url": data_url(png)}} for png in pictures]
            + [{"type": "text", "text": message["content"]}]}


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

    def __init__(self, url: str, model: str, tokenizer, api_key_env: str = "OPENAI_API_KEY", timeout: float = TIMEOUT,
                 prompt=None):
        self.url, self.model, self.tokenizer, self.api_key_env = url, model, tokenizer, api_key_env
        self.prompt = prompt  # a vision.VisionPrompt where the model's processor is at hand: counts image tokens
        self.timeout = timeout  # QwenMagics.server_timeout, read at each request
        self.client = _client(url, api_key_env, timeout)
        self.noted_extras = False

    def request(self, messages, settings: GenerationSettings, continue_final: bool = False) -> dict:
        greedy = not settings.do_sample or settings.temperature == 0
        body = dict(model=self.model, messages=[openai_message(m) for m in messages], max_tokens=settings.max_new_tokens, stream=True,
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
        # The chat template's tokens (about three characters a token without a tokenizer); the server's usage
        # figure replaces it when one comes.
        if self.prompt is not None and not continue_final:
            prompt_tokens = self.prompt.count(messages, settings.thinking)
        else:
            prompt_tokens = len(prompt_ids(self.tokenizer, [{k: v for k, v in m.items() if k != "images"} for m in messages],
                                           continue_final, settings.thinking))
        client, url, timeout = self.client.with_options(timeout=self.timeout, max_retries=0), self.url, self.timeout

        def read(emit, stop_event, state):
            """In a thread of its own: a socket read may block for as long as the server is silent."""
            try:
                stream = state["stream"] = client.chat.completions.create(**body)
            except Exception as error:
                state["error"] = explain(error, url, self.model, self.api_key_env, timeout)
                return
            try:
                for chunk in stream:
                    if stop_event.is_set():
                        break  # the user interrupted: close the stream, keep what came
                    for key in ("prompt_tokens", "completion_tokens"):  # the server's own counts, where it gives them
                        if getattr(chunk.usage, key, None) is not None:
                            info[key] = getattr(chunk.usage, key)
                    for choice in chunk.choices or []:
                        if choice.delta:
                            for piece in tags.pieces(choice.delta):
                                emit(piece)
                        if choice.finish_reason:
                            info["finish_reason"] = choice.finish_reason
                if not stop_event.is_set() and "finish_reason" not in info:
                    state["error"] = closed_early(url)  # the stream ended, but the reply had not
            except Exception as error:
                state["error"] = explain_midstream(error, url, timeout)
            finally:
                stream.close()

        tags = ReasoningTags()

        def produce(emit, stop_event):
            state = {}
            reader = threading.Thread(target=read, args=(emit, stop_event, state), daemon=True)
            reader.start()
            while reader.is_alive():
                reader.join(POLL)
                if stop_event.is_set() and reader.is_alive():
                    # The stop button while the server is silent: end now with what came. Shutting the
                    # socket wakes the reader (and tells the server to stop); failing that, its timeout ends it.
                    if "stream" in state:
                        _shut(state["stream"])
                    return
            if "error" in state and not stop_event.is_set():
                raise state["error"]

        # Whether the server's template opened a think block is not known here: None lets the
        # reply's own tags decide (a closing tag alone ends the reasoning).
        return ReplyStream(None, prompt_tokens, produce, max_new_tokens=settings.max_new_tokens, end_ids=set(), info=info,
                           opens_thinking=None)

    def close(self):
        self.client = None


def connect(url: str, model: str, api_key_env: str = "OPENAI_API_KEY", context_length: Optional[int] = None,
            timeout: float = TIMEOUT) -> RemoteModel:
    """Check the server has ``model``, and find its tokenizer (tokenizer files only) for a token-exact window."""
    started = time.perf_counter()
    available = list_models(url, api_key_env, timeout)  # also checks that the server answers
    if model not in available:  # some servers (transformers serve, Ollama) load models on demand
        print(f"Note: the server does not list {model!r} (it lists {', '.join(available) or 'nothing'}); it may load it on demand.")
    tokenizer, exact, length = ApproximateTokenizer(), False, context_length or 32768
    vision, prompt = False, None
    try:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer, exact = AutoTokenizer.from_pretrained(model), True
        config = AutoConfig.from_pretrained(model)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        length = context_length or getattr(text_config, "max_position_embeddings", length)
        vision = getattr(config, "vision_config", None) is not None
        prompt = _vision_prompt(model) if vision else None
    except Exception:  # no tokenizer locally or on the Hub: count approximately
        pass
    engine = RemoteEngine(url, model, tokenizer, api_key_env, timeout, prompt)
    return RemoteModel(engine=engine, tokenizer=tokenizer, name=model, url=url, context_length=int(length),
                       exact_window=exact, seconds=time.perf_counter() - started, sees_images=vision)


def _vision_prompt(model: str):
    """The model's processor, to count image tokens exactly; None where it cannot be loaded here."""
    try:
        from transformers import AutoProcessor

        from .vision import VisionPrompt

        return VisionPrompt(AutoProcessor.from_pretrained(model))
    except Exception:
        return None
