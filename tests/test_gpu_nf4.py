"""The batch-1 4-bit kernel (qwen_magic/kernels/nf4.py) on a CUDA GPU, on Qwen2.5-7B's projection
shapes, against bitsandbytes' dequantized weight and its own batch-1 product; CUDA-graph capture and
replay; patch() on a small model. Skipped without a GPU, bitsandbytes or triton (CPU checks of the
same kernel: tests/test_nf4.py)."""

import importlib.util
import os

import pytest
import torch

from qwen_magic.kernels import nf4_half

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only (TRITON_INTERPRET=1 is set)"),
]

# (N, K) of Qwen2.5-7B: q/o, k/v, gate/up, down.
SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]
DTYPES = ["float16", "bfloat16", "float32"]


@pytest.fixture(scope="module", autouse=True)
def usable():
    from qwen_magic.kernels import nf4

    reason = nf4.available()
    if reason:
        pytest.skip(reason)


def quantized(n, k, nested, blocksize=64, seed=0):
    from bitsandbytes import functional as F

    generator = torch.Generator(device="cuda").manual_seed(seed)
    # quantized from float32, so dequantize_4bit gives the float32 weight each compute dtype rounds from
    weight = torch.randn(n, k, device="cuda", generator=generator, dtype=torch.float32) * 0.02
    return F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


def reference(x, packed, state, bias, dtype):
    """bitsandbytes' dequantized weight in the compute dtype; the product in float64 on the GPU."""
    from bitsandbytes import functional as F

    weight = F.dequantize_4bit(packed, state).float().to(dtype).double()
    y = x.double().reshape(1, -1) @ weight.t()
    if bias is not None:
        y = y + bias.double()
    size = x.double().abs().reshape(1, -1) @ weight.abs().t()
    return y.reshape(-1), size.reshape(-1)


def assert_close(y, ref, size, dtype):
    eps = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    error = (y.double().reshape(-1) - ref).abs()
    limit = eps * ref.abs() + 1e-5 * size + 1e-7
    assert bool((error <= limit).all()), f"max error {error.max().item():.3g}, worst ratio {(error / limit).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_qwen_shapes(n, k, dtype):
    import bitsandbytes as bnb

    from qwen_magic.kernels import nf4

    dtype = getattr(torch, dtype)
    for nested in (False, True):
        packed, state = quantized(n, k, nested)
        generator = torch.Generator(device="cuda").manual_seed(n + k)
        x = torch.randn(1, k, device="cuda", dtype=dtype, generator=generator)
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=generator) if n == 512 else None  # Qwen2's k/v carry a bias
        ref, size = reference(x, packed, state, bias, dtype)
        y = nf4.matvec(x, packed, state, bias=bias)
        assert y.shape == (1, n) and y.dtype == dtype
        if dtype == torch.float16:  # the float16 kernel: bitsandbytes' float16 arithmetic (checked exactly below)
            half, half_size = nf4_half.bnb_arithmetic(x, packed, state, bias)
            assert_half(y, half, half_size)
            # against the float32-dequantized weight: each product rounded up to three times (code, scale, x)
            error = (y.double().reshape(-1) - ref).abs()
            assert bool((error <= 2.0 ** -10 * ref.abs() + 3 * 2.0 ** -11 * size + 1e-6).all())
        else:
            assert_close(y, ref, size, dtype)
        # bitsandbytes' own batch-1 product (gemv_4bit), which may round inside its sum: a looser check
        theirs = bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias).double().reshape(-1)
        eps = {torch.float32: 1e-4, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
        error = (y.double().reshape(-1) - theirs).abs()
        assert bool((error <= 2 * eps * ref.abs() + eps * size + 1e-6).all()), f"max difference from bnb.matmul_4bit {error.max().item():.3g}"


def assert_half(y, reference, size):
    """The float16 kernel against its arithmetic done by PyTorch: only the output's float16 rounding and
    the float32 summation order may differ."""
    error = (y.double().reshape(-1) - reference).abs()
    limit = 2.0 ** -10 * reference.abs() + 2.0 ** -16 * size + 1e-6
    assert bool((error <= limit).all()), f"max error {error.max().item():.3g}, worst ratio {(error / limit).max().item():.3g}"


HALF_CONFIGS = [(4, 4, 1), (1, 1, 1), (2, 2, 3), (8, 4, 2), (4, 1, 4), (1, 8, 1)]


@pytest.mark.parametrize("cfg", HALF_CONFIGS, ids=[f"r{r}-w{w}-s{s}" for r, w, s in HALF_CONFIGS])
@pytest.mark.parametrize("n,k", [(512, 3584), (3584, 18944), (100, 1088)], ids=["kv", "down", "ragged"])
def test_half_kernel_tiles(n, k, cfg):
    """The float16 kernel over tile shapes, K splits, rows and K that do not fill a tile, nested or not, with a bias."""
    from qwen_magic.kernels import nf4

    rows, warps, splits = cfg
    for nested in (False, True):
        packed, state = quantized(n, k, nested, seed=n + k)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        y = nf4.matvec(x, packed, state, bias=bias, cfg=nf4_half.HalfConfig(rows=rows, num_warps=warps, splits=splits))
        assert y.shape == (1, n) and y.dtype == torch.float16
        assert_half(y, *nf4_half.bnb_arithmetic(x, packed, state, bias))


def test_half_check_passes():
    assert nf4_half.check(torch.device("cuda")) is None


@pytest.mark.parametrize("variant", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["pairs-asm", "pairs-load", "strided-asm", "strided-load"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n,k", [(512, 3584), (3584, 3584)], ids=["split", "rows"])
def test_variants(n, k, dtype, variant):
    """Each way of reading x (pairs / strided) and of looking up the table (inline PTX / tl.load)."""
    from qwen_magic.kernels import nf4

    dtype = getattr(torch, dtype)
    x_pairs, gather_asm = variant
    packed, state = quantized(n, k, nested=n == 512)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    ref, size = reference(x, packed, state, None, dtype)
    cfg = nf4.config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)._replace(x_pairs=x_pairs, gather_asm=gather_asm)
    assert_close(nf4.matvec(x, packed, state, cfg=cfg), ref, size, dtype)


@pytest.mark.parametrize("n,k", [(512, 3584), (3584, 3584)], ids=["split", "rows"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_replay_equals_eager(n, k, dtype):
    from qwen_magic.kernels import nf4

    dtype = getattr(torch, dtype)
    packed, state = quantized(n, k, nested=False)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    static_x = torch.randn(1, k, device="cuda", dtype=dtype)
    nf4.matvec(static_x, packed, state, bias=bias)  # compile outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nf4.matvec(static_x, packed, state, bias=bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = nf4.matvec(static_x, packed, state, bias=bias)
    for seed in range(3):
        x = torch.randn(1, k, device="cuda", dtype=dtype, generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, nf4.matvec(x, packed, state, bias=bias))  # deterministic: bit for bit


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_patch_on_gpu(compute):
    import bitsandbytes as bnb

    from qwen_magic.kernels import decoding, nf4

    compute = getattr(torch, compute)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(256, 512, bias=True, compute_dtype=compute, quant_type="nf4"),
        torch.nn.SiLU(),
        bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=compute, quant_type="nf4", compress_statistics=True),
    ).to("cuda")
    x = torch.randn(1, 1, 256, device="cuda", dtype=compute)
    with torch.no_grad():
        expected = model(x)
    restore = nf4.patch(model)
    calls = []
    kind = nf4_half.HalfPlan if compute == torch.float16 else nf4.Plan  # the float16 kernel for float16 compute
    original = kind.__call__
    try:
        kind.__call__ = lambda *a, **kw: calls.append(1) or original(*a, **kw)
        with torch.no_grad(), decoding():  # as in a fast engine's decode step (with an engine open, only there)
            y = model(x)
            rows = model(torch.randn(2, 256, device="cuda", dtype=compute))
        assert len(calls) == 2 and rows.shape == (2, 256)
        assert torch.allclose(y.float(), expected.float(), rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    finally:
        kind.__call__ = original
        restore()
    assert not any(nf4.is_patched(m) for m in model.modules())


@pytest.mark.parametrize("sizes,k,bias", [((3584, 512, 512), 3584, True), ((18944, 18944), 3584, False), ((64, 32, 32), 1024, True)],
                         ids=["qkv", "gate-up", "small"])
@pytest.mark.parametrize("nested", [False, True])
def test_group_plan_equals_separate_launches(sizes, k, bias, nested):
    """Weights that share x in one launch: each weight's rows are the same bits as its own launch with the first
    weight's tile configuration (Qwen2.5-7B's q/k/v and gate/up take the same configuration, so the same as today)."""
    members = [quantized(n, k, nested, seed=n + i) for i, n in enumerate(sizes)]
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    biases = [torch.randn(n, device="cuda", dtype=torch.float16) for n in sizes] if bias else None
    group = nf4_half.GroupPlan(members, torch.device("cuda"))
    y = group(x, torch.cat(biases) if bias else None)
    assert y.shape == (sum(sizes),) and group.sizes == list(sizes)
    cfg = group.cfg
    for i, ((packed, state), part) in enumerate(zip(members, y.split(sizes))):
        own = nf4_half.HalfPlan(packed, state, torch.device("cuda"), cfg)(x, biases[i] if bias else None)
        assert torch.equal(part, own)
        assert_half(part, *nf4_half.bnb_arithmetic(x, packed, state, biases[i] if bias else None))


def test_groups_in_a_patched_model_give_the_same_bits():
    """q/k/v and gate/up of a patched module run as groups in decode steps: one launch each, outputs equal to one
    launch a layer, bit for bit; QWEN_MAGIC_NF4_GROUP=0 (or another order of calls) falls back."""
    import bitsandbytes as bnb

    from qwen_magic.kernels import decoding, nf4, nf4_group

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (bnb.nn.Linear4bit(1024, n, bias=True, compute_dtype=torch.float16)
                                                     for n in (1024, 256, 256))
            self.gate_proj, self.up_proj = (bnb.nn.Linear4bit(1024, 2048, bias=False, compute_dtype=torch.float16) for _ in range(2))

        def forward(self, h, order=(0, 1, 2)):
            projections = [self.q_proj, self.k_proj, self.v_proj]
            out = [projections[i](h) for i in order]
            return torch.cat(out + [self.gate_proj(h) * self.up_proj(h)], dim=-1)

    torch.manual_seed(0)
    block = Block().to("cuda")
    h = torch.randn(1, 1, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        block(torch.randn(2, 1024, device="cuda", dtype=torch.float16))  # bitsandbytes sets its compute dtype
    restore = nf4.patch(block)
    launches = []
    original = nf4_half.HalfPlan.__call__
    try:
        nf4_half.HalfPlan.__call__ = lambda self, *a, **kw: launches.append(type(self).__name__) or original(self, *a, **kw)
        with torch.no_grad(), decoding():
            grouped = block(h)
            assert launches == ["GroupPlan", "GroupPlan"]
            launches.clear()
            nf4_group.GROUPS = False
            separate = block(h)
            assert launches == ["HalfPlan"] * 5
            nf4_group.GROUPS = True
            launches.clear()
            reordered = block(h, order=(1, 0, 2))  # k first: k alone, then q's group (whose k output goes unused)
            assert launches[0] == "HalfPlan"
        assert torch.equal(grouped, separate)
        assert torch.equal(reordered[..., 256:1280], grouped[..., :1024]) and torch.equal(reordered[..., :256], grouped[..., 1024:1280])
    finally:
        nf4_group.GROUPS = True
        nf4_half.HalfPlan.__call__ = original
        restore()
    assert not any(nf4_group.of(m) for m in block.modules())


@pytest.mark.parametrize("penalty", [1.0, 1.05])
def test_sampling_kernel_on_the_gpu(penalty):
    """Qwen2.5's vocabulary: greedy picks equal PyTorch's argmax of the penalized scores (float16 logits, so with
    ties), and draws stay in what transformers' processors keep, following their probabilities."""
    from helpers import transformers_scores

    from qwen_magic.kernels.sample import SampleKernel

    vocab, prompt = 152064, list(range(0, 152064, 997))
    generator = torch.Generator(device="cuda").manual_seed(0)
    for trial in range(20):
        logits = (torch.randn(1, vocab, device="cuda", generator=generator) * 4).half()
        seen = torch.zeros(vocab, dtype=torch.bool, device="cuda")
        seen[torch.tensor(prompt, device="cuda")] = True
        scores = logits.float()
        expected = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores).argmax(dim=-1)
        assert int(SampleKernel(vocab, "cuda", greedy=True, penalty=penalty)(logits, seen)) == int(expected)
    logits = (torch.randn(1, vocab, device="cuda", generator=generator) * 3).half()
    probs = transformers_scores(logits, prompt, 0.7, 20, 0.9, penalty).softmax(-1)
    kernel = SampleKernel(vocab, "cuda", temperature=0.7, top_k=20, top_p=0.9, penalty=penalty, seed=1)
    seen = torch.zeros(vocab, dtype=torch.bool, device="cuda")
    seen[torch.tensor(prompt, device="cuda")] = True
    draws = 4000
    counts = torch.zeros(vocab, device="cuda")
    for _ in range(draws):
        counts[kernel(logits, seen.clone()).view(-1)] += 1
    assert bool((counts[probs == 0] == 0).all())
    spread = (probs * (1 - probs) * draws).sqrt()
    assert bool(((counts - probs * draws).abs() <= 5 * spread + 2).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_prefill_dequantization_is_bitsandbytes(n, k, nested, dtype):
    """nf4_prefill's one-kernel dequantization: bitsandbytes' dequantize_4bit bit for bit, each compute dtype."""
    from bitsandbytes import functional as F

    from qwen_magic.kernels import nf4_prefill

    dtype = getattr(torch, dtype)
    packed, state = quantized(n, k, nested, seed=n + k)
    state.dtype = dtype  # bitsandbytes dequantizes straight into the compute dtype, as in a model of that dtype
    assert torch.equal(nf4_prefill.dequantize(packed, state, dtype), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_prefill_rows_on_gpu(monkeypatch, compute):
    """A patched Linear4bit in the engine's prefill: MIN_ROWS rows and more give exactly F.linear of bitsandbytes'
    dequantized weight (its own path past 1,536 rows), and bitsandbytes' forward within rounding at any count;
    the load-time check passes here."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    from qwen_magic import kernels
    from qwen_magic.kernels import nf4, nf4_prefill

    compute = getattr(torch, compute)
    nf4_prefill.check(torch.device("cuda"), compute)
    assert nf4_prefill.OFF == ""
    if not nf4_prefill.used_on(torch.device("cuda")):
        pytest.skip("this card keeps bitsandbytes' prefill path")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(3584, 512, bias=True, compute_dtype=compute, quant_type="nf4").cuda()
    with torch.no_grad():
        layer(torch.randn(2, 3584, device="cuda", dtype=compute))
    restore = nf4.patch(layer)
    monkeypatch.setattr(kernels, "_engines", 1)
    weight = F.dequantize_4bit(layer.weight, layer.weight.quant_state).to(compute)
    try:
        for rows in (nf4_prefill.MIN_ROWS, 100, 2000):
            x = torch.randn(1, rows, 3584, device="cuda", dtype=compute)
            with torch.inference_mode(), kernels.prefilling():
                y = layer(x)
            theirs = bnb.nn.Linear4bit.forward(layer, x)
            assert torch.equal(y, torch.nn.functional.linear(x, weight, layer.bias.to(compute)))
            assert torch.allclose(y.float(), theirs.float(), rtol=2e-2, atol=2e-2 * theirs.abs().max().item())
    finally:
        restore()
