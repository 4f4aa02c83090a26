"""The sampling kernels (qwen_magic.kernels.sample) against transformers' logits processors, on the CPU through
Triton's interpreter (a child pytest with TRITON_INTERPRET=1, as tests/interpreter.py explains).

What is asserted: a greedy pick equals the argmax of the penalized scores (ties: the first), with and without
the repetition penalty, the mask of seen tokens updated as the PyTorch sampler updates it; a draw always lies in
the set transformers' RepetitionPenalty + Temperature + TopK + TopP processors keep, every kept token is drawn
over many draws when the set is small, draws follow the probabilities (frequencies within a few standard
errors), top-k ties at the k-th score are kept, a seed repeats its draws and another seed changes them, and the
Sampler takes the kernel (and keeps PyTorch's way for top_k=0). The GPU run: tests/test_gpu_nf4.py's
sampler tests.
"""

import importlib.util
import os

import pytest
import torch
from helpers import transformers_scores
from interpreter import assert_passes_in_interpreter

CHILD = os.environ.get("QWEN_MAGIC_SAMPLE_CHILD") == "1"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
child_only = pytest.mark.skipif(not CHILD, reason="runs in the interpreter child")


@pytest.mark.skipif(CHILD, reason="the parent's launcher")
def test_kernels_in_the_interpreter():
    assert_passes_in_interpreter(__file__, "QWEN_MAGIC_SAMPLE_CHILD", "-x")


def seen_mask(vocab, prompt):
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[torch.tensor(prompt)] = True
    return seen


@child_only
@pytest.mark.parametrize("vocab", [1000, 4100])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_is_the_argmax(vocab, penalty):
    from qwen_magic.kernels.sample import SampleKernel

    generator = torch.Generator().manual_seed(vocab)
    prompt = list(range(0, vocab, 7))
    for trial in range(4):
        logits = (torch.randn(1, vocab, generator=generator) * 3).half()
        if trial == 1:
            logits[0, 17] = logits[0, 900] = logits.max() + 1  # a tie: the first wins
        seen = seen_mask(vocab, prompt)
        scores = logits.float()
        expected = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores).argmax(dim=-1)
        kernel = SampleKernel(vocab, "cpu", greedy=True, penalty=penalty)
        token = kernel(logits, seen)
        assert token.shape == (1, 1) and token.dtype == torch.int64
        assert int(token) == int(expected)
        assert bool(seen[int(token)])  # marked for the penalty of later tokens


@child_only
@pytest.mark.parametrize("top_k,top_p,draws", [(20, 0.9, 200), (50, 0.8, 40), (5, 1.0, 200), (20, 0.3, 100)])
def test_draws_stay_in_what_transformers_keeps(top_k, top_p, draws):
    from qwen_magic.kernels.sample import SampleKernel

    vocab, prompt = 700, [5, 9, 40, 41]
    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(1, vocab, generator=generator) * 2
    kept = transformers_scores(logits, prompt, 0.7, top_k, top_p, 1.05)
    allowed = set(torch.nonzero(kept > float("-inf")).view(-1).tolist())
    probs = kept.softmax(-1)
    # small blocks, and the candidates scored once: the interpreter is slow (the GPU test draws end to end)
    kernel = SampleKernel(vocab, "cpu", temperature=0.7, top_k=top_k, top_p=top_p, penalty=1.05, seed=3, block=256, chunk=64)
    kernel.score(logits, seen_mask(vocab, prompt))
    counts = torch.zeros(vocab)
    out = torch.empty((1, 1), dtype=torch.int64)
    for _ in range(draws):
        kernel.pick(out)
        counts[int(out)] += 1
    drawn = set(torch.nonzero(counts).view(-1).tolist())
    assert drawn <= allowed
    if len(allowed) <= 6:
        assert drawn == allowed
    if draws < 100:
        return  # (the interpreter is slow: membership only for the widest set)
    # frequencies follow the probabilities: within 5 standard errors (plus a little) for every kept token
    expected = probs * draws
    spread = (probs * (1 - probs) * draws).sqrt()
    assert ((counts - expected).abs() <= 5 * spread + 2).all()


@child_only
def test_top_k_keeps_ties_and_top_p_keeps_the_largest():
    from qwen_magic.kernels.sample import SampleKernel

    vocab = 400
    logits = torch.full((1, vocab), -5.0)
    logits[0, [10, 11, 12]] = 3.0  # three equal scores at the top, top_k = 2 keeps all three (as transformers does)
    kept = transformers_scores(logits, [0], 1.0, 2, 1.0, 1.0)
    assert set(torch.nonzero(kept > float("-inf")).view(-1).tolist()) == {10, 11, 12}
    kernel = SampleKernel(vocab, "cpu", top_k=2, seed=0, block=256, chunk=64)
    kernel.score(logits)
    out = torch.empty((1, 1), dtype=torch.int64)
    assert {int(kernel.pick(out) or out) for _ in range(60)} == {10, 11, 12}
    logits[0, 10] = 9.0  # top_p this small keeps only the largest
    kernel = SampleKernel(vocab, "cpu", top_k=20, top_p=0.01, seed=0, block=256, chunk=64)
    assert {int(kernel(logits)) for _ in range(3)} == {10}


@child_only
def test_seeds():
    from qwen_magic.kernels.sample import SampleKernel

    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(1))
    runs = {}
    out = torch.empty((1, 1), dtype=torch.int64)
    for seed in (7, 7, 8):
        kernel = SampleKernel(500, "cpu", temperature=1.0, top_k=50, top_p=0.95, seed=seed, block=256, chunk=64)
        kernel.score(logits)
        runs.setdefault(seed, []).append([int(kernel.pick(out) or out) for _ in range(30)])
    assert runs[7][0] == runs[7][1]
    assert runs[8][0] != runs[7][0]


@child_only
def test_the_sampler_takes_the_kernel(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qwen_magic.kernels import sample
    from qwen_magic.sampler import Sampler
    from qwen_magic.settings import GenerationSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 3
    prompt = [5, 9, 9, 40]
    settings = GenerationSettings(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.3)
    sampler = Sampler(model, settings, prompt, torch.device("cpu"), kernels=[sample])
    assert sampler.kernel is not None
    kept = transformers_scores(logits, prompt, 0.7, 20, 0.8, 1.3)
    allowed = set(torch.nonzero(kept > float("-inf")).view(-1).tolist())
    drawn = {int(Sampler(model, settings.overridden(seed=i), prompt, torch.device("cpu"), kernels=[sample])(logits)) for i in range(6)}
    assert drawn <= allowed and len(drawn) > 1
    greedy = Sampler(model, GenerationSettings(do_sample=False), prompt, torch.device("cpu"), kernels=[sample])
    plain = Sampler(model, GenerationSettings(do_sample=False), prompt, torch.device("cpu"))
    assert greedy.kernel is not None and int(greedy(logits)) == int(plain(logits))
    assert torch.equal(greedy.seen, plain.seen)
    assert Sampler(model, settings.overridden(top_k=0), prompt, torch.device("cpu"), kernels=[sample]).kernel is None


def compile_for(capability, kernel, signature, constants, warps=4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature, **{name: "constexpr" for name in constants})
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=warps))


@pytest.mark.skipif(CHILD, reason="compiles the real kernels (not the interpreter's)")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75-T4", "sm90-H100"])
def test_compiles_for_t4_and_h100(capability):
    """Both kernels build for sm_75 as for sm_90, greedy and sampling, with and without the penalty."""
    try:
        from qwen_magic.kernels import _sample_triton as kernels

        for greedy, k in ((True, 1), (False, 32), (False, 64)):
            compile_for(capability, kernels.candidates_kernel,
                        dict(logits_ptr="*fp16", seen_ptr="*i1", keys_ptr="*i64", V="i32", penalty="fp32", inv_penalty="fp32",
                             inv_temperature="fp32"),
                        dict(BLOCK=1024, K=k, PENALTY=True, SCALE=not greedy), warps=8)
            compile_for(capability, kernels.finish_kernel,
                        dict(keys_ptr="*i64", count="i32", out_ptr="*i64", seen_ptr="*i1", draws_ptr="*i64", seed="i32", top_k="i32",
                             threshold="fp32"),
                        dict(K=k, GREEDY=greedy, TOP_K=not greedy, TOP_P=not greedy, MARK=True, CHUNK=512))
    except (ImportError, TypeError, AttributeError) as error:  # another triton's compile API
        pytest.skip(f"ahead-of-time compile API differs: {error}")


@child_only
def test_check_passes_in_the_interpreter():
    from qwen_magic.kernels import sample

    import torch

    assert sample.check("cpu") is None and sample.check("cpu", torch.float16) is None
