"""Thinking replies (Qwen3, Qwen3.5, QwQ): the reasoning apart from the answer. No torch here.

The model writes ``<think>`` reasoning ``</think>`` and then the answer. Some templates
(Qwen3.5's) open the think block in the prompt, so the reply holds only the closing
tag; a server with a reasoning parser sends the reasoning apart, and ``remote.py``
turns it back into the same tagged text. ``split`` reads any of these forms.
"""

from dataclasses import dataclass
from typing import Optional

OPEN, CLOSE = "<think>", "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether the prompt ends inside an open think block (the reply starts with reasoning)."""
    header = prompt.rfind("<|im_start|>assistant")
    tail = prompt[header:] if header >= 0 else prompt
    start = tail.rfind(OPEN)
    return start >= 0 and CLOSE not in tail[start:]


@dataclass
class Split:
    reasoning: str  # "" when the reply has no thinking
    answer: str
    thinking: bool  # the reply has a think block
    done: bool  # the think block is closed (or there is none)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag still arriving)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def split(raw: str, opened: Optional[bool] = False, streaming: bool = False) -> Split:
    """Reasoning and answer of a reply's raw text.

    ``opened``: the prompt opened the think block (None: not known, as with a server's
    template; then a closing tag with no opening one ends the reasoning). ``streaming``:
    more text may follow, so a tag still arriving is held back rather than shown.
    """
    text = raw
    if not opened:
        lead = text.lstrip()
        if lead.startswith(OPEN):
            opened, text = True, lead[len(OPEN):]
        elif opened is None and CLOSE in text and OPEN not in text.split(CLOSE, 1)[0]:
            opened = True
        elif streaming and lead and OPEN.startswith(lead):
            return Split("", "", False, False)
        else:
            return Split("", text, False, True)
    if CLOSE in text:
        reasoning, answer = text.split(CLOSE, 1)
        return Split(reasoning.strip("\n"), answer.lstrip("\n"), True, True)
    if streaming:
        text = text[:len(text) - _partial_tag(text, CLOSE)]
    return Split(text.strip("\n"), "", True, False)


def raw_text(reasoning: str, answer: str, opened: bool, done: bool = True) -> str:
    """The reply as the model writes it (Qwen's own layout), for continuing it."""
    if not reasoning and done:
        return answer
    head = "" if opened else OPEN + "\n"
    if not done:
        return head + reasoning
    return f"{head}{reasoning}\n{CLOSE}\n\n{answer}"
