"""Every Qwen family the loader accepts, on the fast engine forced on the CPU: greedy replies equal
the classic recipe's over several turns with cache reuse, a window that slides, regenerate and
continue. Hybrid models (Qwen3.5, Qwen3-Next) keep recurrent state: the reuse must stay exact."""

import pytest
from IPython.utils.capture import capture_output
from helpers import ask, usage_error

from qwen_magic.tiny import FAMILIES, available_families, write_tiny_model

FAMILY_NAMES = available_families()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {name: str(write_tiny_model(tmp_path_factory.mktemp(name), family=name)) for name in FAMILY_NAMES}


class Recipe:
    """The tutorial's code, with the template switch Qwen3's model card shows."""

    def __init__(self, path, thinking):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.options = {} if thinking is None else {"enable_thinking": thinking}

    def reply(self, messages, max_new_tokens, partial=""):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **self.options) + partial
        inputs = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True)


def written(qwen):
    """The last reply as the model wrote it (a random model may write think tags even with thinking off)."""
    last = qwen.conversation.messages[-1]
    return last.get("raw", last["content"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_turns_window_regenerate_and_continue_equal_the_recipe(ip, qwen, family, family_dirs):
    thinking = False if FAMILIES[family][2] != "chatml" else None  # answers without a think block: plain text to compare
    import transformers

    engine = "fast"
    if "linear_attention" in str(FAMILIES[family][3]) and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x keeps no recurrent state in a static cache: routed to generate, in one line
        message = usage_error(ip.run_line_magic, "qwen_load", f"{family_dirs[family]} --engine fast")
        assert "(hybrid models need transformers 5)" in message
        engine = "generate"
    with capture_output() as loaded:
        ip.run_line_magic("qwen_load", f"{family_dirs[family]} --engine {engine}")
    assert f"engine: {'static KV cache' if engine == 'fast' else 'transformers generate'}" in loaded.stdout
    for line in ["do_sample = False", "max_turns = 1", "max_new_tokens = 8", f"thinking = {thinking}"]:
        ip.run_line_magic("config", f"QwenMagics.{line}")
    recipe = Recipe(family_dirs[family], thinking)
    exchanges = []
    for turn, question in enumerate(["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello! How are you today?"]):
        shown = ask(ip, question)
        window = [m for pair in exchanges[-1:] for m in pair] + [{"role": "user", "content": question}]  # max_turns = 1
        expected = recipe.reply(window, 8)
        assert written(qwen) == expected, (family, turn)
        markdown = shown.outputs[-1].data["text/markdown"]
        if turn == 1 and engine == "fast":
            assert " cached)" in markdown, family  # the first exchange came from the cache
        if turn == 2:
            assert "1 earlier exchange left out of the window" in markdown, family  # the window slid
        exchanges.append([{"role": "user", "content": question}, {"role": "assistant", "content": expected}])
    ip.run_line_magic("qwen_regenerate", "")  # greedy: the same reply again, from the snapshot of this prompt
    assert written(qwen) == exchanges[-1][1]["content"], family
    shown = ask(ip, "再见", "--max-new-tokens 3")
    window = exchanges[-1] + [{"role": "user", "content": "再见"}]
    partial = recipe.reply(window, 3)
    assert written(qwen) == partial
    ip.run_line_magic("qwen_continue", "--max-new-tokens 5")
    assert written(qwen) == partial + recipe.reply(window, 5, partial=partial), family
