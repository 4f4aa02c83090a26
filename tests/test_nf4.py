"""The batch-1 4-bit kernel (qwen_magic/kernels/nf4.py) against bitsandbytes' own dequantization, on
the CPU through Triton's interpreter; on the GPU: tests/test_gpu_nf4.py.

The interpreter must be chosen before anything imports triton (bitsandbytes does), so a plain run
starts this file once more in a fresh process with TRITON_INTERPRET=1 (``test_in_interpreter``);
there the kernel tests run, here they skip. ``TRITON_INTERPRET=1 pytest tests/test_nf4.py`` runs
them directly. Skipped without triton (the Colab tier) or bitsandbytes.

Tolerances (the kernel sums in float32, in another order than the reference, and rounds once):
float32 output within 1e-5 of ``sum |x||w|`` (the size the summation errors scale with); float16 and
bfloat16 within one rounding step of the output (eps * |y|) plus the same.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

HAVE = all(importlib.util.find_spec(name) is not None for name in ("torch", "triton", "bitsandbytes"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(not HAVE, reason="needs torch, triton and bitsandbytes")
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process (test_in_interpreter)")


def test_import_stays_light():
    """``import qwen_magic.kernels.nf4`` and ``available`` import neither torch nor triton up front."""
    code = "import sys, qwen_magic, qwen_magic.kernels.nf4; assert 'torch' not in sys.modules and 'triton' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'triton')))[:5]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted run")
def test_in_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-3000:]


def test_available_says_why_not():
    import torch

    from qwen_magic.kernels import nf4

    assert nf4.available("cpu") == "the device is cpu, not CUDA"
    if not torch.cuda.is_available():
        assert nf4.available() == "no CUDA device"


def quantized(n, k, blocksize, nested, quant_type="nf4", seed=0):
    import torch
    from bitsandbytes import functional as F

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.05
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, state


def dequantize(packed, state):
    """bitsandbytes' dequantized weight (float32). With K % blocksize != 0 the blocks run across rows,
    as bitsandbytes' quantizer and CUDA kernels lay them out; its native CPU dequantizer (0.50) restarts
    them at each row instead, so those cases use the layout written out here (checked against
    ``dequantize_4bit`` where the two agree, and against the weight itself in test_layout_reference)."""
    import torch
    from bitsandbytes import functional as F

    if state.shape[1] % state.blocksize == 0:
        return F.dequantize_4bit(packed, state).float()
    return dequantize_flat(packed, state)


def dequantize_flat(packed, state):
    import torch
    from bitsandbytes import functional as F

    n, k = state.shape
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    data = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 15], 1).reshape(-1)[: n * k].long()
    scale = absmax.float().repeat_interleave(state.blocksize)[: n * k]
    return (state.code.float()[codes] * scale).reshape(n, k)


def reference(x, packed, state, bias, dtype):
    """bitsandbytes' dequantized weight in the compute dtype, then the product in float64."""
    weight = dequantize(packed, state).to(dtype).double()
    y = x.double().reshape(1, -1) @ weight.t()
    if bias is not None:
        y = y + bias.double()
    size = x.double().abs().reshape(1, -1) @ weight.abs().t()
    return y.reshape(-1), size.reshape(-1)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_layout_reference(nested):
    """The written-out layout is bitsandbytes' where its dequantizer agrees, and reproduces the weight
    (to 4-bit precision) where blocks run across rows, which bitsandbytes' CPU dequantizer doesn't."""
    import torch
    from bitsandbytes import functional as F

    for n, k, blocksize in [(6, 256, 128), (7, 320, 128), (5, 200, 64)]:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
        packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
        written = dequantize_flat(packed, state)
        if k % blocksize == 0:
            assert torch.equal(written, F.dequantize_4bit(packed, state).float())
        else:
            own = F.dequantize_4bit(packed, state).float()
            assert (written - weight).abs().max() <= (own - weight).abs().max()
        # NF4's widest step is about a sixth of a block's absmax
        assert (written - weight).abs().max() <= 0.2 * weight.abs().max()


def assert_close(y, ref, size, dtype):
    import torch

    eps = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    error = (y.double().reshape(-1) - ref).abs()
    limit = eps * ref.abs() + 1e-5 * size + 1e-7
    assert bool((error <= limit).all()), f"max error {error.max().item():.3g}, worst ratio {(error / limit).max().item():.3g}"


DTYPES = ["float32", "float16", "bfloat16"]
# (N, K, blocksize): aligned rows, K not a multiple of the tile, blocks running across rows (K % blocksize != 0).
SHAPES = [(8, 128, 64), (5, 200, 64), (6, 256, 128), (7, 320, 128), (3, 96, 64)]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("n,k,blocksize", SHAPES)
def test_matches_bitsandbytes(n, k, blocksize, nested, dtype):
    import torch

    from qwen_magic.kernels import nf4

    dtype = getattr(torch, dtype)
    packed, state = quantized(n, k, blocksize, nested)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype) if n % 2 else None
    ref, size = reference(x, packed, state, bias, dtype)
    y = nf4.matvec(x, packed, state, bias=bias)
    assert y.shape == (1, n) and y.dtype == dtype
    assert_close(y, ref, size, dtype)


@interpreted
@pytest.mark.parametrize("cfg", [(2, 64, 3, False), (4, 128, 2, True), (1, 64, 8, True), (8, 512, 1, False)],
                         ids=["split3", "split2-bias", "split-per-step", "one-tile"])
@pytest.mark.parametrize("x_pairs", [True, False], ids=["x-pairs", "x-strided"])
def test_tiles_and_splits(cfg, x_pairs):
    """Other tile sizes, K split in slices (the last one partly past K), with and without bias, both
    ways of reading x; K = 448 is not a multiple of 128, and 9 x 440 has blocks across rows."""
    import torch

    from qwen_magic.kernels import nf4

    block_n, block_k, splits, with_bias = cfg
    for n, k, nested in [(9, 448, False), (9, 448, True), (9, 440, True)]:
        packed, state = quantized(n, k, 64, nested, seed=3)
        x = torch.randn(k, generator=torch.Generator().manual_seed(4))
        bias = torch.randn(n, generator=torch.Generator().manual_seed(5)) if with_bias else None
        ref, size = reference(x, packed, state, bias, torch.float32)
        y = nf4.matvec(x, packed, state, bias=bias, cfg=nf4.Config(block_n=block_n, block_k=block_k, splits=splits, x_pairs=x_pairs))
        assert y.shape == (n,)
        assert_close(y, ref, size, torch.float32)


@interpreted
def test_fp4_and_other_storage():
    """FP4 codes, and a weight stored as another dtype (``quant_storage``) read as its bytes."""
    import torch
    from bitsandbytes import functional as F

    from qwen_magic.kernels import nf4

    packed, state = quantized(6, 192, 64, True, quant_type="fp4")
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    ref, size = reference(x, packed, state, None, torch.bfloat16)
    assert_close(nf4.matvec(x, packed, state), ref, size, torch.bfloat16)

    weight = torch.randn(6, 192, generator=torch.Generator().manual_seed(7))
    packed16, state16 = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", quant_storage=torch.float16)
    assert packed16.dtype == torch.float16
    ref, size = reference(x.float(), packed16, state16, None, torch.float32)
    assert_close(nf4.matvec(x.float(), packed16, state16), ref, size, torch.float32)


@interpreted
def test_high_nibble_first():
    """The layout itself: element 2i is the high nibble of byte i (a hand-made weight)."""
    import torch
    from bitsandbytes import functional as F

    from qwen_magic.kernels import nf4

    weight = torch.zeros(2, 64)
    weight[0, 0] = 1.0  # code 15 (+1.0) in the high nibble of byte 0, code 7 (0.0) in the low nibble
    weight[1, 1] = -1.0
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert int(packed.reshape(-1)[0]) == 0xF7 and int(packed.reshape(-1)[32]) == 0x70
    x = torch.zeros(64)
    x[0], x[1] = 2.0, 3.0
    assert nf4.matvec(x, packed, state).tolist() == [2.0, -3.0]


def tiny_model(compute_dtype):
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True),
        torch.nn.ReLU(),
        bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=compute_dtype, quant_type="nf4"),
    ).to("cpu")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # keep bitsandbytes' own layout on the CPU
    return model


@interpreted
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_patch_routes_one_row(monkeypatch, compute):
    import torch

    from qwen_magic.kernels import nf4

    compute = getattr(torch, compute)
    model = tiny_model(compute)
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        expected = model(x)  # bitsandbytes' forward (also sets each layer's compute dtype)
        expected_rows = model(torch.randn(3, 128))

    calls = []
    run = nf4.Plan.__call__
    monkeypatch.setattr(nf4.Plan, "__call__", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    monkeypatch.setattr(nf4, "ALLOW_CPU", True)
    restore = nf4.patch(model)
    assert all(nf4.is_patched(m) for m in (model[0], model[2]))
    again = nf4.patch(model)  # idempotent: nothing more to wrap
    again()
    assert all(nf4.is_patched(m) for m in (model[0], model[2]))
    with torch.no_grad():
        y = model(x)
    assert len(calls) == 2 and y.shape == expected.shape and y.dtype == expected.dtype
    tolerance = 1e-4 if compute == torch.float32 else 3e-2
    assert torch.allclose(y, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())

    with torch.no_grad():
        rows = model(torch.randn(3, 128))  # more than one row: bitsandbytes' own path
    assert len(calls) == 2 and rows.shape == expected_rows.shape
    monkeypatch.setattr(nf4, "ALLOW_CPU", False)
    with torch.no_grad():
        model(x)  # on the CPU without ALLOW_CPU: bitsandbytes' own path
    assert len(calls) == 2

    restore()
    assert not any(nf4.is_patched(m) for m in model.modules())
    assert "forward" not in model[0].__dict__


def compile_for(capability, dtype, nested, split, tuned=True):
    """Compile the kernel ahead of time for a CUDA target (no GPU needed: triton ships ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen_magic.kernels import _nf4_triton as kernels

    pointer = f"*{dtype}"
    signature = dict(x_ptr=pointer, w_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", code_ptr="*fp32", code2_ptr="*fp32",
                     absmax2_ptr="*fp32", offset_ptr="*fp32", bias_ptr=pointer, out_ptr="*fp32" if split else pointer,
                     N="i32", K="i32", KB="i32", k_split="i32")
    constants = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, HAS_BIAS=True, ALIGNED=True, ROUND={"fp16": 1, "bf16": 2, "fp32": 0}[dtype],
                     SPLIT=split, BLOCK_N=4, BLOCK_K=1024, SUB=64, STEPS=2, X_PAIRS=tuned, GATHER_ASM=tuned)
    signature.update({name: "constexpr" for name in constants})
    aligned = {(index,): [["tt.divisibility", 16]] for index in range(13)}  # what a launch with Qwen's shapes specializes on
    source = ASTSource(fn=kernels.matvec_kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=4, num_stages=2, enable_fp_fusion=True))


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernel (not the interpreter's)")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75-T4", "sm90-H100"])
def test_compiles_for_t4_and_h100(capability):
    """The kernel builds for sm_75 as for sm_90 in every compute dtype, and reads the packed weight
    with vector loads (several bytes per instruction)."""
    try:
        compiled = [compile_for(capability, dtype, nested, split, tuned) for dtype, nested, split, tuned in
                    [("fp16", False, False, True), ("bf16", True, False, True), ("fp32", False, True, True), ("bf16", False, True, False)]]
    except (ImportError, TypeError, AttributeError) as error:  # another triton's compile API
        pytest.skip(f"ahead-of-time compile API differs: {error}")
    for kernel, nested in zip(compiled, [False, True, False, False]):
        ptx = kernel.asm["ptx"]
        # byte loads only for nested blocks' uint8 absmax (a few a thread); the weight (16 bytes a thread) comes 8 or 16 at a time
        assert ptx.count("ld.global.b8") <= 4 * int(nested) and ("ld.global.v2.b32" in ptx or "ld.global.v4.b32" in ptx)


def compile_half_for(capability, nested, split, segments=1):
    """The float16 kernel (Gluon) compiled ahead of time for a CUDA target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from qwen_magic.kernels import _nf4_half

    absmax = "*u8" if nested else "*fp32"
    signature = dict(x_ptr="*fp16", w_ptr="*u8", absmax_ptr=absmax, absmax2_ptr="*fp32", offset_ptr="*fp32",
                     w1_ptr="*u8", absmax1_ptr=absmax, absmax21_ptr="*fp32", offset1_ptr="*fp32", start1="i32",
                     w2_ptr="*u8", absmax_2_ptr=absmax, absmax22_ptr="*fp32", offset2_ptr="*fp32", start2="i32",
                     code2_ptr="*fp32", bias_ptr="*fp16", out_ptr="*fp32" if split else "*fp16", N="i32", KW="i32", w_split="i32", steps="i32",
                     **{name: "i32" for name in ("l0", "l1", "l2", "l3", "h0", "h1", "h2", "h3")})
    constants = dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=nested, HAS_BIAS=True, SPLIT=split, R=4, U=4, SEGMENTS=segments, STREAM=False,
                     LOADS_ONLY=False)
    signature.update({name: "constexpr" for name in constants})
    pointers = [i for i, (name, kind) in enumerate(signature.items()) if kind.startswith("*") or name in ("KW", "w_split")]
    aligned = {(index,): [["tt.divisibility", 16]] for index in pointers}  # what a launch with Qwen's shapes specializes on
    source = GluonASTSource(fn=_nf4_half.matvec_half_kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=2))


@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernel (not the interpreter's)")
@pytest.mark.parametrize("capability", [75, 90], ids=["sm75-T4", "sm90-H100"])
def test_half_kernel_compiles_for_t4_and_h100(capability):
    """The float16 kernel builds for sm_75 as for sm_90; in its loop each thread loads the weight and x with 16-byte
    loads and nothing goes through shared memory (the point of writing it in Gluon); one table lookup a word half."""
    import re

    try:
        compiled = [compile_half_for(capability, nested, split, segments)
                    for nested, split, segments in [(False, False, 1), (True, True, 1), (False, False, 3), (True, False, 2)]]
    except (ImportError, TypeError, AttributeError) as error:  # a triton without Gluon, or another compile API
        pytest.skip(f"Gluon ahead-of-time compile unavailable: {error}")
    for kernel in compiled:
        ptx = kernel.asm["ptx"]
        loop = ptx[ptx.find("Inner Loop"):]
        loop = loop[:loop.find("bra")]
        assert loop.count("ld.global.v4.b32") >= 8  # 4 rows of weight words + x, each 16 bytes
        assert not re.search(r"(ld|st)\.shared|bar\.sync", loop)
        assert loop.count("prmt.b32") == 4 * 4 * 16  # rows x words x (8 lookups + 2 interleaves per half word)


def test_half_table_words_hold_the_table():
    """The eight table words carry each code's float16 bits: low bytes in the first four, high bytes in the last four."""
    import numpy

    from qwen_magic.kernels import _nf4_half

    code = numpy.linspace(-1, 1, 16, dtype=numpy.float32)
    words = [w & 0xFFFFFFFF for w in _nf4_half.table_words(code)]
    bits = code.astype(numpy.float16).view(numpy.uint16)
    for index in range(16):
        low = (words[index // 4] >> (8 * (index % 4))) & 0xFF
        high = (words[4 + index // 4] >> (8 * (index % 4))) & 0xFF
        assert (high << 8) | low == bits[index]


def test_a_switched_off_float16_kernel_is_said(monkeypatch):
    """When nf4's load-time check switches its float16 kernel off, load_kernels keeps the module (the Triton kernel
    takes over) and says why in its one line, which the engine's load summary shows."""
    import torch

    from qwen_magic import kernels
    from qwen_magic.kernels import decode, fused, nf4

    def failing_check(device=None, dtype=None):
        monkeypatch.setattr(nf4, "HALF_NOTE", "the float16 4-bit kernel failed to run: RuntimeError: no sm_75 lowering")
        return None

    monkeypatch.setattr(nf4, "available", lambda device=None: None)
    monkeypatch.setattr(nf4, "check", failing_check)
    monkeypatch.setattr(fused, "available", lambda device=None: "no CUDA device")
    monkeypatch.setattr(decode, "available", lambda device=None: "no CUDA device")
    found, why = kernels.load_kernels(torch.device("cpu"), True, torch.float16)
    try:
        assert found == [nf4]
        assert "NF4 float16 kernel off (the float16 4-bit kernel failed to run: RuntimeError: no sm_75 lowering)" in why
        assert "no CUDA device" in why
    finally:
        kernels.release()


def test_siblings_share_one_launch(monkeypatch):
    """patch() marks q/k/v and gate/up as groups; the first call launches for all, the next calls with the very same
    input take their outputs; another input, order or module falls back (None: one launch a layer); restore() unmarks.
    The launch itself (nf4_half.GroupPlan) is checked bit for bit against separate launches on the GPU
    (tests/test_gpu_nf4.py)."""
    import bitsandbytes as bnb
    import torch

    from qwen_magic.kernels import nf4, nf4_group

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (bnb.nn.Linear4bit(64, n) for n in (64, 16, 16, 64))
            self.mlp = torch.nn.Module()
            self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = bnb.nn.Linear4bit(64, 128), bnb.nn.Linear4bit(64, 128), bnb.nn.Linear4bit(128, 64)

    layer = Layer()
    restore = nf4.patch(layer)
    q, k, v = layer.q_proj, layer.k_proj, layer.v_proj
    assert nf4_group.of(q) is nf4_group.of(k) is nf4_group.of(v) is not None
    assert nf4_group.of(layer.mlp.gate_proj) is nf4_group.of(layer.mlp.up_proj) is not None
    assert nf4_group.of(layer.o_proj) is None and nf4_group.of(layer.mlp.down_proj) is None

    launches = []

    class Stand:  # a GroupPlan's interface: sizes, and the rows of all weights one after the other
        sizes = [64, 16, 16]

        def __call__(self, x, bias):
            launches.append(x)
            return torch.arange(96, dtype=torch.float16) + 1000 * len(launches)

    monkeypatch.setattr(nf4_group.Siblings, "_plan", lambda self, compute, device: Stand())
    group = nf4_group.of(q)
    x = torch.randn(64, dtype=torch.float16)
    assert torch.equal(group.take(q, x, torch.float16), torch.arange(64, dtype=torch.float16) + 1000)
    assert group.take(k, x.clone(), torch.float16) is None  # an equal tensor is not the same input
    assert torch.equal(group.take(k, x, torch.float16), torch.arange(64, 80, dtype=torch.float16) + 1000)
    assert torch.equal(group.take(v, x, torch.float16), torch.arange(80, 96, dtype=torch.float16) + 1000)
    assert group.pending is None and len(launches) == 1
    assert group.take(k, x, torch.float16) is None  # taken already: k alone
    monkeypatch.setattr(nf4_group, "GROUPS", False)
    assert group.take(q, x, torch.float16) is None
    restore()
    assert not any(nf4_group.of(m) for m in layer.modules()) and not any(nf4.is_patched(m) for m in layer.modules())


def test_kernel_checks_run_at_once_and_ahead(monkeypatch):
    """On a CUDA device the modules' checks run at the same time (each waits here for all the others: run one after
    another they would time out); start_checks runs them in the background and load_kernels takes its results
    without checking again. (A CPU device checks one at a time: the interpreter is not thread-safe.)"""
    import threading

    import torch

    from qwen_magic import kernels

    barrier = threading.Barrier(len(kernels.NAMES), timeout=20)
    calls = []

    def fake(name):
        def check(device=None, dtype=None):
            calls.append(name)
            barrier.wait()
            return None if name != "sample" else "sample: not here"
        return check

    modules = {name: __import__(f"qwen_magic.kernels.{name}", fromlist=["check"]) for name in kernels.NAMES}
    for name, module in modules.items():
        monkeypatch.setattr(module, "available", lambda device=None: None)
        monkeypatch.setattr(module, "check", fake(name))
    monkeypatch.setattr(modules["nf4"], "HALF_NOTE", "")
    monkeypatch.setattr(kernels, "_key", lambda device, dtype: (str(device), dtype))
    cuda = torch.device("cuda", 0)  # nothing runs on it: the checks are fakes
    kernels.start_checks(cuda, torch.float16)
    kernels.start_checks(cuda, torch.float16)  # already started: not twice
    found, why = kernels.load_kernels(cuda, True, torch.float16)
    try:
        assert sorted(calls) == sorted(kernels.NAMES)
        assert [module.__name__.rsplit(".", 1)[-1] for module in found] == ["nf4", "fused", "decode", "prefill"]
        assert why == "sample: not here"
    finally:
        kernels.release()
    calls.clear()
    barrier.reset()
    found, _ = kernels.load_kernels(cuda, True, torch.float16)  # nothing started: checked here, at once again
    kernels.release()
    assert sorted(calls) == sorted(kernels.NAMES) and len(found) == 4
    monkeypatch.setenv("QWEN_MAGIC_KERNELS", "0")
    kernels.start_checks(cuda, torch.float16)
    assert not kernels._started
