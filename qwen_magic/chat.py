"""One turn of the chat: window, generate while showing, then record the exchange.

The conversation changes only after a reply is complete (or interrupted, which
keeps the partial reply): any error before that leaves it exactly as it was.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from .conversation import Conversation
from .display import ReplyView, stats_line
from .interrupt import interrupt_calls
from .prompt import count_prompt_tokens, count_text_tokens, render
from .settings import GenerationSettings
from .thinking import opens_thinking, raw_text, split


@dataclass
class TurnOptions:
    max_turns: Optional[int]
    max_context_tokens: int
    default_system: Optional[str]
    show_stats: bool = True
    record: bool = True  # False: a question asked outside the conversation


def sees_images(loaded) -> bool:
    return bool(getattr(loaded, "sees_images", False))


def for_model(messages: List[dict], loaded, store: Dict[str, bytes]) -> List[dict]:
    """The window's messages as the engine takes them: pictures by their bytes for a model that sees
    images; without them for one that does not (their text still says what was attached)."""
    if sees_images(loaded):
        return [dict(m, images=[store[name] for name in m["images"]]) if m.get("images") else m for m in messages]
    return [{k: v for k, v in m.items() if k != "images"} for m in messages]


def counter(loaded, store: Dict[str, bytes], thinking):
    """``count_tokens(messages)`` for the window: the model's own count, image tokens included."""
    prompt = getattr(loaded.engine, "prompt", None) if sees_images(loaded) else None
    if prompt is not None:
        return lambda messages: prompt.count(for_model(messages, loaded, store), thinking)
    return lambda messages: count_prompt_tokens(loaded.tokenizer, for_model(messages, loaded, store), thinking)


def window_for(conversation: Conversation, loaded, question: str, settings: GenerationSettings, options: TurnOptions,
               images: Optional[List[str]] = None):
    return conversation.window(
        question,
        images=images,
        count_tokens=counter(loaded, conversation.images, settings.thinking),
        max_turns=options.max_turns,
        max_new_tokens=settings.max_new_tokens,
        max_context_tokens=options.max_context_tokens,
        default_system=options.default_system,
    )


def ask(conversation: Conversation, loaded, question: str, settings: GenerationSettings, options: TurnOptions,
        view: ReplyView, cell_id: Optional[str] = None, images: Optional[Dict[str, bytes]] = None):
    """One turn; returns the Reply with ``text`` the answer alone (a thinking model's reasoning in ``reasoning``).

    ``images``: the pictures the question attaches (PNG bytes by hash), kept in the conversation with it.
    """
    conversation.add_images(images or {})
    names = list(images or {})
    window = window_for(conversation, loaded, question, settings, options, names)
    stream = loaded.engine.start(for_model(window.messages, loaded, conversation.images), settings)
    reply = _show(stream, view, window.notice())
    if reply.finish_reason == "interrupted" and not reply.new_tokens and not reply.text:
        view.finish("", "interrupted before the first token; the conversation is unchanged")
        return reply
    parts = split(reply.text, stream.opens_thinking)
    if options.record:
        conversation.add_exchange(question, parts.answer, finish_reason=reply.finish_reason, cell_id=cell_id,
                                  reasoning=parts.reasoning if parts.thinking else None, raw=reply.text,
                                  thinking_open=not parts.done, images=names)
    view.finish(reply.text, _footer(reply, options, parts, view.thinking_tokens))
    return replace(reply, text=parts.answer, reasoning=parts.reasoning if parts.thinking else None)


EMPTY = "the model returned an empty reply (try again, or sample with a higher temperature)"


def continue_last(conversation: Conversation, loaded, settings: GenerationSettings, options: TurnOptions, view: ReplyView):
    """Continue the last reply (cut at max_new_tokens or interrupted) in place, as one assistant message.

    The model is given its reply as it wrote it, thinking included (a reply cut inside its
    thinking goes on thinking), after the same generation prompt.
    """
    asked, answer = conversation.messages[-2], conversation.messages[-1]
    earlier = Conversation(system=conversation.system, messages=conversation.messages[:-2], images=conversation.images)
    written = answer.get("raw")
    room = settings
    if written is None:  # a reply loaded from a file: Qwen's own layout of reasoning and answer
        window = window_for(earlier, loaded, asked["content"], settings, options, asked.get("images"))
        # Whether the generation prompt opens a think block: the text of the messages tells (pictures aside).
        opened = opens_thinking(render(loaded.tokenizer, for_model(window.messages, None, {}), thinking=settings.thinking))
        written = raw_text(answer.get("reasoning_content") or "", answer["content"], opened, not answer.get("thinking_open"))
    partial_tokens = count_text_tokens(loaded.tokenizer, written)
    room = settings.overridden(max_new_tokens=settings.max_new_tokens + partial_tokens)  # the partial reply is prompt now
    window = window_for(earlier, loaded, asked["content"], room, options, asked.get("images"))
    messages = for_model(window.messages, loaded, conversation.images) + [{"role": "assistant", "content": written}]
    stream = loaded.engine.start(messages, settings, continue_final=True)
    view.text = written
    reply = _show(stream, view, window.notice())
    whole = written + reply.text
    parts = split(whole, stream.opens_thinking)
    conversation.set_last_reply(parts.answer, reply.finish_reason, parts.reasoning if parts.thinking else None, whole, not parts.done)
    view.finish(whole, _footer(reply, options, parts, view.thinking_tokens))
    return replace(reply, text=parts.answer, reasoning=parts.reasoning if parts.thinking else None)


def _show(stream, view: ReplyView, notice):
    view.opened = stream.opens_thinking
    view.start(notice)
    try:
        with interrupt_calls(stream.request_stop):
            for piece in stream:
                view.append(piece, len(stream.decoder.ids))
    except KeyboardInterrupt:  # a second interrupt, or one the handler could not catch
        stream.stop()
    except BaseException:
        view.fail()
        raise
    return stream.result


def _footer(reply, options: TurnOptions, parts, thinking_tokens: Optional[int]) -> Optional[str]:
    footer = []
    if parts.thinking and not parts.done:
        if reply.finish_reason == "length":
            footer.append("stopped at max_new_tokens while thinking: %qwen_continue goes on (or raise --max-new-tokens)")
        elif reply.finish_reason == "interrupted":
            footer.append("interrupted while thinking")
    elif not parts.answer.strip() and reply.finish_reason != "interrupted":
        footer.append(EMPTY)
    if reply.finish_reason == "interrupted" and parts.done:
        footer.append("interrupted")
    if options.show_stats:
        if parts.thinking and thinking_tokens is None and not parts.done:
            thinking_tokens = reply.new_tokens
        footer.append(stats_line(reply, options.max_context_tokens, thinking_tokens if parts.thinking else None))
    return " · ".join(footer) or None
