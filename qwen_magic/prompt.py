"""Turn chat messages into the exact token ids the model sees (no torch needed).

This is the classic recipe's own step: ``apply_chat_template(..., tokenize=False,
add_generation_prompt=True)`` and then the tokenizer, so the token counts used
for the window are the ones the model is given.
"""

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages, continue_final: bool = False) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply begins.

    ``continue_final``: the last message is an unfinished assistant reply, left open to be continued.
    """
    if has_chat_template(tokenizer):
        if continue_final:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # A base model has no chat template: a plain transcript is the usual fallback.
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns if continue_final else turns + ["Assistant:"])


def prompt_ids(tokenizer, messages, continue_final: bool = False) -> list:
    # The rendered template already holds any special tokens the model wants.
    return tokenizer(render(tokenizer, messages, continue_final), add_special_tokens=False)["input_ids"]


def count_prompt_tokens(tokenizer, messages) -> int:
    return len(prompt_ids(tokenizer, messages))


def count_text_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
