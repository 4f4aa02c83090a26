"""The table that ``%qwen_history`` shows: each message, its tokens, and whether the next question sends it."""

from .prompt import count_text_tokens


UNFINISHED = {"interrupted": " (interrupted)", "length": " (cut at max_new_tokens)"}


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _size(png) -> str:
    if png is None:
        return "?"
    try:
        from .images import size_of

        width, height = size_of(png)
        return f"{width}×{height}"
    except Exception:  # no PIL here: the label goes without the size
        return f"{len(png) // 1024} KiB"


def history_table(conversation, loaded, settings, options, max_turns):
    """Markdown and plain-text tables of the conversation.

    With a model loaded, token counts come from its tokenizer and the window is
    the exact one the next question would get (its own tokens aside); without
    one, only ``max_turns`` decides it.
    """
    exchanges = len(conversation.messages) // 2
    if loaded is not None:
        from .chat import window_for
        from .conversation import PromptTooLong

        try:
            sent = window_for(conversation, loaded, "", settings, options).exchanges_sent
        except PromptTooLong:
            sent = 0
    else:
        sent = exchanges if max_turns is None else min(max_turns, exchanges)
    first_sent = exchanges - sent

    rows = []
    system = conversation.system or (options.default_system if options else None)
    if system:
        rows.append(("", "system", system, True, None, ()))
    for index, message in enumerate(conversation.messages):
        turn = index // 2 + 1
        role = message["role"] + UNFINISHED.get(message.get("unfinished"), "")
        rows.append((str(turn), role, message["content"], turn > first_sent, message.get("reasoning_content"),
                     message.get("images", ())))
    prompt = getattr(getattr(loaded, "engine", None), "prompt", None) if getattr(loaded, "sees_images", False) else None

    def tokens(text, reasoning=None, images=()):
        if loaded is None:
            return "–"
        count = str(count_text_tokens(loaded.tokenizer, text))
        if images and prompt is not None:  # what the pictures take, as the processor counts them
            count += f" (+{sum(prompt.image_tokens(conversation.images[name]) for name in images)} image)"
        return f"{count} (+{count_text_tokens(loaded.tokenizer, reasoning)} thinking)" if reasoning else count

    def label(text, images):
        """A short label for the pictures, never their bytes."""
        if not images:
            return _preview(text)
        sizes = [_size(conversation.images.get(name)) for name in images]
        return _preview(f"[{len(images)} image{'s' if len(images) != 1 else ''}: {', '.join(sizes)}] {text}")

    if not rows:
        return "*The conversation is empty.*", "The conversation is empty."
    header = ["turn", "role", "tokens", "in window", "message"]
    table = [[turn, role, tokens(text, reasoning, images), "✓" if inside else "", label(text, images)]
             for turn, role, text, inside, reasoning, images in rows]
    summary = f"{exchanges} exchange{'s' if exchanges != 1 else ''}; the next question sends the last {sent}."
    escape = lambda cell: cell.replace("|", "\\|")
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(escape(c) for c in row) + " |" for row in table]
        + ["", summary]
    )
    widths = [max(len(row[i]) for row in table + [header]) for i in range(len(header))]
    plain = "\n".join(
        ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + table]
        + [summary]
    )
    return markdown, plain
