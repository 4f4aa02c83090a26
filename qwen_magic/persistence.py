"""Conversations on disk: atomic writes, the autosave file of all conversations, Markdown transcripts.

A single conversation is saved as a JSON list of {"role", "content"}; the autosave
file holds every conversation of the kernel by name. Both are JSON and only JSON:
reading one never executes anything.
"""

import json
import os
import tempfile
from typing import Dict

from .conversation import Conversation, HistoryError, check_images, parse_json
from .images import to_base64

FORMAT = "qwen_magic.conversations"


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash mid-write leaves the old file intact."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str, data: bytes) -> None:
    path = os.path.expanduser(path)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".qwen-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def dumps_all(conversations: Dict[str, Conversation]) -> str:
    """Every conversation by name; the pictures they refer to once, in ``images`` (by hash), where there are any."""
    body = {name: conversation.to_json() for name, conversation in conversations.items()}
    data = {"format": FORMAT, "version": 1, "conversations": body}
    images = {name: png for conversation in conversations.values() for name, png in conversation.used_images().items()}
    if images:
        data["images"] = {name: to_base64(png) for name, png in images.items()}
    return json.dumps(data, ensure_ascii=False, indent=1)


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
        images = check_images(data.get("images", {}))
        loaded = {}
        for name, messages in chats.items():
            try:
                loaded[name] = Conversation.from_json(messages, images)
            except HistoryError as error:
                raise HistoryError(f"conversation {name or '(default)'!r}: {error}") from None
        return loaded
    return Conversation.from_file(data)
