"""Vision-language models (Qwen2.5-VL, Qwen3-VL, multimodal Qwen3.5): prompts with pictures, and their engine.

The model is given what the classic recipe gives it: ``processor.apply_chat_template``
on messages whose pictures are image parts, then ``processor(text=..., images=...)``,
then ``model.generate``. Messages arrive as the chat keeps them, ``{"role", "content",
"images": [PNG bytes, ...]}``; each becomes ``[{"type": "image"}, ..., {"type": "text"}]``.

The window counts the tokens the processor makes: the rendered text's tokens, with each
image's one ``<|image_pad|>`` standing for as many tokens as its grid holds (the
processor's own ``image_grid_thw``, computed once per picture).

A window without pictures is a plain text prompt: it may go to the fast engine (its
cache and graph), which gives the same greedy tokens as for the text model.
"""

import hashlib
import threading
from contextlib import contextmanager
from typing import Dict, List

import torch
from transformers import StoppingCriteriaList

from .engine import ReplyStream, _Emitter, _StopFlag, end_token_ids, generation_kwargs, model_device
from .fast import ATTENTION
from .images import open_image
from .settings import GenerationSettings

# The fast engine feeds positions 0, 1, 2, ... to a model that places image tokens on a 3-D (time, height,
# width) grid and shifts every later token by rope_deltas: with pictures its replies would be wrong, so a
# window with pictures goes to generate. Without pictures the 3-D positions are the 1-D ones, and it is exact.
FAST_NOTE = " (turns with pictures: transformers generate, since the fast engine's cache and graph do not track their 3-D positions)"


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
                image_processor = self.processor.image_processor
                grid = image_processor(images=[open_image(png)], return_tensors="pt")["image_grid_thw"][0]
                self._tokens[name] = int(grid.prod()) // image_processor.merge_size ** 2
            return self._tokens[name]

    def count(self, messages, thinking=None) -> int:
        text = self.render(messages, thinking=thinking)
        tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return tokens + sum(self.image_tokens(png) - 1 for png in pictures_of(messages))

    def inputs(self, messages, continue_final: bool = False, thinking=None):
        """The model's inputs, exactly as the classic recipe makes them; and the prompt text."""
        text = self.render(messages, continue_final, thinking)
        images = [open_image(png) for png in pictures_of(messages)]
        return self.processor(text=[text], images=images or None, return_tensors="pt"), text


class VisionEngine:
    """``model.generate`` with the processor's inputs (pixel values, image grids), as the classic recipe calls it.

    ``text_engine`` (a fast.FastEngine): takes the windows that hold no picture.
    """

    def __init__(self, model, processor, text_engine=None):
        self.model = model
        self.prompt = VisionPrompt(processor)
        self.tokenizer = processor.tokenizer
        self.end_ids = end_token_ids(model, self.tokenizer)
        self.text_engine = text_engine
        self.name = text_engine.name if text_engine is not None else "transformers generate"

    def start(self, messages, settings: GenerationSettings, continue_final: bool = False) -> ReplyStream:
        from .thinking import opens_thinking

        if self.text_engine is not None and not pictures_of(messages):
            return self.text_engine.start(messages, settings, continue_final)

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
                           end_ids=self.end_ids, opens_thinking=opens_thinking(head))

    @contextmanager
    def _recipe_attention(self):
        """The fast engine gives the model its grouped decode attention; a turn with pictures runs on the
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
