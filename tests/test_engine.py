"""The generation layer on its own: no IPython, the tiny model on the CPU."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_magic.engine import GenerateEngine, IncrementalDecoder, generate_reply
from qwen_magic.settings import GenerationSettings

GREEDY = GenerationSettings(do_sample=False, max_new_tokens=24)
QUESTION = [{"role": "user", "content": "介绍广州这座城市"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return GenerateEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def endless(endless_model_dir):
    return GenerateEngine(AutoModelForCausalLM.from_pretrained(endless_model_dir), AutoTokenizer.from_pretrained(endless_model_dir))


def test_greedy_reply_equals_the_classic_recipe(tiny, classic):
    reply = generate_reply(tiny, QUESTION, GREEDY)
    assert reply.text == classic.reply(QUESTION, 24)
    assert reply.prompt_tokens == classic.count(QUESTION)


def test_streamed_pieces_add_up_to_the_reply(tiny):
    stream = tiny.start(QUESTION, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == generate_reply(tiny, QUESTION, GREEDY).text


def test_decoder_never_releases_half_a_character(tiny):
    tokenizer = tiny.tokenizer
    text = "介绍广州这座城市。它有什么好吃的美食吗?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # several tokens per character: characters are split across tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text == decoder.text()


def test_length_and_stop_reasons(endless, tiny):
    reply = generate_reply(endless, QUESTION, GenerationSettings(do_sample=False, max_new_tokens=7))
    assert reply.finish_reason == "length" and reply.new_tokens == 7
    assert reply.tokens_per_second and reply.first_token_seconds is not None


def test_stop_keeps_the_partial_reply(endless):
    stream = endless.start(QUESTION, GenerationSettings(do_sample=False, max_new_tokens=100_000))
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 5:
            stream.stop()
            break
    reply = stream.result
    assert reply.finish_reason == "interrupted"
    assert 5 <= reply.new_tokens < 1000
    assert reply.text.startswith("".join(pieces))


def test_an_error_in_the_worker_thread_reaches_the_caller(tiny, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(tiny.model, "generate", broken)
    stream = tiny.start(QUESTION, GREEDY)
    with pytest.raises(RuntimeError, match="simulated"):
        list(stream)


def test_sampling_with_a_seed_is_reproducible(tiny):
    settings = GenerationSettings(max_new_tokens=16, seed=1234, temperature=1.0, top_p=0.95)
    first = generate_reply(tiny, QUESTION, settings)
    assert generate_reply(tiny, QUESTION, settings).token_ids == first.token_ids
    other = [generate_reply(tiny, QUESTION, settings.overridden(seed=s)).token_ids for s in range(4)]
    assert any(ids != first.token_ids for ids in other)


def test_a_replys_time_ends_at_its_last_token():
    """What a producer does after its last token (the fast engine grows its cache or captures graphs there) is not
    counted in the reply's time, when the producer says when it finished."""
    import time

    from qwen_magic.engine import ReplyStream

    info = {}

    def produce(emit, stop_event):
        emit("广州")  # text pieces, as a server's producer emits them
        emit("美食")
        info["finished_at"] = time.perf_counter()
        time.sleep(0.5)

    stream = ReplyStream(None, 3, produce, max_new_tokens=2, end_ids=set(), info=info)
    list(stream)
    assert stream.result.text == "广州美食" and stream.result.seconds < 0.5
