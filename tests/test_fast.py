"""The fast engine on the CPU (no CUDA graph): cache reuse, cropping, rebuilds, sampling.

Random-weight models make greedy token sequences fragile, so correctness is checked by
teacher forcing: the same tokens through the fast path and through a plain forward
pass must give the same logits at every step.
"""

import pytest
import torch
from helpers import transformers_scores
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_magic import attention, fast, static_cache
from qwen_magic.engine import generate_reply
from qwen_magic.fast import FastEngine, Sampler
from qwen_magic.prompt import prompt_ids
from qwen_magic.settings import GenerationSettings


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def engine(model_and_tokenizer):
    engine = FastEngine(*model_and_tokenizer, context_length=4096, use_graph=False)
    yield engine
    engine.close()


def forced_logits(engine, prompt, continuation):
    """Logits after the prompt and after each forced token, through prefill and single steps."""
    with torch.inference_mode():
        rows = [engine.prefill(prompt, reserve=len(continuation) + 1)]
        for offset, token in enumerate(continuation):
            # clone: with a CUDA graph the returned logits live in a buffer the next step overwrites
            rows.append(engine.step(torch.tensor([[token]], device=engine.device), len(prompt) + offset).clone())
            engine.cached_ids.append(token)
    return torch.cat(rows)


def reference_logits(model, prompt, continuation):
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + continuation], device=model.device)).logits[0]
    return logits[len(prompt) - 1:]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_teacher_forced_logits_match_over_turns_with_reuse_crop_and_rebuild(engine, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    turn = lambda *texts: prompt_ids(tokenizer, [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 3, texts)])
    reply_one = tokenizer("广州是广东省的省会。<|im_end|>", add_special_tokens=False)["input_ids"]

    first = turn("介绍广州这座城市")
    assert relative_error(forced_logits(engine, first, reply_one), reference_logits(model, first, reply_one)) < 1e-5
    assert engine.reused == 0

    # Turn two: the history is cached, so only the new message is prefilled.
    second = turn("介绍广州这座城市", "广州是广东省的省会。", "它有什么好吃的美食吗?")
    assert second[: len(first) + len(reply_one)] == first + reply_one
    reply_two = tokenizer("早茶和虾饺。", add_special_tokens=False)["input_ids"]
    got = forced_logits(engine, second, reply_two)
    assert engine.reused == len(first) + len(reply_one)
    assert relative_error(got, reference_logits(model, second, reply_two)) < 1e-5

    # The window dropped the first exchange: only the system prompt is still shared, the rest is rebuilt.
    third = turn("它有什么好吃的美食吗?", "早茶和虾饺。", "还有呢?")
    got = forced_logits(engine, third, reply_two)
    assert engine.reused == fast.common_prefix(second, third) < len(first)
    assert relative_error(got, reference_logits(model, third, reply_two)) < 1e-5

    # Going back to a shorter prompt crops the cache to the shared prefix.
    got = forced_logits(engine, first, reply_one)
    assert engine.reused == fast.common_prefix(third, first)
    assert relative_error(got, reference_logits(model, first, reply_one)) < 1e-5


def test_the_cache_grows_when_a_conversation_outgrows_it(engine, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    monkeypatch.setattr(fast, "PREFILL_CHUNK", 16)  # several chunks per prefill, too
    short = tokenizer("Hello! How are you today?", add_special_tokens=False)["input_ids"]
    forced_logits(engine, short, short)
    small = engine.capacity
    longer = short * 8
    got = forced_logits(engine, longer, short)
    assert engine.capacity > small and engine.capacity >= len(longer) + len(short)
    assert relative_error(got, reference_logits(model, longer, short)) < 1e-5


def test_a_prefill_reads_only_the_filled_cache(engine, model_and_tokenizer, monkeypatch):
    """From position 0 a prefill is the recipe's causal attention (no mask); after a cached prefix, or in a
    later chunk, it reads the positions written so far, causal to the last key (no mask), never the empty rest."""
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(attention, "SMALL_QUERY", 4)  # the tiny prompts count as prefills
    monkeypatch.setattr(fast, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(fast, "MOST_CHUNKS", 8)
    seen = []
    original, lower_right = attention.sdpa_attention_forward, attention._lower_right

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(("causal", query.shape[2], key.shape[2], attention_mask is None))
        return original(module, query, key, value, attention_mask, **kwargs)

    def spy_lower_right(queries, keys):
        seen.append(("lower right", queries, keys, True))
        return lower_right(queries, keys)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    if lower_right is not None:
        monkeypatch.setattr(attention, "_lower_right", spy_lower_right)
    first = tokenizer("介绍广州这座城市, please, in a few words, and its food too.", add_special_tokens=False)["input_ids"]
    reply = tokenizer(" Guangzhou is a city.", add_special_tokens=False)["input_ids"]
    assert len(first) > 32  # several chunks
    got = forced_logits(engine, first, reply)
    assert relative_error(got, reference_logits(model, first, reply)) < 1e-5
    layers = model.config.num_hidden_layers
    prefills = [entry for entry in seen if entry[1] > 4]
    one = fast._chunk_end(0, 0, len(first))  # equal chunks of at most 16
    two = fast._chunk_end(0, one, len(first)) - one
    assert one <= 16 and two <= 16
    assert prefills[0] == ("causal", one, one, True)  # the first chunk: plain causal attention over its own positions
    if lower_right is not None:
        assert prefills[layers] == ("lower right", two, one + two, True)  # the second: the filled ones and its own
    else:
        assert prefills[layers] == ("causal", two, one + two, False)  # under the mask cut to them
    assert engine.capacity > len(first) + len(reply)  # the cache itself is longer than anything read
    seen.clear()
    longer = first + reply + tokenizer(" 它有什么好吃的美食吗? Tell me more, more, and more about it.", add_special_tokens=False)["input_ids"]
    got = forced_logits(engine, longer, reply)
    assert 0 < engine.reused < len(longer)
    assert relative_error(got, reference_logits(model, longer, reply)) < 1e-5
    assert all(keys == engine.reused + queries for _, queries, keys, _ in seen[:layers])


def test_a_prefill_builds_no_mask(engine, model_and_tokenizer, monkeypatch):
    """A prefill forward's attention reads no mask (maskless_prefill), so none is built: transformers' mask code reads
    the static cache's write position back from the device, a wait for the GPU at every forward. A decode step
    still gets its mask; the logits stay the plain forward's."""
    import transformers.masking_utils as masking

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(attention, "SMALL_QUERY", 4)  # the tiny prompts count as prefills
    monkeypatch.setattr(fast, "PREFILL_CHUNK", 16)
    built = []
    original = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *args, **kwargs: built.append(1) or original(*args, **kwargs))
    assert engine.maskless
    first = tokenizer("介绍广州这座城市, please, in a few words, and its food too.", add_special_tokens=False)["input_ids"]
    reply = tokenizer(" Guangzhou is a city.", add_special_tokens=False)["input_ids"]
    engine.cached_ids = []
    with torch.inference_mode():
        engine.prefill(first, reserve=len(reply) + 1)
    assert not built  # several chunks, no mask
    engine.cached_ids = []
    got = forced_logits(engine, first, reply)
    assert built  # the decode steps' masks
    assert relative_error(got, reference_logits(model, first, reply)) < 1e-5


def test_a_cache_the_next_turn_would_outgrow_grows_after_the_reply(engine, classic, monkeypatch):
    """After a reply, a cache with less room left than a next message (NEXT_MESSAGE) and a reply need grows then,
    keeping what it holds (with a CUDA graph, its decode graph is captured then, not between two tokens of the next
    reply), so the next turns' prefills do not grow it; the greedy replies stay the recipe's."""
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    monkeypatch.setattr(static_cache, "NEXT_MESSAGE", 64)
    settings = GenerationSettings(do_sample=False, max_new_tokens=8)
    ahead, reserve, after, during = engine._grow_ahead, engine._reserve, [], []

    def grow_ahead(max_new_tokens):
        before = engine.capacity
        engine._reserve = reserve
        try:
            ahead(max_new_tokens)
        finally:
            engine._reserve = spy
        after.append((before, engine.capacity, len(engine.cached_ids)))

    def spy(needed):  # a turn's own prefill
        before = engine.capacity
        reserve(needed)
        during.append(engine.capacity > before)

    engine._grow_ahead, engine._reserve = grow_ahead, spy
    greedy_turns_equal_the_recipe(engine, classic, settings)
    assert len(after) == 3 and any(capacity > before for before, capacity, _ in after)
    assert all(capacity >= held + 64 + 8 for _, capacity, held in after)
    assert during[0] and not any(during[1:])  # only the first turn built a cache


def chunks_of(total, step=1):
    ends, start = [], 0
    while start < total:
        start = fast._chunk_end(0, start, total, step)
        ends.append(start)
    return [b - a for a, b in zip([0] + ends, ends)]


def test_prefill_chunks():
    """Up to 1.5 × PREFILL_CHUNK tokens in one forward; more in equal chunks of about PREFILL_CHUNK, at most
    MOST_CHUNKS of them (each chunk dequantizes every 4-bit weight again); padded prefills' chunks are multiples of
    the step (only the last one padded)."""
    assert fast.PREFILL_CHUNK == 2730 and fast.MOST_CHUNKS == 3
    assert chunks_of(4095) == [4095]
    assert chunks_of(6000) == [2000, 2000, 2000]
    assert chunks_of(8000) == [2667, 2667, 2666]
    assert chunks_of(8000, 128) == [2688, 2688, 2624]
    assert chunks_of(16000) == [5334, 5334, 5332]
    assert chunks_of(32000, 128) == [10752, 10752, 10496]


def greedy_turns_equal_the_recipe(engine, classic, settings):
    """Three chat turns, each greedy reply equal to the classic recipe's; the last reply and the history."""
    history = []
    for question in ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello!"]:
        history.append({"role": "user", "content": question})
        reply = generate_reply(engine, history, settings)
        expected = classic.reply(history, settings.max_new_tokens)
        assert reply.text == expected
        history.append({"role": "assistant", "content": expected})
    return reply, history


def test_greedy_replies_equal_the_classic_recipe(engine, classic):
    reply, history = greedy_turns_equal_the_recipe(engine, classic, GenerationSettings(do_sample=False, max_new_tokens=16))
    assert reply.cached_tokens > 0
    assert reply.prompt_tokens == classic.count(history[:-1])


def test_seeded_samples_repeat(engine):
    question = [{"role": "user", "content": "Hello!"}]
    settings = GenerationSettings(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=5)
    first = generate_reply(engine, question, settings).token_ids
    assert generate_reply(engine, question, settings).token_ids == first
    assert any(generate_reply(engine, question, settings.overridden(seed=s)).token_ids != first for s in range(4))


def test_sampler_keeps_the_same_tokens_as_transformers(model_and_tokenizer):
    model, _ = model_and_tokenizer
    torch.manual_seed(0)
    logits = torch.randn(1, model.config.vocab_size) * 3
    prompt = [5, 9, 9, 40]
    settings = GenerationSettings(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3)
    theirs = transformers_scores(logits, prompt, 0.7, 20, 0.8, 1.3)
    allowed = set(torch.nonzero(theirs > float("-inf")).view(-1).tolist())
    # A fresh sampler per draw: each one also marks what it drew as seen, for the penalty.
    drawn = {int(Sampler(model, settings.overridden(seed=i), prompt, torch.device("cpu"))(logits)) for i in range(300)}
    assert drawn <= allowed and len(drawn) > 1


def test_greedy_sampler_applies_the_model_repetition_penalty(model_and_tokenizer):
    model, _ = model_and_tokenizer  # the tiny model's own config says 1.05, as Qwen2.5's does
    logits = torch.zeros(1, model.config.vocab_size)
    logits[0, 7], logits[0, 8] = 1.04, 1.0
    sampler = Sampler(model, GenerationSettings(do_sample=False), [7], torch.device("cpu"))
    assert int(sampler(logits)) == 8  # 1.04 / 1.05 < 1.0


def test_interrupt_during_fast_decode(model_and_tokenizer, endless_model_dir):
    engine = FastEngine(AutoModelForCausalLM.from_pretrained(endless_model_dir), AutoTokenizer.from_pretrained(endless_model_dir),
                        context_length=4096, use_graph=False)
    stream = engine.start([{"role": "user", "content": "Write forever."}], GenerationSettings(do_sample=False, max_new_tokens=3000))
    for count, _ in enumerate(stream):
        if count == 4:
            stream.stop()
            break
    reply = stream.result
    assert reply.finish_reason == "interrupted" and 5 <= reply.new_tokens < 3000
    # The next turn reuses what the interrupted one left in the cache.
    follow = engine.start([{"role": "user", "content": "Write forever."}, {"role": "assistant", "content": reply.text},
                           {"role": "user", "content": "Stop."}], GenerationSettings(do_sample=False, max_new_tokens=3))
    list(follow)
    assert follow.result.new_tokens == 3 and follow.result.cached_tokens > 10


def test_an_error_drops_the_cache_and_reaches_the_caller(engine, monkeypatch):
    question = [{"role": "user", "content": "Hello!"}]
    generate_reply(engine, question, GenerationSettings(do_sample=False, max_new_tokens=4))
    assert engine.cached_ids

    def broken(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(engine, "step", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        generate_reply(engine, question, GenerationSettings(do_sample=False, max_new_tokens=4))
    assert engine.cached_ids == []
    monkeypatch.undo()
    assert generate_reply(engine, question, GenerationSettings(do_sample=False, max_new_tokens=4)).new_tokens == 4


@pytest.mark.parametrize("length", [1, 5])
def test_grouped_attention_equals_sdpa(length):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from qwen_magic.fast import grouped_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 7, True
    query = torch.randn(1, 28, length, 16)
    key, value = torch.randn(1, 4, 40, 16), torch.randn(1, 4, 40, 16)
    mask = torch.zeros(1, 1, length, 40, dtype=torch.bool)
    for row in range(length):
        mask[0, 0, row, : 20 + row + 1] = True  # 20 cached tokens, then causal; the rest are stale slots
    ours, _ = grouped_attention(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (1, length, 28, 16)
    assert relative_error(ours, theirs) < 1e-5


def test_the_fast_engine_uses_grouped_attention_and_gives_it_back(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = FastEngine(model, tokenizer, context_length=4096, use_graph=False)
    assert model.config._attn_implementation == fast.ATTENTION
    engine.close()
    assert model.config._attn_implementation == "sdpa"


def test_growing_the_cache_keeps_what_it_held(engine, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(static_cache, "CAPACITY_STEP", 64)
    first = tokenizer("Hello! How are you today?", add_special_tokens=False)["input_ids"]
    forced_logits(engine, first, first)
    held, small = list(engine.cached_ids), engine.capacity
    longer = held + first * 6
    got = forced_logits(engine, longer, first)
    assert engine.capacity > small
    assert engine.reused == len(held)  # carried over, not prefilled again
    assert relative_error(got, reference_logits(model, longer, first)) < 1e-5
