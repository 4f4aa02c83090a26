"""Every Qwen family on the GPU in NF4: the CUDA-graph engine equals eager steps and a plain forward
(teacher forcing), and greedy replies over several turns equal the classic recipe's, with cache reuse,
regenerate and continue. Skipped without CUDA and bitsandbytes (CI has no GPU)."""

import importlib.util

import pytest
import torch

from qwen_magic import loader
from qwen_magic.engine import GenerateEngine
from qwen_magic.fast import FastEngine
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings
from qwen_magic.tiny import available_families
from test_fast import forced_logits, reference_logits, relative_error
from test_gpu import incremental_logits, reply_to, turns

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]

FAMILIES = [f for f in available_families() if f != "qwen2"]  # qwen2 has tests/test_gpu.py
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    from qwen_magic.tiny import write_tiny_model

    extra = dict(SHAPE, num_hidden_layers=4, head_dim=64)
    if "moe" in request.param or request.param == "qwen3_next":
        extra.update(moe_intermediate_size=128)
    if request.param.startswith(("qwen3_5", "qwen3_next")):
        extra.update(linear_key_head_dim=64, linear_value_head_dim=64)
    return request.param, str(write_tiny_model(tmp_path_factory.mktemp(request.param), family=request.param, **extra))


@pytest.fixture(scope="module", params=["float32", "float16"])  # float16 is what a T4 computes in
def nf4(request, family_dir):
    family, path = family_dir
    loaded = loader.load(path, bits=4, dtype=request.param, engine="fast", notify=lambda _: None)
    yield family, loaded
    loader.free(loaded)


def test_graph_equals_eager_and_a_plain_forward(nf4):
    family, loaded = nf4
    model, tokenizer, fast = loaded.model, loaded.tokenizer, loaded.engine
    moe = "moe" in family or family == "qwen3_next"
    # Mixture-of-experts layers route on the host: no graph, said in the summary line.
    assert fast.name == ("static KV cache" if moe else "static KV cache + CUDA graph + Triton kernels"), fast.name + fast.note
    assert ("no CUDA graph" in loaded.summary()) == moe
    eager = FastEngine(model, tokenizer, context_length=4096, use_graph=False, kernels=bool(fast.kernels))  # the same kernels
    reply = tokenizer("广州是广东省的省会。<|im_end|>", add_special_tokens=False)["input_ids"]
    bound = 1e-3 if model.dtype == torch.float32 else 2e-2
    for prompt in [
        turns(tokenizer, "介绍广州这座城市"),
        turns(tokenizer, "介绍广州这座城市", "广州是广东省的省会。", "它有什么好吃的美食吗?"),  # reuses the cache
        turns(tokenizer, "它有什么好吃的美食吗?", "早茶和虾饺。", "还有呢?"),  # window moved: rebuilt
    ]:
        fast_logits = forced_logits(fast, prompt, reply).float()
        assert relative_error(fast_logits, forced_logits(eager, prompt, reply).float()) < bound, family
        reference = reference_logits(model, prompt, reply).float()
        if model.dtype != torch.float32:
            # As in test_gpu.py: in half precision the fast path may differ from a plain forward no
            # more than the classic recipe's own token-by-token path does (MoE routing amplifies rounding).
            bound = max(bound, 1.5 * relative_error(incremental_logits(model, prompt, reply).float(), reference))
        assert relative_error(fast_logits, reference) < bound, family
    eager.close()


def test_greedy_turns_regenerate_and_continue_equal_generate(nf4):
    """Greedy tokens equal generate's in float32. In half precision two correct paths may round apart,
    so there the fast engine's logits, teacher-forced on generate's reply through the same cache reuse,
    must stay within the half-precision bound."""
    family, loaded = nf4
    model, tokenizer = loaded.model, loaded.tokenizer
    fast, classic = loaded.engine, GenerateEngine(model, tokenizer)
    settings = GenerationSettings(do_sample=False, max_new_tokens=24)
    exact = model.dtype == torch.float32

    def check(messages, continue_final=False):
        expected = reply_to(classic, messages, settings, continue_final)
        if exact:
            got = reply_to(fast, messages, settings, continue_final)
            assert got.token_ids == expected.token_ids, (family, messages[-1])
        else:
            got = reply_to(fast, messages, settings, continue_final)  # leaves the cache as a real turn does
            prompt = prompt_ids(tokenizer, messages, continue_final)
            forced = forced_logits(fast, prompt, expected.token_ids[:-1]).float()
            assert relative_error(forced, reference_logits(model, prompt, expected.token_ids[:-1]).float()) < 2e-2, family
        return expected

    history, cached = [], []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello! How are you today?"]:
        history.append({"role": "user", "content": question})
        expected = check(history)
        cached.append(fast.reused)
        again = reply_to(fast, history, settings)  # regenerate: the same prompt once more
        assert again.cached_tokens > 0, family
        if exact:
            assert again.token_ids == expected.token_ids, family
        history.append({"role": "assistant", "content": expected.text})
    assert all(c > 0 for c in cached[1:]), (family, cached)
    partial = history[:-1] + [{"role": "assistant", "content": history[-1]["content"][:5]}]
    check(partial, continue_final=True)
