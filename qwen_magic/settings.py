"""Sampling settings for one reply, and the checks shared by ``%config`` and cell flags."""

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class GenerationSettings:
    """What the engine needs to produce one reply. ``None`` means the model's own default."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    thinking: Optional[bool] = None  # enable_thinking for the chat template; None: the template's default

    def overridden(self, **changes) -> "GenerationSettings":
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


TUTORIAL = dict(temperature=0.7, top_p=0.9)  # the classic tutorial's, for models that say nothing
# Qwen3's and Qwen3.5's model cards for enable_thinking=False (their generation_config holds the thinking values).
NON_THINKING = dict(temperature=0.7, top_p=0.8, top_k=20)


def model_sampling(generation_config, model_type: str = "", thinking: Optional[bool] = None, switchable: bool = False) -> dict:
    """The sampling a model asks for: its generation_config when that samples; the model card's
    non-thinking values when a Qwen3-generation model's thinking is switched off; the tutorial's
    temperature 0.7 and top-p 0.9 where the model says nothing. top_k and repetition_penalty
    left out here are read from the generation_config by the engines."""
    sampling = dict(TUTORIAL, source="the tutorial's")
    if generation_config is not None and getattr(generation_config, "do_sample", False):
        sampling = dict(temperature=generation_config.temperature, top_p=generation_config.top_p, source="the model's generation_config")
    if thinking is False and switchable and (model_type or "").startswith("qwen3"):
        sampling = dict(NON_THINKING, source="the model card's for thinking off")
    return sampling


# Each check returns an error message, or None when the value is fine.

def check_temperature(value):
    if value is not None and value < 0:
        return f"temperature must be 0 or more (0 means greedy), not {value}"


def check_top_p(value):
    if value is not None and not 0 < value <= 1:
        return f"top_p must be in (0, 1], not {value}"


def check_top_k(value):
    if value is not None and value < 0:
        return f"top_k must be 0 (off) or more, not {value}"


def check_max_new_tokens(value):
    if value is not None and value < 1:
        return f"max_new_tokens must be at least 1, not {value}"


def check_repetition_penalty(value):
    if value is not None and value <= 0:
        return f"repetition_penalty must be above 0 (1.0 means off), not {value}"


def check_max_turns(value):
    if value is not None and value < 0:
        return f"max_turns must be 0 or more (or None for no limit), not {value}"


def check_max_context_tokens(value):
    if value is not None and value < 1:
        return f"max_context_tokens must be at least 1 (or None for the model's context length), not {value}"


def check_context_budget(value):
    if value is not None and value < 16:
        return f"context_budget must be at least 16 tokens (or None for an eighth of the context), not {value}"


def check_bits(value):
    if value not in (4, 8, 16):
        return f"bits must be 4, 8 or 16, not {value}"


CHECKS = {
    "temperature": check_temperature,
    "top_p": check_top_p,
    "top_k": check_top_k,
    "max_new_tokens": check_max_new_tokens,
    "repetition_penalty": check_repetition_penalty,
    "max_turns": check_max_turns,
    "max_context_tokens": check_max_context_tokens,
    "bits": check_bits,
    "context_budget": check_context_budget,
}


def first_problem(**values) -> Optional[str]:
    """The message of the first value that fails its check, if any."""
    for name, value in values.items():
        message = CHECKS[name](value)
        if message:
            return message
    return None
