"""The conversation: its messages, the window sent each turn, and its JSON form.

Nothing here knows about IPython or torch. Token counts come from a callable
(``count_tokens(messages) -> int``) so the window is exact for whatever
tokenizer and chat template the loaded model uses.

A user message may attach pictures: ``"images": [sha256, ...]`` beside its text; the
conversation keeps each picture's PNG once, in ``images`` (by that hash). Saved, a
conversation with pictures is ``{"format", "messages", "images": {hash: base64}}``; one
without stays the plain list of messages it always was.
"""

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .images import digest, from_base64, to_base64

ROLES = ("system", "user", "assistant")


class HistoryError(ValueError):
    """A history file or JSON value that is not a valid conversation."""


class PromptTooLong(ValueError):
    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context_tokens: int):
        self.prompt_tokens = prompt_tokens
        super().__init__(
            f"The message needs {prompt_tokens} prompt tokens, and with max_new_tokens={max_new_tokens} "
            f"that exceeds max_context_tokens={max_context_tokens}. Shorten the message or lower --max-new-tokens."
        )


def parse_json(text: str):
    """JSON only: a history file never runs anything."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise HistoryError(f"not valid JSON ({error})") from None


FORMAT = "qwen_magic.conversation"  # a saved conversation with pictures


def _plain(message: dict) -> dict:
    plain = {"role": message["role"], "content": message["content"]}
    if message.get("images"):
        plain["images"] = list(message["images"])
    return plain


def _saved(message: dict) -> dict:
    """What a history file keeps of a message: role, content, any pictures (by hash) and any reasoning."""
    kept = _plain(message)
    if isinstance(message.get("reasoning_content"), str):
        kept["reasoning_content"] = message["reasoning_content"]
    return kept


def check_images(images) -> Dict[str, bytes]:
    """The ``images`` map of a saved file: each base64 PNG under the SHA-256 of its bytes."""
    if not isinstance(images, dict):
        raise HistoryError('"images" must map hashes to base64 images')
    store = {}
    for name, text in images.items():
        try:
            data = from_base64(text) if isinstance(text, str) else None
        except ValueError:
            data = None
        if data is None or digest(data) != name:
            raise HistoryError(f"image {str(name)[:16]}… is not base64 data whose SHA-256 is its name")
        store[name] = data
    return store


@dataclass
class Window:
    """What one turn sends: the messages, their token count, and how many earlier exchanges were left out."""

    messages: List[dict]
    prompt_tokens: int
    exchanges_sent: int
    exchanges_left_out: int
    left_out_for_tokens: int

    def notice(self) -> Optional[str]:
        if not self.exchanges_left_out:
            return None
        plural = "s" if self.exchanges_left_out != 1 else ""
        why = " to fit the context" if self.left_out_for_tokens else ""
        return f"{self.exchanges_left_out} earlier exchange{plural} left out of the window{why}."


@dataclass
class Conversation:
    """Alternating user/assistant messages, plus an optional system prompt of this conversation."""

    system: Optional[str] = None
    messages: List[dict] = field(default_factory=list)
    images: Dict[str, bytes] = field(default_factory=dict)  # PNG bytes by SHA-256, each kept once

    @property
    def exchanges(self) -> List[List[dict]]:
        return [self.messages[i:i + 2] for i in range(0, len(self.messages), 2)]

    def add_exchange(self, question: str, reply: str, finish_reason: Optional[str] = None, cell_id: Optional[str] = None,
                     reasoning: Optional[str] = None, raw: Optional[str] = None, thinking_open: bool = False,
                     images: Optional[List[str]] = None) -> None:
        """Record one exchange. ``reply`` is the answer alone; a thinking model's reasoning goes
        beside it as ``reasoning_content`` (saved, shown, never sent back as part of an answer)."""
        # Marks kept beside role and content are shown or used here, never sent to the model or saved.
        asked = {"role": "user", "content": question}
        if images:
            missing = [name for name in images if name not in self.images]
            if missing:
                raise KeyError(f"image {missing[0]} is not in the conversation's images")
            asked["images"] = list(images)
        if cell_id:
            asked["cell_id"] = cell_id  # the notebook cell that asked: re-running it replaces this exchange
        self.messages += [asked, {"role": "assistant", "content": ""}]
        self.set_last_reply(reply, finish_reason, reasoning, raw, thinking_open)

    def set_last_reply(self, reply: str, finish_reason: Optional[str] = None, reasoning: Optional[str] = None,
                       raw: Optional[str] = None, thinking_open: bool = False) -> None:
        """Replace the last answer (a continued reply is recorded whole again)."""
        answer = {"role": "assistant", "content": reply}
        if reasoning is not None:
            answer["reasoning_content"] = reasoning
        if raw is not None and raw != reply:
            answer["raw"] = raw  # exactly as the model wrote it, for %qwen_continue
        if thinking_open:
            answer["thinking_open"] = True  # cut inside the thinking
        if finish_reason in ("interrupted", "length"):
            answer["unfinished"] = finish_reason  # %qwen_continue can pick it up
        self.messages[-1] = answer

    def copy(self) -> "Conversation":
        return Conversation(system=self.system, messages=[dict(m) for m in self.messages], images=dict(self.images))

    def add_images(self, images: Dict[str, bytes]) -> None:
        self.images.update(images)

    def used_images(self) -> Dict[str, bytes]:
        """The pictures the messages refer to (undone exchanges may have left others)."""
        return {name: self.images[name] for m in self.messages for name in m.get("images", ()) if name in self.images}

    def undo(self) -> bool:
        """Drop the last exchange; False when there is none."""
        if not self.messages:
            return False
        del self.messages[-2:]
        return True

    def exchange_of_cell(self, cell_id: Optional[str]) -> Optional[int]:
        """Index of the exchange that notebook cell ``cell_id`` produced, if any."""
        if cell_id:
            for index, pair in enumerate(self.exchanges):
                if pair[0].get("cell_id") == cell_id:
                    return index
        return None

    def keep_exchanges(self, count: int) -> None:
        del self.messages[2 * count:]

    def to_markdown(self, title: str = "Conversation", image_files: Optional[Dict[str, str]] = None) -> str:
        """The transcript; ``image_files`` maps each picture's hash to the file it was written to."""
        parts = [f"# {title}"]
        if self.system:
            parts.append(f"**System:** {self.system}")
        for index, (asked, answer) in enumerate(self.exchanges, 1):
            note = f" *({answer['unfinished']})*" if answer.get("unfinished") else ""
            parts.append(f"## {index}. You")
            for number, name in enumerate(asked.get("images", ()), 1):
                where = (image_files or {}).get(name)
                parts.append(f"![image {number}]({where})" if where else f"*[image {number}: {name[:12]}]*")
            parts += [asked["content"], f"## {index}. Qwen{note}"]
            if answer.get("reasoning_content"):
                parts.append(f"<details><summary>Thinking</summary>\n\n{answer['reasoning_content']}\n\n</details>")
            parts.append(answer["content"])
        return "\n\n".join(parts) + "\n"

    def clear(self) -> None:
        self.system = None
        self.messages = []

    def window(
        self,
        question: str,
        *,
        images: Optional[List[str]] = None,
        count_tokens: Callable[[List[dict]], int],
        max_turns: Optional[int],
        max_new_tokens: int,
        max_context_tokens: int,
        default_system: Optional[str] = None,
    ) -> Window:
        """The messages to send for ``question``: system prompt, the newest exchanges that fit, the question.

        The system prompt is this conversation's own, else ``default_system``. At most
        ``max_turns`` earlier exchanges (``None``: no limit), then the oldest are dropped until prompt plus ``max_new_tokens`` fits ``max_context_tokens``.
        """
        system = self.system if self.system is not None else default_system
        head = [{"role": "system", "content": system}] if system else []
        tail = [_plain({"role": "user", "content": question, "images": images})]
        exchanges = self.exchanges
        allowed = len(exchanges) if max_turns is None else min(max_turns, len(exchanges))
        budget = max_context_tokens - max_new_tokens

        def build(n):
            kept = [_plain(m) for pair in exchanges[len(exchanges) - n:] for m in pair] if n else []
            return head + kept + tail

        # More exchanges never means fewer tokens, so search for the largest count that fits.
        tokens = count_tokens(build(allowed))
        best, best_tokens = allowed, tokens
        if tokens > budget:
            smallest = count_tokens(build(0))
            if smallest > budget:
                raise PromptTooLong(smallest, max_new_tokens, max_context_tokens)
            low, high, best, best_tokens = 0, allowed - 1, 0, smallest
            while low <= high:
                middle = (low + high) // 2
                tokens = count_tokens(build(middle))
                if tokens <= budget:
                    best, best_tokens, low = middle, tokens, middle + 1
                else:
                    high = middle - 1
        return Window(
            messages=build(best),
            prompt_tokens=best_tokens,
            exchanges_sent=best,
            exchanges_left_out=len(exchanges) - best,
            left_out_for_tokens=allowed - best,
        )

    # --- JSON: a list of {"role", "content"} (assistant messages may add "reasoning_content", user
    # messages "images"), the system prompt first when there is one.

    def to_json(self) -> List[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [_saved(m) for m in self.messages]

    @classmethod
    def from_json(cls, data, images: Optional[Dict[str, bytes]] = None) -> "Conversation":
        """Messages as ``to_json`` writes them; ``images`` holds the pictures they refer to (checked)."""
        images = images or {}
        if not isinstance(data, list):
            raise HistoryError("expected a JSON list of {\"role\", \"content\"} objects")
        for i, message in enumerate(data):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message) <= {"role", "content", "reasoning_content", "images"}:
                raise HistoryError(f"message {i} must be an object with the keys \"role\" and \"content\" (and \"reasoning_content\" for a reply)")
            if "images" in message:
                names = message["images"]
                if message["role"] != "user" or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise HistoryError(f"message {i}: only a user message may have images, a list of image hashes")
                missing = [n for n in names if n not in images]
                if missing:
                    raise HistoryError(f"message {i} refers to image {missing[0][:16]}…, which the file does not hold")
            if message["role"] not in ROLES:
                raise HistoryError(f"message {i} has unknown role {message['role']!r}")
            if not isinstance(message["content"], str):
                raise HistoryError(f"message {i} has content that is not a string")
            if "reasoning_content" in message and (message["role"] != "assistant" or not isinstance(message["reasoning_content"], str)):
                raise HistoryError(f"message {i}: only an assistant message may have reasoning_content, and it must be a string")
        system = None
        if data and data[0]["role"] == "system":
            system, data = data[0]["content"], data[1:]
        for i, message in enumerate(data):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise HistoryError(f"messages must alternate user and assistant; found {message['role']!r} where {expected!r} belongs")
        if len(data) % 2:
            raise HistoryError("the last user message has no assistant reply")
        used = {n for m in data for n in m.get("images", ())}
        return cls(system=system, messages=[dict(m) for m in data], images={n: images[n] for n in used})

    def to_file(self):
        """What ``--save`` writes: the list of messages, or with pictures the object that holds them too."""
        used = self.used_images()
        if not used:
            return self.to_json()
        return {"format": FORMAT, "version": 1, "messages": self.to_json(), "images": {n: to_base64(d) for n, d in used.items()}}

    @classmethod
    def from_file(cls, data) -> "Conversation":
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return cls.from_json(data.get("messages"), check_images(data.get("images", {})))
        return cls.from_json(data)

    def dumps(self) -> str:
        return json.dumps(self.to_file(), ensure_ascii=False, indent=1)

    @classmethod
    def loads(cls, text: str) -> "Conversation":
        return cls.from_file(parse_json(text))
