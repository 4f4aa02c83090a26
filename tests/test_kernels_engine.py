"""The fast engine with qwen_magic.kernels, on the CPU through Triton's interpreter.

Decode steps take the kernels (NF4 matvec, fused norms, rotary embedding and SiLU·mul);
the prefill takes the fused ones only (its 4-bit products stay bitsandbytes'); anything
outside the engine (transformers' generate on the same model) keeps the stock path; greedy replies equal the classic recipe's over turns; closing the
engine puts every module back. The interpreter must be chosen before triton is imported,
so the test runs in a child process (``test_in_interpreter``), as tests/test_fused.py does.
"""

import os

import pytest
from interpreter import run_in_interpreter

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

CHILD = os.environ.get("QWEN_MAGIC_KERNELS_CHILD") == "1"
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


@pytest.mark.skipif(CHILD, reason="the parent starts the child")
def test_in_interpreter():
    result = run_in_interpreter(__file__, "QWEN_MAGIC_KERNELS_CHILD")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]  # the child ran the engine test


def quantize_linears(model):
    """The decoder layers' linear layers in bitsandbytes NF4 (double quantized), on the CPU."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                    quantized.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                                         compress_statistics=True)
                    if child.bias is not None:
                        quantized.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                    quantized = quantized.to("cpu")
                    quantized.support_avx512bf16_for_cpu = False  # keep bitsandbytes' own layout on the CPU
                    setattr(parent, name, quantized)


@pytest.mark.skipif(not CHILD, reason="runs in the TRITON_INTERPRET=1 child (test_in_interpreter)")
def test_decode_steps_take_the_kernels_and_replies_equal_the_recipe(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_magic.engine import generate_reply
    from qwen_magic.fast import FastEngine
    from qwen_magic.kernels import fused, nf4
    from qwen_magic.settings import GenerationSettings
    from qwen_magic.tiny import write_tiny_model

    path = write_tiny_model(tmp_path / "tiny", **SHAPE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    quantize_linears(model)

    monkeypatch.setattr(nf4, "ALLOW_CPU", True)
    monkeypatch.setattr(nf4, "available", lambda device=None: None)
    monkeypatch.setattr(fused, "available", lambda device=None: None)
    fused.force_kernels(True)
    calls = {"norm": 0, "matvec": 0}
    norm, matvec = fused.rms_norm, nf4.Plan.__call__

    def counted_norm(*args, **kwargs):
        calls["norm"] += 1
        return norm(*args, **kwargs)

    def counted_matvec(*args, **kwargs):
        calls["matvec"] += 1
        return matvec(*args, **kwargs)

    monkeypatch.setattr(fused, "rms_norm", counted_norm)
    monkeypatch.setattr(nf4.Plan, "__call__", counted_matvec)
    try:
        engine = FastEngine(model, tokenizer, context_length=1024, kernels=True)
        assert sorted(module.__name__.rsplit(".", 1)[-1] for module in engine.kernels) == ["fused", "nf4"]
        assert engine.name.endswith("+ Triton kernels")

        def recipe(messages, new_tokens):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tokenizer([text], return_tensors="pt")
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
            return tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True)

        settings = GenerationSettings(do_sample=False, max_new_tokens=10)
        history = []
        for question in ["介绍广州这座城市", "它有什么好吃的美食吗?", "Hello!"]:
            history.append({"role": "user", "content": question})
            before = dict(calls)
            expected = recipe(history, 10)
            assert calls == before  # generate on the same model, outside the engine: the stock path
            with torch.inference_mode():
                engine.prefill(engine.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                                    return_dict=False))
            # a prefill takes the fused norms (and rotary, SiLU·mul), not the 4-bit matrix-vector kernel
            assert calls["matvec"] == before["matvec"] and calls["norm"] > before["norm"]
            before = dict(calls)
            reply = generate_reply(engine, history, settings)
            assert reply.text == expected
            if reply.new_tokens > 1:
                assert calls["norm"] > before["norm"] and calls["matvec"] > before["matvec"]  # decode steps took them
            history.append({"role": "assistant", "content": expected})
        assert reply.cached_tokens > 0
        engine.close()
        assert not any(nf4.is_patched(module) for module in model.modules())
        assert "forward" not in model.model.norm.__dict__  # the fused patch is gone too
    finally:
        fused.force_kernels(False)
