"""One turn of the chat: window, generate while showing, then record the exchange.

The conversation changes only after a reply is complete (or interrupted, which
keeps the partial reply): any error before that leaves it exactly as it was.
"""

from dataclasses import dataclass
from typing import Optional

from .conversation import Conversation
from .display import ReplyView, stats_line
from .interrupt import interrupt_calls
from .prompt import count_prompt_tokens
from .settings import GenerationSettings


@dataclass
class TurnOptions:
    max_turns: Optional[int]
    max_context_tokens: int
    default_system: Optional[str]
    show_stats: bool = True
    record: bool = True  # False: a question asked outside the conversation


def window_for(conversation: Conversation, loaded, question: str, settings: GenerationSettings, options: TurnOptions):
    return conversation.window(
        question,
        count_tokens=lambda messages: count_prompt_tokens(loaded.tokenizer, messages),
        max_turns=options.max_turns,
        max_new_tokens=settings.max_new_tokens,
        max_context_tokens=options.max_context_tokens,
        default_system=options.default_system,
    )


def ask(conversation: Conversation, loaded, question: str, settings: GenerationSettings, options: TurnOptions,
        view: ReplyView, cell_id: Optional[str] = None):
    window = window_for(conversation, loaded, question, settings, options)
    reply = _show(loaded.engine.start(window.messages, settings), view, window.notice())
    if reply.finish_reason == "interrupted" and not reply.new_tokens and not reply.text:
        view.finish("", "interrupted before the first token; the conversation is unchanged")
        return reply
    if options.record:
        conversation.add_exchange(question, reply.text, finish_reason=reply.finish_reason, cell_id=cell_id)
    view.finish(reply.text, _footer(reply, options))
    return reply


EMPTY = "the model returned an empty reply (try again, or sample with a higher temperature)"


def continue_last(conversation: Conversation, loaded, settings: GenerationSettings, options: TurnOptions, view: ReplyView):
    """Continue the last reply (cut at max_new_tokens or interrupted) in place, as one assistant message."""
    asked, answer = conversation.messages[-2], conversation.messages[-1]
    earlier = Conversation(system=conversation.system, messages=conversation.messages[:-2])
    partial_tokens = len(loaded.tokenizer(answer["content"], add_special_tokens=False)["input_ids"])
    room = settings.overridden(max_new_tokens=settings.max_new_tokens + partial_tokens)  # the partial reply is prompt now
    window = window_for(earlier, loaded, asked["content"], room, options)
    messages = window.messages + [{"role": "assistant", "content": answer["content"]}]
    view.text = answer["content"]
    reply = _show(loaded.engine.start(messages, settings, continue_final=True), view, window.notice())
    conversation.extend_last_reply(reply.text, reply.finish_reason)
    view.finish(answer["content"], _footer(reply, options))
    return reply


def _show(stream, view: ReplyView, notice):
    view.start(notice)
    try:
        with interrupt_calls(stream.request_stop):
            for piece in stream:
                view.append(piece)
    except KeyboardInterrupt:  # a second interrupt, or one the handler could not catch
        stream.stop()
    except BaseException:
        view.fail()
        raise
    return stream.result


def _footer(reply, options: TurnOptions) -> Optional[str]:
    footer = []
    if not reply.text.strip() and reply.finish_reason != "interrupted":
        footer.append(EMPTY)
    if reply.finish_reason == "interrupted":
        footer.append("interrupted")
    if options.show_stats:
        footer.append(stats_line(reply, options.max_context_tokens))
    return " · ".join(footer) or None
