"""Thinking replies: the switch reaches the template, the reasoning is shown apart, stored apart,
never sent back, and survives interrupts, length cuts and %qwen_continue; servers' reasoning too."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from IPython.utils.capture import capture_output
from helpers import ask, usage_error

from qwen_magic.engine import ReplyStream, end_token_ids
from qwen_magic.prompt import prepare, prompt_ids
from qwen_magic.thinking import raw_text, split


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), family="qwen3"))


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory):
    from qwen_magic.tiny import available_families, write_tiny_model

    if "qwen3_5_text" not in available_families():  # transformers 4.x has no Qwen3.5
        return None
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny-qwen35"), family="qwen3_5_text"))


# --- reading a reply


@pytest.mark.parametrize("raw, opened, expected", [
    ("<think>\nweigh it\n</think>\n\nThe answer.", False, ("weigh it", "The answer.", True, True)),
    ("weigh it\n</think>\n\nThe answer.", True, ("weigh it", "The answer.", True, True)),
    ("weigh it\n</think>\n\nThe answer.", None, ("weigh it", "The answer.", True, True)),  # a server's template opened it
    ("weigh it </think> no", False, ("", "weigh it </think> no", False, True)),  # our template did not: plain text
    ("Plain answer.", False, ("", "Plain answer.", False, True)),
    ("<think>\nstill going", False, ("still going", "", True, False)),
])
def test_split(raw, opened, expected):
    parts = split(raw, opened)
    assert (parts.reasoning, parts.answer, parts.thinking, parts.done) == expected


def test_split_while_streaming_holds_back_a_tag_still_arriving():
    assert split("<thi", False, streaming=True).answer == ""
    assert split("<think>\nhmm </th", False, streaming=True).reasoning == "hmm "


def test_raw_text_is_qwens_layout():
    assert raw_text("r", "a", opened=False) == "<think>\nr\n</think>\n\na"
    assert raw_text("r", "a", opened=True) == "r\n</think>\n\na"
    assert raw_text("r", "", opened=False, done=False) == "<think>\nr"
    assert raw_text("", "a", opened=False) == "a"


# --- the switch reaches the template


def test_the_switch_reaches_the_template(qwen3_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    messages = [{"role": "user", "content": "介绍广州这座城市"}]
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_ids(tokenizer, messages, thinking=False) == tokenizer(off, add_special_tokens=False)["input_ids"]
    assert prepare(tokenizer, messages, thinking=False)[1] is False  # the think block is closed
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nold answer"},
               {"role": "user", "content": "next"}]
    rendered = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert "old thoughts" not in rendered and "old answer" in rendered  # Qwen3 drops earlier reasoning


def test_qwen35_opens_the_think_block_in_the_prompt(qwen35_dir):
    if qwen35_dir is None:
        pytest.skip("this transformers has no Qwen3.5")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen35_dir)
    ids, opened = prepare(tokenizer, [{"role": "user", "content": "hi"}])
    assert opened and tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
    assert prepare(tokenizer, [{"role": "user", "content": "hi"}], thinking=False)[1] is False


def test_no_think_greedy_equals_the_recipe(ip, qwen, qwen3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ip.run_line_magic("qwen_load", f"{qwen3_dir} --engine fast")
    ip.run_line_magic("config", "QwenMagics.do_sample = False")
    tokenizer, model = AutoTokenizer.from_pretrained(qwen3_dir), AutoModelForCausalLM.from_pretrained(qwen3_dir)
    history = []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?"]:
        ask(ip, question, "--no-think --max-new-tokens 8")
        history.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        inputs = tokenizer([text], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        expected = tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": expected})
        assert ip.user_ns["_qwen"] == split(expected, False).answer


def test_thinking_flags_are_refused_without_a_switch(ip, qwen, tiny_model_dir):
    ip.run_line_magic("qwen_load", tiny_model_dir)
    message = usage_error(ip.run_cell_magic, "qwen", "--think", "hi")
    assert "chat template has no thinking switch" in message
    assert "Give --think or --no-think, not both." == usage_error(ip.run_cell_magic, "qwen", "--think --no-think", "hi")


def test_sampling_follows_the_model_and_the_thinking_mode(ip, qwen, qwen3_dir):
    with capture_output() as shown:
        ip.run_line_magic("qwen_load", qwen3_dir)
    assert "sampling: temperature 0.6, top-p 0.95, top-k 20 (the model's generation_config)" in shown.stdout
    assert (qwen.settings().temperature, qwen.settings().top_p) == (0.6, 0.95)
    off = qwen.settings(thinking=False)
    assert (off.temperature, off.top_p, off.top_k, off.thinking) == (0.7, 0.8, 20, False)
    ip.run_line_magic("config", "QwenMagics.temperature = 0.3")
    assert qwen.settings(thinking=False).temperature == 0.3  # %config wins


# --- a scripted thinking model: the real tokenizer, chat, display and conversation


class ScriptedEngine:
    """Writes ``raw`` token by token (then the end token), as a thinking model would."""

    name = "scripted"

    def __init__(self, tokenizer, raw):
        self.tokenizer, self.raw, self.prompts = tokenizer, raw, []
        self.end_ids = end_token_ids(type("M", (), {"generation_config": type("G", (), {"eos_token_id": None})()})(), tokenizer)

    def start(self, messages, settings, continue_final=False):
        ids, opened = prepare(self.tokenizer, messages, continue_final, settings.thinking)
        self.prompts.append((messages, ids))
        script = self.tokenizer(self.raw, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        if continue_final:  # go on from where the partial reply stops
            done = len(self.tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
            script = script[done:]

        def produce(emit, stop_event):
            for count, token in enumerate(script):
                if count == settings.max_new_tokens or stop_event.is_set():
                    break
                emit([token])
                time.sleep(0.02)  # a model's pace, so an interrupt lands mid-reply

        return ReplyStream(self.tokenizer, len(ids), produce, max_new_tokens=settings.max_new_tokens,
                           end_ids=self.end_ids, opens_thinking=opened)

    def close(self):
        pass


RAW = "<think>\n广州在广东。美食很多。\n</think>\n\n早茶、虾饺和烧卖。"


@pytest.fixture
def thinker(ip, qwen, qwen3_dir):
    ip.run_line_magic("qwen_load", qwen3_dir)
    engine = ScriptedEngine(qwen.loaded.tokenizer, RAW)
    qwen.loaded.engine = engine
    return engine


def test_thinking_is_shown_apart_and_kept_apart(ip, qwen, thinker, tmp_path):
    shown = ask(ip, "它有什么好吃的美食吗?")
    markdown = shown.outputs[-1].data["text/markdown"]
    assert markdown.startswith("<details><summary>Thought · ")
    assert "广州在广东。美食很多。\n\n</details>\n\n早茶、虾饺和烧卖。" in markdown
    assert "thinking, " in markdown and " answer)" in markdown  # the stats line counts them apart
    assert ip.user_ns["_qwen"] == "早茶、虾饺和烧卖。"
    answer = qwen.conversation.messages[-1]
    assert (answer["content"], answer["reasoning_content"]) == ("早茶、虾饺和烧卖。", "广州在广东。美食很多。")
    # The next question does not send the reasoning back.
    ask(ip, "还有呢?")
    sent, ids = thinker.prompts[-1]
    assert all("reasoning_content" not in m for m in sent)
    assert "广州在广东" not in qwen.loaded.tokenizer.decode(ids)
    # Saved, reloaded and exported with the reasoning.
    path = tmp_path / "chat.json"
    ip.run_line_magic("qwen_history", f"--save {path}")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved[1] == {"role": "assistant", "content": "早茶、虾饺和烧卖。", "reasoning_content": "广州在广东。美食很多。"}
    before = qwen.conversation.to_json()
    ip.run_line_magic("qwen_history", f"--load {path}")
    assert qwen.conversation.to_json() == before
    ip.run_line_magic("qwen_history", f"--export {tmp_path / 'chat.md'}")
    assert "<details><summary>Thinking</summary>\n\n广州在广东。美食很多。" in (tmp_path / "chat.md").read_text(encoding="utf-8")


def test_a_reply_cut_inside_the_thinking_says_so_and_continues_there(ip, qwen, thinker):
    shown = ask(ip, "它有什么好吃的美食吗?", "--max-new-tokens 6")
    markdown = shown.outputs[-1].data["text/markdown"]
    assert "stopped at max_new_tokens while thinking: %qwen_continue goes on" in markdown
    assert markdown.startswith("<details open><summary>Thinking")
    cut = qwen.conversation.messages[-1]
    assert cut["content"] == "" and cut["reasoning_content"] and cut["unfinished"] == "length"
    ip.run_line_magic("qwen_continue", "--max-new-tokens 200")
    messages, ids = thinker.prompts[-1]
    assert qwen.loaded.tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + messages[-1]["content"])
    answer = qwen.conversation.messages[-1]
    assert (answer["content"], answer["reasoning_content"]) == ("早茶、虾饺和烧卖。", "广州在广东。美食很多。")
    assert "unfinished" not in answer and ip.user_ns["_qwen"] == "早茶、虾饺和烧卖。"


def test_an_interrupt_during_the_thinking_keeps_what_was_thought(ip, qwen, thinker, interrupt_after):
    interrupt_after(3)
    shown = ask(ip, "它有什么好吃的美食吗?")
    assert "interrupted while thinking" in shown.outputs[-1].data["text/markdown"]
    answer = qwen.conversation.messages[-1]
    assert answer["unfinished"] == "interrupted" and answer["reasoning_content"] and answer["content"] == ""


def test_the_history_table_counts_the_thinking(ip, qwen, thinker):
    ask(ip, "它有什么好吃的美食吗?")
    with capture_output() as shown:
        ip.run_line_magic("qwen_history", "")
    assert "thinking)" in shown.outputs[0].data["text/markdown"]


# --- servers


class ScriptedServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible stream that sends reasoning apart (a reasoning parser) or inline."""

    requests = []
    mode = "parser"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "qwen3", "object": "model", "created": 0, "owned_by": "me"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedServer.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.mode == "parser":
            deltas = [{"reasoning_content": "广州在广东。"}, {"reasoning_content": "美食很多。"}, {"content": "早茶"}, {"content": "、虾饺。"}]
        else:  # no parser, and a template that opened the think block: only the closing tag arrives
            deltas = [{"content": "广州在广东。美食很多。\n"}, {"content": "</think>\n\n早茶"}, {"content": "、虾饺。"}]
        for i, delta in enumerate(deltas + [{}]):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "qwen3",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) else None}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, data):
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def scripted_server():
    pytest.importorskip("openai")
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.mark.parametrize("mode", ["parser", "inline"])
def test_server_reasoning_is_shown_and_stored_apart(ip, qwen, scripted_server, mode):
    ScriptedServer.mode, ScriptedServer.requests = mode, []
    ip.run_line_magic("qwen_load", f"--server {scripted_server} qwen3")
    shown = ask(ip, "它有什么好吃的美食吗?", "--no-think")
    assert ScriptedServer.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    markdown = shown.outputs[-1].data["text/markdown"]
    assert markdown.startswith("<details><summary>Thought") and "早茶、虾饺。" in markdown
    answer = qwen.conversation.messages[-1]
    assert (answer["content"], answer["reasoning_content"]) == ("早茶、虾饺。", "广州在广东。美食很多。")
    assert ip.user_ns["_qwen"] == "早茶、虾饺。"
