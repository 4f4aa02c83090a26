"""bitsandbytes' 4-bit layers in the fast engine's prefill: one dequantizing kernel, then PyTorch's matmul.

A prefill of a few hundred tokens sends every ``Linear4bit`` through bitsandbytes' ``gemm_4bit``. On an H100
that costs about 100 us of host time a layer (the module, ``matmul_4bit``, the custom-op dispatch, a separate
kernel for the nested statistics, the dequantization) and, for up to 1,536 rows, bitsandbytes' own fused
kernel, which measured slower there than dequantizing and multiplying; past 1,536 rows bitsandbytes itself
dequantizes (two kernels) and calls ``torch.nn.functional.linear``. Here a prefill call with at least
:data:`MIN_ROWS` rows dequantizes the weight with one Triton kernel (nested statistics included) and calls
``torch.nn.functional.linear`` with it: what bitsandbytes' own path past 1,536 rows does, in one kernel and
fewer Python steps.

Exactness: the dequantized weight is bitsandbytes' ``dequantize_4bit`` bit for bit (the same float32
operations, compiled without fused multiply-adds, one rounding to the compute dtype; checked at load and in
the tests), and the product is PyTorch's, as in bitsandbytes' dequantize-and-multiply path. Against
bitsandbytes' fused kernel (its choice for fewer rows) results differ by summation order only.

Used on compute capability 9.0 and newer (measured there; bitsandbytes' notes find its fused kernel ahead on
GDDR cards such as the T4), only inside the fast engine's prefill forwards (``kernels.prefilling``),
without gradients; ``QWEN_MAGIC_NF4_PREFILL=0`` switches it off. Everything else keeps bitsandbytes' forward.
"""

import os
from typing import Optional

import torch

MIN_ROWS = 64  # fewer rows keep bitsandbytes' kernel (on an H100 its fused kernel was faster at 16 and 32 rows: bench_nf4_prefill.py)
MIN_CAPABILITY = (9, 0)
BLOCK = 2048  # packed bytes a program (4,096 values)
FORCE_CPU = False  # tests: take CPU tensors too (through Triton's interpreter, TRITON_INTERPRET=1)
OFF = ""  # why check() switched it off on this machine ("" while on)
_USED = {}  # device index -> used there


def used_on(device) -> bool:
    if device.type == "cpu":
        return FORCE_CPU
    if device.type != "cuda" or OFF or os.environ.get("QWEN_MAGIC_NF4_PREFILL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _USED:
        _USED[index] = torch.cuda.get_device_capability(index) >= MIN_CAPABILITY
    return _USED[index]


class Dequantizer:
    """One weight's dequantization into a compute dtype: its flattened tensors and launch settings, once."""

    def __init__(self, weight, quant_state, dtype, device):
        from . import _nf4_triton
        from .nf4 import _device_offset, _flat, _key

        self.kernel = _nf4_triton.dequant_kernel
        self.shape = tuple(int(v) for v in quant_state.shape)
        self.dtype, self.device = dtype, device
        packed = (weight.data if hasattr(weight, "data") else weight).reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        self.packed = packed if packed.is_contiguous() else packed.contiguous()
        self.n_bytes = self.shape[0] * self.shape[1] // 2
        self.code = _flat(quant_state.code, torch.float32)
        if quant_state.nested:
            state2 = quant_state.state2
            self.absmax = _flat(quant_state.absmax)
            self.code2, self.absmax2 = _flat(state2.code, torch.float32), _flat(state2.absmax, torch.float32)
            self.offset = _device_offset(quant_state, device)
            blocksize2 = int(state2.blocksize)
        else:
            self.absmax = _flat(quant_state.absmax, torch.float32)
            self.code2 = self.absmax2 = self.offset = self.code  # unused
            blocksize2 = 1
        self.grid = (-(-self.n_bytes // BLOCK),)
        self.constants = dict(BLOCKSIZE=int(quant_state.blocksize), BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
                              ROUND=2 if dtype == torch.bfloat16 else 1, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
        self.key = _key(weight, quant_state)

    def __call__(self) -> torch.Tensor:
        from .device import on

        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        with on(self.device):
            self.kernel[self.grid](self.packed, self.absmax, self.code, self.code2, self.absmax2, self.offset, out,
                                   self.n_bytes, **self.constants)
        return out


def dequantize(weight, quant_state, dtype) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit(weight, quant_state)`` in ``dtype`` (float16, bfloat16 or float32), ``[N, K]``."""
    return Dequantizer(weight, quant_state, dtype, weight.device)()


def takes(module, x) -> bool:
    """Whether this call of a patched ``Linear4bit`` goes through :func:`forward`: a prefill (inside
    ``kernels.prefilling``) of at least MIN_ROWS rows, on a card where it is used, with a weight it reads."""
    from . import allowed
    from .nf4 import supports

    k = x.shape[-1]
    if k == 0 or x.numel() < MIN_ROWS * k or not allowed(prefill=True) or not used_on(x.device):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (module.bias is not None and module.bias.requires_grad)):
        return False
    if not getattr(module, "compute_type_is_set", True):
        return False
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or weight.device != x.device:
        return False
    compute = module.compute_dtype if module.compute_dtype is not None else x.dtype
    return compute in (torch.float16, torch.bfloat16, torch.float32) and supports(weight, quant_state, k) is None


def forward(module, x, cache: dict) -> torch.Tensor:
    """``module(x)`` as bitsandbytes computes it past 1,536 rows: the dequantized weight through
    ``torch.nn.functional.linear`` in the compute dtype, the result in ``x``'s dtype. ``cache`` keeps the
    weight's :class:`Dequantizer` (per compute dtype)."""
    from .nf4 import _key

    compute = module.compute_dtype if module.compute_dtype is not None else x.dtype
    weight, quant_state = module.weight, module.weight.quant_state
    dequantizer: Optional[Dequantizer] = cache.get(("dequant", compute))
    if dequantizer is None or dequantizer.key != _key(weight, quant_state):
        dequantizer = cache[("dequant", compute)] = Dequantizer(weight, quant_state, compute, x.device)
    bias = module.bias
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    y = torch.nn.functional.linear(x.to(compute), dequantizer(), bias)
    return y.to(x.dtype)


def reference(weight, quant_state, dtype) -> torch.Tensor:
    """What :func:`dequantize` computes, with PyTorch's operations in explicit float32 (bitsandbytes' arithmetic:
    ``code[q] * scale``, the nested scale ``code2[a] * absmax2[b // blocksize2] + offset``, one rounding)."""
    n, k = (int(v) for v in quant_state.shape)
    data = (weight.data if hasattr(weight, "data") else weight).reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 15], 1).reshape(-1)[: n * k].long()
    absmax = quant_state.absmax
    if quant_state.nested:
        state2 = quant_state.state2
        blocks = torch.arange(absmax.numel(), device=absmax.device) // int(state2.blocksize)
        absmax = state2.code.float()[absmax.long()] * state2.absmax.float()[blocks]
        absmax = absmax + float(quant_state.offset)
    scale = absmax.float().repeat_interleave(int(quant_state.blocksize))[: n * k]
    return (quant_state.code.float()[codes] * scale).to(dtype).reshape(n, k)


def check(device, dtype=torch.float16) -> Optional[str]:
    """Run the kernel once on ``device`` (compiling it for ``dtype``) on a small double-quantized weight and
    compare with :func:`reference`, bit for bit; on any difference or error switch it off (:data:`OFF`, said in
    the load summary). Returns None: bitsandbytes' path stays either way. (It runs in a thread beside the loading
    weights: bitsandbytes' own dequantization there, as a reference, once disagreed in a fifth of the values by an
    ulp, while the same comparison on the same thread after the load agreed; the tests compare with bitsandbytes.)"""
    global OFF
    device = torch.device(device)
    OFF = ""  # each load checks again (a card's earlier failure may have been the memory's, since freed)
    if device.type != "cuda" or not used_on(device):
        return None
    try:
        from bitsandbytes import functional as F

        generator = torch.Generator(device="cpu").manual_seed(0)
        source = (torch.randn(256, 512, generator=generator, dtype=torch.float32) * 0.05).to(device=device, dtype=dtype)
        packed, state = F.quantize_4bit(source, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = dequantize(packed, state, dtype)
        expected = reference(packed, state, dtype)
        if not torch.equal(ours, expected):
            apart = (ours.float() - expected.float()).abs()
            OFF = (f"its dequantization differs from bitsandbytes' arithmetic here ({str(dtype)[6:]}: {int((apart > 0).sum())} values,"
                   f" up to {float(apart.max()):.3g})")
    except torch.cuda.OutOfMemoryError:
        pass  # a full card, not a broken kernel: the load itself says so (the kernel compiles on its first use)
    except Exception as error:  # a Triton or driver problem: keep bitsandbytes' path, say why
        OFF = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    return None
