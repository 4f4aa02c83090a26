"""Turn chat messages into the exact token ids the model sees (no torch needed).

This is the classic recipe's own step: ``apply_chat_template(..., tokenize=False,
add_generation_prompt=True)`` and then the tokenizer, so the token counts used
for the window are the ones the model is given. ``thinking`` (True, False, or None
for the template's default) goes to the template as ``enable_thinking``.
"""

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def supports_thinking(tokenizer) -> bool:
    """Whether the chat template has Qwen3's ``enable_thinking`` switch."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template or ""]
    return any("enable_thinking" in text for text in templates)


def _template_options(thinking):
    return {} if thinking is None else {"enable_thinking": thinking}


def render(tokenizer, messages, continue_final: bool = False, thinking=None, generation_prompt: bool = True) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply begins.

    ``continue_final``: the last message is an unfinished assistant reply, written as the
    model wrote it (thinking included), left open to be continued: the generation prompt
    for the messages before it, then that text. ``generation_prompt=False``: the history
    alone, without the assistant header (the prefix every later turn's prompt starts with).
    """
    if has_chat_template(tokenizer):
        if continue_final:
            return render(tokenizer, messages[:-1], thinking=thinking) + messages[-1]["content"]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **_template_options(thinking)
        )
    # A base model has no chat template: a plain transcript is the usual fallback.
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns if continue_final or not generation_prompt else turns + ["Assistant:"])


def encode(tokenizer, text: str) -> list:
    # The rendered template already holds any special tokens the model wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages, continue_final: bool = False, thinking=None) -> list:
    return encode(tokenizer, render(tokenizer, messages, continue_final, thinking))


def prepare(tokenizer, messages, continue_final: bool = False, thinking=None):
    """The prompt's token ids, and whether its generation prompt opened a think block."""
    from .thinking import opens_thinking

    text = render(tokenizer, messages, continue_final, thinking)
    head = text[: len(text) - len(messages[-1]["content"])] if continue_final and has_chat_template(tokenizer) else text
    return encode(tokenizer, text), opens_thinking(head)


def count_prompt_tokens(tokenizer, messages, thinking=None) -> int:
    return len(prompt_ids(tokenizer, messages, thinking=thinking))


def count_text_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
