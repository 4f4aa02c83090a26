"""Show a reply under the cell: Markdown updated in place, or plain text in a terminal.

A thinking model's reasoning goes into a collapsed ``<details>`` block (JupyterLab,
Colab and VS Code render it from Markdown) above the answer.
"""

import html
import sys
import time
from typing import Optional

from .thinking import split

from IPython.core.displaypub import DisplayPublisher
from IPython.display import display

UPDATE_INTERVAL = 0.1  # seconds: at most about 10 updates a second


class MarkdownText:
    """Renders as Markdown in notebooks and as plain text anywhere else."""

    def __init__(self, markdown: str, plain: Optional[str] = None):
        self.markdown = markdown
        self.plain = markdown if plain is None else plain

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/markdown": self.markdown, "text/plain": self.plain}

    def __repr__(self):
        return self.plain


def can_update_in_place(shell) -> bool:
    """A plain terminal's publisher prints once and cannot update; kernels and captures can."""
    publisher = getattr(shell, "display_pub", None)
    return publisher is not None and type(publisher) is not DisplayPublisher


def stats_line(reply, max_context_tokens: int, thinking_tokens: Optional[int] = None) -> str:
    tokens = f"{reply.new_tokens} tokens"
    if thinking_tokens is not None:
        tokens += f" ({thinking_tokens} thinking, {max(reply.new_tokens - thinking_tokens, 0)} answer)"
    parts = [tokens]
    if reply.tokens_per_second:
        parts.append(f"{reply.tokens_per_second:.1f} tokens/s")
    if reply.first_token_seconds is not None:
        parts.append(f"first token {reply.first_token_seconds:.2f} s")
    context = f"context {reply.prompt_tokens:,} / {max_context_tokens:,}"
    if reply.cached_tokens:
        context += f" ({reply.cached_tokens:,} cached)"
    parts.append(context)
    line = " · ".join(parts)
    if reply.finish_reason == "length":
        line += " · stopped at max_new_tokens"
    return line


class ReplyView:
    """One output area for one reply: ``start``, then ``append`` pieces, then ``finish``."""

    def __init__(self, shell, *, live: bool = True):
        self.rich = can_update_in_place(shell)
        self.live = live
        self.text = ""  # the reply as written so far, think block included
        self.opened: Optional[bool] = False  # the prompt opened a think block (None: not known)
        self.tokens = 0  # tokens so far, as counted by the stream
        self.thinking_tokens: Optional[int] = None  # tokens the thinking took, once it ended
        self.notice: Optional[str] = None
        self._handle = None
        self._last_update = float("-inf")  # the first piece shows at once

    def start(self, notice: Optional[str] = None) -> None:
        """Open the output area; any text already in the view (a reply being continued) shows first."""
        self.notice = notice
        if self.rich:
            if self.live:
                self._handle = display(self._render(self.text + " ▌" if self.text else "…"), display_id=True)
            return
        if notice:
            print(f"({notice})")
        if self.live and self.text:
            sys.stdout.write(self.text)
            sys.stdout.flush()

    def append(self, piece: str, tokens: Optional[int] = None) -> None:
        self.text += piece
        if tokens is not None:
            self.tokens = tokens
        if self.thinking_tokens is None and tokens is not None:
            parts = split(self.text, self.opened, streaming=True)
            if parts.thinking and parts.done:
                self.thinking_tokens = tokens
        if not self.live:
            return
        if not self.rich:
            sys.stdout.write(piece)
            sys.stdout.flush()
            return
        now = time.monotonic()
        if now - self._last_update >= UPDATE_INTERVAL:
            self._last_update = now
            self._handle.update(self._render(self.text + " ▌"))

    def finish(self, text: str, footer: Optional[str] = None) -> None:
        """Show the final reply (the authoritative text, not the sum of pieces) and a quiet footer."""
        footer_md = f"\n\n<sub>{footer}</sub>" if footer else ""
        if self.rich:
            final = self._render(text, footer_md, f"\n\n({footer})" if footer else "", streaming=False)
            if self._handle is not None:
                self._handle.update(final)
            else:
                display(final)
        else:
            if not self.live or not text.startswith(self.text):
                sys.stdout.write(("\n" if self.live and self.text else "") + text)
            else:
                sys.stdout.write(text[len(self.text):])
            sys.stdout.write("\n")
            if footer:
                sys.stdout.write(f"({footer})\n")
            sys.stdout.flush()
        self.text = text

    def fail(self) -> None:
        """Mark a reply cut short by an error (the error itself is shown by IPython)."""
        note = "generation failed; the conversation is unchanged"
        if self.rich:
            shown = self._render(self.text, f"\n\n<sub>{note}</sub>", f"\n\n({note})")
            if self._handle is not None:
                self._handle.update(shown)
            elif self.text:  # not streamed (QwenMagics.stream = False): what came is shown now
                display(shown)
        elif self.live:
            sys.stdout.write(f"\n({note})\n")
        elif self.text:
            sys.stdout.write(f"{self.text}\n({note})\n")

    def _render(self, body: str, footer_md: str = "", footer_plain: str = "", streaming: bool = True) -> MarkdownText:
        head_md = f"<sub>{self.notice}</sub>\n\n" if self.notice else ""
        head_plain = f"({self.notice})\n" if self.notice else ""
        cursor = body.endswith(" ▌")
        parts = split(body[:-2] if cursor else body, self.opened, streaming=streaming)
        if not parts.thinking:
            return MarkdownText(head_md + body + footer_md, head_plain + body + footer_plain)
        answer = parts.answer + (" ▌" if cursor and parts.done else "")
        thinking = parts.reasoning + (" ▌" if cursor and not parts.done else "")
        return MarkdownText(
            head_md + self._details(thinking, parts.done) + answer + footer_md,
            head_plain + f"[thinking]\n{thinking}\n[/thinking]\n\n" + answer + footer_plain,
        )

    def _details(self, reasoning: str, done: bool) -> str:
        count = self.thinking_tokens if done and self.thinking_tokens is not None else self.tokens
        label = ("Thought" if done else "Thinking") + (f" · {count} tokens" if count else "")
        # Open while it streams, so the thoughts can be watched; collapsed once the answer begins.
        state = "" if done else " open"
        return f"<details{state}><summary>{label}</summary>\n\n{html.escape(reasoning, quote=False)}\n\n</details>\n\n"
