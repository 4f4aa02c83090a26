"""Conversations on disk: atomic writes, the autosave file of all conversations, Markdown transcripts.

A single conversation is saved as a JSON list of {"role", "content"}; the autosave
file holds every conversation of the kernel by name. Both are JSON and only JSON:
reading one never executes anything.
"""

import json
import os
import tempfile
from typing import Dict

from .conversation import Conversation, HistoryError, parse_json

FORMAT = "qwen_magic.conversations"


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash mid-write leaves the old file intact."""
    path = os.path.expanduser(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".qwen-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def dumps_all(conversations: Dict[str, Conversation]) -> str:
    body = {name: conversation.to_json() for name, conversation in conversations.items()}
    return json.dumps({"format": FORMAT, "version": 1, "conversations": body}, ensure_ascii=False, indent=1)


def loads(text: str):
    """A saved conversation (a list) or an autosave file (all conversations by name); validated whole."""
    try:
        data = parse_json(text)
    except RecursionError:  # brackets nested thousands deep
        raise HistoryError("nested too deeply to be a conversation") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        chats = data.get("conversations")
        if not isinstance(chats, dict):
            raise HistoryError('"conversations" must map names to lists of messages')
        loaded = {}
        for name, messages in chats.items():
            try:
                loaded[name] = Conversation.from_json(messages)
            except HistoryError as error:
                raise HistoryError(f"conversation {name or '(default)'!r}: {error}") from None
        return loaded
    return Conversation.from_json(data)
