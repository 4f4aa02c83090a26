import json

import pytest

from qwen_magic.conversation import Conversation, HistoryError, PromptTooLong


def words(messages):
    """A stand-in token count: one token per word, two per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def conversation(n, system=None):
    c = Conversation(system=system)
    for i in range(n):
        c.add_exchange(f"question {i}", f"answer {i} is here")
    return c


def window(c, question="next one", **kw):
    kw.setdefault("max_turns", None)
    kw.setdefault("max_new_tokens", 10)
    kw.setdefault("max_context_tokens", 10_000)
    return c.window(question, count_tokens=words, **kw)


def test_window_by_turns_keeps_the_newest_exchanges():
    w = window(conversation(5), max_turns=2)
    assert [m["content"] for m in w.messages] == ["question 3", "answer 3 is here", "question 4", "answer 4 is here", "next one"]
    assert (w.exchanges_sent, w.exchanges_left_out, w.left_out_for_tokens) == (2, 3, 0)
    assert w.notice() == "3 earlier exchanges left out of the window."


def test_max_turns_zero_sends_no_earlier_turns():
    w = window(conversation(3), max_turns=0)
    assert w.messages == [{"role": "user", "content": "next one"}]
    assert w.exchanges_left_out == 3


def test_max_turns_none_sends_everything_that_fits():
    w = window(conversation(4))
    assert w.exchanges_sent == 4 and w.notice() is None
    assert w.prompt_tokens == words(w.messages)


@pytest.mark.parametrize("budget_slack", [0, 1, 5])
def test_window_by_tokens_drops_oldest_until_prompt_plus_reply_fits(budget_slack):
    c = conversation(6, system="be brief")
    exchange = words([{"content": "question 0"}, {"content": "answer 0 is here"}])  # 10 tokens
    base = words([{"content": "be brief"}, {"content": "next one"}])
    # Room for exactly three exchanges (plus some slack below a fourth).
    context = base + 3 * exchange + budget_slack + 10
    w = window(c, max_context_tokens=context)
    assert w.exchanges_sent == 3
    assert w.messages[0] == {"role": "system", "content": "be brief"}
    assert w.messages[1]["content"] == "question 3"
    assert w.prompt_tokens == words(w.messages) <= context - 10
    assert w.left_out_for_tokens == 3
    assert w.notice() == "3 earlier exchanges left out of the window to fit the context."


def test_a_message_that_cannot_fit_alone_is_refused():
    c = conversation(2)
    with pytest.raises(PromptTooLong) as error:
        window(c, question="word " * 50, max_context_tokens=40, max_new_tokens=10)
    assert error.value.prompt_tokens == 52
    assert "max_context_tokens=40" in str(error.value)
    assert len(c.messages) == 4  # nothing lost


def test_system_prompt_of_the_conversation_wins_over_the_default():
    assert window(Conversation(system="own"), default_system="default").messages[0]["content"] == "own"
    assert window(Conversation(), default_system="default").messages[0]["content"] == "default"
    assert window(Conversation()).messages[0]["role"] == "user"


def test_interrupted_mark_is_kept_but_never_sent_or_saved():
    c = Conversation()
    c.add_exchange("q", "partial", finish_reason="interrupted", cell_id="cell-1")
    assert c.messages[1]["unfinished"] == "interrupted" and c.messages[0]["cell_id"] == "cell-1"
    assert window(c).messages[0] == {"role": "user", "content": "q"}
    assert window(c).messages[1] == {"role": "assistant", "content": "partial"}
    assert c.to_json()[1] == {"role": "assistant", "content": "partial"}


def test_json_round_trip_keeps_system_and_chinese_text():
    c = conversation(2, system="你是一个有帮助的助手")
    c.add_exchange("介绍广州这座城市", "广州是广东省的省会。")
    again = Conversation.loads(c.dumps())
    assert again.system == c.system and again.messages == c.messages
    assert "广州" in c.dumps()  # stored as readable UTF-8, not \\u escapes


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("{not json", "not valid JSON"),
        ('{"role": "user", "content": "hi"}', "expected a JSON list"),
        ('[{"role": "user"}]', "must be an object with the keys"),
        ('[{"role": "user", "content": "hi", "extra": 1}]', "must be an object with the keys"),
        ('[{"role": "robot", "content": "hi"}]', "unknown role"),
        ('[{"role": "user", "content": 3}]', "not a string"),
        ('[{"role": "assistant", "content": "hi"}]', "alternate"),
        ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "alternate"),
        ('[{"role": "user", "content": "a"}]', "no assistant reply"),
        ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]', "alternate"),
        ('[{"role": "user", "content": "a"}, {"role": "assist', "not valid JSON"),
    ],
)
def test_malformed_history_is_refused(text, complaint):
    with pytest.raises(HistoryError, match=complaint):
        Conversation.loads(text)


def test_empty_list_is_an_empty_conversation():
    assert Conversation.loads("[]").messages == []
    assert json.loads(Conversation().dumps()) == []
