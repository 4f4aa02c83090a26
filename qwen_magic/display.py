"""Show a reply under the cell: Markdown updated in place, or plain text in a terminal."""

import sys
import time
from typing import Optional

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


def stats_line(reply, max_context_tokens: int) -> str:
    parts = [f"{reply.new_tokens} tokens"]
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
        self.text = ""
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

    def append(self, piece: str) -> None:
        self.text += piece
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
            final = self._render(text, footer_md, f"\n\n({footer})" if footer else "")
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
        if self.rich and self._handle is not None:
            self._handle.update(self._render(self.text, f"\n\n<sub>{note}</sub>", f"\n\n({note})"))
        elif not self.rich and self.live:
            sys.stdout.write(f"\n({note})\n")

    def _render(self, body: str, footer_md: str = "", footer_plain: str = "") -> MarkdownText:
        head_md = f"<sub>{self.notice}</sub>\n\n" if self.notice else ""
        head_plain = f"({self.notice})\n" if self.notice else ""
        return MarkdownText(head_md + body + footer_md, head_plain + body + footer_plain)
