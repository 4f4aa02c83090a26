"""The display layer alone: one output area updated in place, throttled, final text complete."""

import types

from IPython.core.displaypub import DisplayPublisher
from IPython.utils.capture import capture_output

from qwen_magic import display as display_module
from qwen_magic.display import ReplyView, can_update_in_place, stats_line
from qwen_magic.engine import Reply


def test_updates_share_one_display_id_and_end_with_the_whole_text(ip, monkeypatch):
    clock = iter(range(0, 10_000, 1))  # each call a second later: no throttling
    monkeypatch.setattr(display_module.time, "monotonic", lambda: next(clock) * 1.0)
    with capture_output() as captured:
        view = ReplyView(ip)
        view.start("2 earlier exchanges left out of the window.")
        for piece in ["广州", "是", "广东省的省会。"]:
            view.append(piece)
        view.finish("广州是广东省的省会。", "3 tokens")
    first, *updates = captured.outputs
    assert not first.update and all(o.update for o in updates) and len(updates) == 4
    assert len({o.transient["display_id"] for o in captured.outputs}) == 1
    partial = [o.data["text/markdown"] for o in updates[:-1]]
    assert partial[-1].endswith("广州是广东省的省会。 ▌")
    final = updates[-1].data
    assert final["text/markdown"] == (
        "<sub>2 earlier exchanges left out of the window.</sub>\n\n广州是广东省的省会。\n\n<sub>3 tokens</sub>"
    )
    assert final["text/plain"] == "(2 earlier exchanges left out of the window.)\n广州是广东省的省会。\n\n(3 tokens)"


def test_updates_are_throttled_but_the_final_one_always_comes(ip, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(display_module.time, "monotonic", lambda: now[0])
    with capture_output() as captured:
        view = ReplyView(ip)
        view.start()
        for i in range(1000):
            now[0] += 0.001  # a thousand pieces in one second
            view.append("x")
        view.finish("x" * 1000)
    updates = [o for o in captured.outputs if o.update]
    assert 9 <= len(updates) <= 12  # about ten a second, plus the final one
    assert updates[-1].data["text/markdown"] == "x" * 1000


def test_without_streaming_the_reply_is_shown_once(ip):
    with capture_output() as captured:
        view = ReplyView(ip, live=False)
        view.start()
        view.append("hello ")
        view.finish("hello world", "2 tokens")
    assert len(captured.outputs) == 1 and not captured.outputs[0].update
    assert captured.outputs[0].data["text/markdown"].startswith("hello world")


def test_a_terminal_gets_plain_text_as_it_comes(capsys):
    terminal = types.SimpleNamespace(display_pub=DisplayPublisher())
    assert not can_update_in_place(terminal)
    view = ReplyView(terminal)
    view.start("1 earlier exchange left out of the window.")
    view.append("广州")
    assert capsys.readouterr().out == "(1 earlier exchange left out of the window.)\n广州"
    view.append("是")
    view.finish("广州是省会。", "3 tokens")
    assert capsys.readouterr().out == "是省会。\n(3 tokens)\n"


def test_a_failed_reply_is_marked(ip):
    with capture_output() as captured:
        view = ReplyView(ip)
        view.start()
        view.append("partial")
        view.fail()
    assert "generation failed; the conversation is unchanged" in captured.outputs[-1].data["text/markdown"]


def test_stats_line():
    reply = Reply(text="x", token_ids=[1] * 11, prompt_tokens=1200, finish_reason="length",
                  first_token_seconds=0.25, seconds=1.25, cached_tokens=1000)
    assert stats_line(reply, 32768) == (
        "11 tokens · 10.0 tokens/s · first token 0.25 s · context 1,200 / 32,768 (1,000 cached) · stopped at max_new_tokens"
    )
