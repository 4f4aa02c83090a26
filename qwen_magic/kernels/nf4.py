"""A batch-1 matrix-vector kernel for bitsandbytes' 4-bit weights (NF4, also FP4), in Triton.

During decode every ``bnb.nn.Linear4bit`` multiplies one token row by its 4-bit weight; bitsandbytes
sends that to its ``gemv_4bit`` CUDA kernel. :func:`matvec` does the same product reading the very
same tensors (no repacking, no extra memory), and :func:`patch` routes a model's one-row calls to it::

    from qwen_magic.kernels import nf4
    if nf4.available(device) is None:
        restore = nf4.patch(model)   # ... later: restore()

Layout (bitsandbytes' own, checked against ``bitsandbytes.functional.dequantize_4bit`` in the tests)
    ``weight`` (``Params4bit``) is the row-major ``W`` of shape ``(N, K)`` = ``quant_state.shape``,
    flattened and packed two codes a byte: element ``2i`` in the high nibble of byte ``i``, element
    ``2i + 1`` in the low nibble (any ``quant_storage`` dtype is read as its bytes). ``absmax`` has one
    entry per ``blocksize`` consecutive elements of the flattened ``W`` (blocks may run across rows
    when ``K % blocksize != 0``). ``quant_state.code`` is the 16-value table (NF4 or FP4). With double
    quantization (``compress_statistics=True``, ``quant_state.nested``) ``absmax`` is uint8 and the
    scale of block ``b`` is ``state2.code[absmax[b]] * state2.absmax[b // state2.blocksize] + offset``.

Exactness
    Per element the kernel computes ``code[q] * scale`` in float32 and rounds it to the compute dtype
    (round to nearest even; for bfloat16 on the float32 bits, so no bf16 hardware is needed), which is
    exactly bitsandbytes' dequantized weight; in float32 compute it is not rounded. The nested scale
    takes the same float32 operations as bitsandbytes (with fp fusion the compiler may fuse its
    multiply-add: at most a last-bit difference in that scale). The products with ``x`` and their sum
    are float32, the bias is added in float32, and the result is rounded once to the compute dtype.
    So the output equals ``x @ dequantize_4bit(W).T`` summed in float32, up to summation order (and
    bitsandbytes' own rounding of the product before it adds the bias). With ``splits > 1`` the K
    slices are added in a fixed order by a second kernel: results are deterministic (no atomics), and
    a CUDA-graph replay gives the same bits as an eager call.

Performance
    A program owns ``BLOCK_N`` output rows and walks K in ``BLOCK_K`` steps, loading the bytes of a
    ``[BLOCK_N, BLOCK_K // 2]`` tile (8 or 16 bytes a load instruction), two code gathers per byte
    from the 64-byte table (L1 hits), one scale per row and quantization block, ``x`` from L1/L2.
    Shapes with few rows (the k/v projections) are split along K so the GPU has enough programs;
    a second small kernel adds the float32 partials (and the bias). The tile configuration comes
    from a fixed heuristic (:func:`config`: about 2 KiB of packed weight a step, 4 warps, a K split
    when the rows give fewer than two programs per SM), overridable per shape in :data:`TUNED` (filled
    from ``benchmarks/bench_nf4.py --sweep``). Nothing is autotuned, so a call is safe inside
    ``torch.cuda.graph`` capture once the kernel has been compiled by an eager call (the only
    allocations are ``torch.empty`` for the output and the partial sums; no host synchronisation).
    By default ``x`` is read contiguously and split into even and odd columns (``x_pairs``) and the
    table lookups are inline PTX loads (``gather_asm``: elementwise, so they keep the bytes' register
    layout; Triton's own gathers made it shuffle the tile through shared memory three times a step,
    now once); both can be switched off per shape in :class:`Config` (the interpreter always uses
    ``tl.load``). Plain loads, integer and float32 arithmetic: it builds for sm_75 (T4) as for
    sm_90 (H100); tests/test_nf4.py compiles both ahead of time.

Use in a model
    :func:`patch` wraps each ``Linear4bit``'s forward; a call with one row on CUDA (and a weight
    :func:`supports` accepts: NF4/FP4, even K, power-of-two blocksize, 2-D ``[N, K]`` quant state,
    not repacked for bitsandbytes' CPU kernel) goes through a :class:`Plan` built once per weight
    and compute dtype; prefill, training (inputs that need grad), other devices and anything
    unsupported take bitsandbytes' own forward. The first call of a fresh ``Linear4bit`` also goes to
    bitsandbytes, which picks its compute dtype then.
"""

from typing import Callable, Dict, NamedTuple, Optional, Tuple

from . import nf4_group

# Set True (tests) to let :func:`patch`'s wrapper use the kernel for CPU tensors too, through
# Triton's interpreter (slow; for checking the kernel without a GPU). The interpreter needs
# TRITON_INTERPRET=1 in the environment before anything imports triton (bitsandbytes does).
ALLOW_CPU = False

# Shape-specific configurations, ``(N, K) -> Config``, checked before the heuristic; filled from
# ``benchmarks/bench_nf4.py --sweep`` on the target card.
TUNED: Dict[Tuple[int, int], "Config"] = {}

_MARK = "_qwen_magic_nf4_original"


class Config(NamedTuple):
    block_n: int = 4
    block_k: int = 1024
    splits: int = 1  # K slices (requested; rounded so each slice is a whole number of BLOCK_K)
    num_warps: int = 4
    num_stages: int = 2
    x_pairs: bool = True  # read x contiguously and split it in even/odd columns (else two strided loads)
    gather_asm: bool = True  # table lookups as inline PTX loads (no layout shuffle; CUDA only, the interpreter uses tl.load)


def available(device=None) -> Optional[str]:
    """None when the kernel can run on ``device`` (default: the current CUDA device), else why not."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    from .device import unsupported

    return unsupported(device)


def check(device=None, dtype=None) -> Optional[str]:
    """For float16 compute, run the float16 kernel (nf4_half) once; if it cannot run here, switch it off
    (:data:`HALF`) so the Triton kernel takes its place. Returns None: the module stays usable."""
    global HALF, HALF_NOTE
    import torch

    device = torch.device("cuda") if device is None else torch.device(device)
    from . import nf4_prefill

    nf4_prefill.check(device, dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16)
    if dtype != torch.float16 or not HALF or device.type != "cuda":
        return None
    from . import nf4_half

    reason = nf4_half.check(device)
    if reason:
        HALF, HALF_NOTE = False, reason
    return None


HALF_NOTE = ""  # why check() switched the float16 kernel off

_SM_COUNT: Dict[int, int] = {}


def _sm_count(device) -> int:
    import torch

    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def config(n: int, k: int, sm_count: int = 132) -> Config:
    """The tile configuration for an ``(N, K)`` weight: :data:`TUNED` first, else a heuristic.

    Enough bytes in flight matter most for a memory-bound matrix-vector product: tiles of about
    2 KiB of packed weight a step (4 rows x 1024 columns, or 8 rows x 512 columns when 1024 does not
    divide K but 512 does, so no step is half masked: Qwen2.5's K = 3584 and 18944), 4 warps, and
    when the rows give fewer than about two programs per SM, a split of K (at most one slice per
    step). A first guess for H100 and T4 alike, to be replaced by measured :data:`TUNED` entries.
    """
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    block_k = 64
    while block_k < min(k, 1024):
        block_k *= 2
    block_n = 4
    if block_k == 1024 and k % 1024 and k % 512 == 0:
        block_k = 512
        if -(-n // 8) >= 4 * sm_count:  # 8 rows only where that still leaves several programs an SM
            block_n = 8
    programs = -(-n // block_n)
    splits = 1
    if programs < 2 * sm_count:
        splits = max(1, min(-(-2 * sm_count // programs), -(-k // block_k)))
    return Config(block_n=block_n, block_k=block_k, splits=splits)


def supports(weight, quant_state, k: Optional[int] = None) -> Optional[str]:
    """None when :func:`matvec` handles this weight (and input width ``k``), else why not."""
    if quant_state is None:
        return "no quant_state"
    if getattr(quant_state, "packing_format_for_cpu", False):
        return "weight repacked for bitsandbytes' CPU kernel"
    if quant_state.quant_type not in ("nf4", "fp4"):
        return f"quant type {quant_state.quant_type}"
    shape = tuple(quant_state.shape)
    if len(shape) != 2:
        return f"weight shape {shape} is not 2-D"
    n, kk = shape
    if k is not None and k != kk:
        return f"input width {k} is not the weight's {kk} (a [K, N]-quantized weight)"
    if kk % 2:
        return "odd K (rows do not start on a byte)"
    blocksize = quant_state.blocksize
    if blocksize < 2 or blocksize & (blocksize - 1):
        return f"blocksize {blocksize} is not a power of two"
    if quant_state.code is None or quant_state.code.numel() != 16:
        return "the code table does not have 16 entries"
    if weight.numel() * weight.element_size() * 2 < n * kk:
        return "fewer packed bytes than the shape needs"
    if quant_state.nested:
        state2 = quant_state.state2
        if state2 is None or state2.code is None or state2.code.numel() != 256:
            return "nested statistics without an 8-bit table"
        if quant_state.absmax.dtype != __import__("torch").uint8:
            return f"nested absmax of dtype {quant_state.absmax.dtype}"
    return None


def _flat(t, dtype=None):
    t = t.reshape(-1)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _device_offset(quant_state, device):
    """The nested statistics' offset as a float32 tensor on ``device``, copied there once (a saved
    copy may bring it back as a CPU tensor or a float; no copy may happen inside a graph capture)."""
    import torch

    offset = quant_state.offset
    if torch.is_tensor(offset) and offset.device == device and offset.dtype == torch.float32:
        return offset.reshape(1)
    cached = getattr(quant_state, "_qwen_magic_offset", None)
    if cached is None or cached.device != device:
        value = float(offset)
        cached = torch.tensor([value], dtype=torch.float32, device=device)
        quant_state._qwen_magic_offset = cached
    return cached


class Plan:
    """Everything one weight's product needs but ``x`` and the bias: the flattened tensors, the tile
    configuration and the kernel's constants, worked out once (:func:`plan`) so that a call costs
    one or two launches and little Python."""

    def __init__(self, weight, quant_state, dtype, device, cfg: Optional[Config] = None, out_dtype=None):
        import torch

        from . import _nf4_triton as kernels

        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute dtype {dtype} is not float16, bfloat16 or float32")
        n, k = (int(v) for v in quant_state.shape)
        reason = supports(weight, quant_state)
        if reason:
            raise ValueError(f"matvec cannot read this weight: {reason}")
        if device.type != "cuda" and not kernels.interpreting(kernels.matvec_kernel):
            raise RuntimeError("matvec on CPU tensors needs Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported")
        self.kernels, self.n, self.k, self.device = kernels, n, k, device
        self.dtype, self.out_dtype = dtype, out_dtype or dtype
        self.cfg = cfg = cfg or config(n, k, _sm_count(device))

        packed = weight.data if hasattr(weight, "data") else weight
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        self.packed = packed if packed.is_contiguous() else packed.contiguous()
        self.code = _flat(quant_state.code, torch.float32)
        absmax = _flat(quant_state.absmax)
        if quant_state.nested:
            state2 = quant_state.state2
            self.code2 = _flat(state2.code, torch.float32)
            self.absmax2 = _flat(state2.absmax, torch.float32)
            self.offset = _device_offset(quant_state, device)
            blocksize2 = int(state2.blocksize)
        else:
            self.code2 = self.absmax2 = self.offset = self.code  # unused
            blocksize2 = 1
            if absmax.dtype != torch.float32:
                absmax = absmax.float()
        self.absmax = absmax
        blocksize = int(quant_state.blocksize)

        block_k = max(64, min(cfg.block_k, 1 << max(0, (k - 1).bit_length())))
        k_split = -(-k // max(1, cfg.splits))
        self.k_split = k_split = -(-k_split // block_k) * block_k
        self.splits = -(-k // k_split)
        self.grid = (-(-n // cfg.block_n), self.splits)
        self.constants = dict(
            BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
            ALIGNED=(k % blocksize == 0), ROUND={torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0), SPLIT=self.splits > 1,
            BLOCK_N=cfg.block_n, BLOCK_K=block_k, SUB=min(blocksize, block_k), STEPS=k_split // block_k,
            X_PAIRS=bool(cfg.x_pairs), GATHER_ASM=bool(cfg.gather_asm) and device.type == "cuda",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True,
        )
        self.key = _key(weight, quant_state)

    def __call__(self, x, bias=None):
        """``x`` (contiguous, ``self.dtype``, K values) -> ``(N,)`` in ``self.out_dtype``."""
        import torch

        from .device import on

        n, has_bias = self.n, bias is not None
        bias_arg = bias if has_bias else self.code
        out = torch.empty(n, dtype=self.out_dtype, device=self.device)
        target = out if self.splits == 1 else torch.empty(self.splits * n, dtype=torch.float32, device=self.device)
        with on(self.device):
            self.kernels.matvec_kernel[self.grid](
                x, self.packed, self.absmax, self.code, self.code2, self.absmax2, self.offset, bias_arg, target,
                n, self.k, self.k // 2, self.k_split, HAS_BIAS=has_bias, **self.constants,
            )
            if self.splits > 1:
                block = 256
                self.kernels.reduce_kernel[(-(-n // block),)](target, bias_arg, out, n, SPLITS=self.splits, HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
        return out


def _key(weight, quant_state):
    """What a cached :class:`Plan` depends on: the storage it points at (moving the model changes it)."""
    data = weight.data if hasattr(weight, "data") else weight
    return (data.data_ptr(), id(quant_state), quant_state.absmax.data_ptr(), quant_state.code.data_ptr())


# The float16 kernel (nf4_half, Gluon) for float16 compute where it reads the weight; False: this module's
# Triton kernel for every dtype (tests; QWEN_MAGIC_NF4_HALF=0 does the same).
HALF = True


def _half_unsupported(quant_state, dtype, device) -> Optional[str]:
    import os

    from . import nf4_half

    if not HALF or os.environ.get("QWEN_MAGIC_NF4_HALF", "1") == "0":
        return "switched off"
    return nf4_half.unsupported(quant_state, dtype, device)


def plan(weight, quant_state, dtype, device, cfg=None, out_dtype=None):
    """A reusable plan for ``weight`` with inputs of ``dtype`` on ``device``: the float16 kernel
    (:class:`nf4_half.HalfPlan`) for float16 compute where it applies or when ``cfg`` is a ``HalfConfig``,
    else :class:`Plan` (this module's kernel, ``cfg`` a :class:`Config`)."""
    from . import nf4_half

    if isinstance(cfg, nf4_half.HalfConfig) or (cfg is None and _half_unsupported(quant_state, dtype, device) is None):
        return nf4_half.HalfPlan(weight, quant_state, device, cfg, out_dtype, _sm_count(device))
    return Plan(weight, quant_state, dtype, device, cfg, out_dtype)


def matvec(x, weight, quant_state, bias=None, out_dtype=None, cfg: Optional[Config] = None):
    """``x @ W.T (+ bias)`` for one input row ``x`` (shape ``(..., K)``, one row) and bitsandbytes'
    packed 4-bit ``weight`` with its ``quant_state``. Returns shape ``(..., N)`` in ``out_dtype``
    (default ``x.dtype``, the compute dtype: float16, bfloat16 or float32). CPU tensors run through
    Triton's interpreter."""
    k = int(quant_state.shape[-1])
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"matvec takes one row of width {k}, got shape {tuple(x.shape)}")
    product = plan(weight, quant_state, x.dtype, x.device, cfg, out_dtype)
    y = product(_flat(x), _flat(bias) if bias is not None else None)
    return y.reshape(*x.shape[:-1], product.n)


# Layers with more output rows keep bitsandbytes' batch-1 kernel under patch() unless the float16 kernel takes them
# (float16 compute): on an H200 (benchmarks/RESULTS.md) this module's Triton kernel was faster only on the narrow key/value projections (5.8 vs 7.0 us at 512 x 3584) and 2-45 % slower on
# the wide ones. None: every supported layer takes it.
PATCH_MAX_ROWS: Optional[int] = 1024


def _use_kernel(module, x) -> bool:
    import torch

    from . import allowed

    if not allowed():
        return False
    if x.shape[-1] == 0 or x.numel() != x.shape[-1]:
        return False
    if x.device.type != "cuda" and not (ALLOW_CPU and x.device.type == "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (module.bias is not None and module.bias.requires_grad)):
        return False
    if not getattr(module, "compute_type_is_set", True):
        return False  # bitsandbytes picks the compute dtype on the first call: let it
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or weight.device != x.device:
        return False
    compute = module.compute_dtype if module.compute_dtype is not None else x.dtype
    if compute not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if PATCH_MAX_ROWS is not None and quant_state.shape[0] > PATCH_MAX_ROWS and _half_unsupported(quant_state, compute, x.device):
        return False  # bitsandbytes' own kernel measured as fast as the Triton one or faster on the wide layers
    return supports(weight, quant_state, x.shape[-1]) is None


def _forward(module, original: Callable) -> Callable:
    cache = {}

    def forward(x, *args, **kwargs):
        if args or kwargs:
            return original(x, *args, **kwargs)
        if not _use_kernel(module, x):
            from . import nf4_prefill  # a prefill's many rows: one dequantizing kernel, then PyTorch's matmul

            if nf4_prefill.takes(module, x):
                return nf4_prefill.forward(module, x, cache)
            return original(x)
        compute = module.compute_dtype if module.compute_dtype is not None else x.dtype
        siblings = nf4_group.of(module)
        if siblings is not None:
            y = siblings.take(module, x, compute)
            if y is not None:
                return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        weight, quant_state = module.weight, module.weight.quant_state
        product = cache.get((compute, x.device))
        if product is None or product.key != _key(weight, quant_state):
            product = cache[(compute, x.device)] = plan(weight, quant_state, compute, x.device)
        bias = module.bias
        y = product(_flat(x, compute), _flat(bias) if bias is not None else None)
        return y.reshape(*x.shape[:-1], product.n).to(x.dtype)

    setattr(forward, _MARK, original)
    return forward


def patch(model) -> Callable[[], None]:
    """Route every ``bnb.nn.Linear4bit`` of ``model`` (or ``model`` itself) to :func:`matvec` for calls
    with exactly one row on CUDA; other calls (prefill, training, unsupported weights) keep the
    original forward. Idempotent: modules already patched are left alone. Returns a function that
    puts back the forwards this call replaced."""
    import bitsandbytes as bnb

    patched = []
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        current = module.__dict__.get("forward")
        if current is not None and hasattr(current, _MARK):
            continue
        had_own = "forward" in module.__dict__
        module.forward = _forward(module, module.forward)
        patched.append((module, had_own, current))
    grouped = nf4_group.attach(model, is_patched)

    def restore():
        nf4_group.detach(grouped)
        while patched:
            module, had_own, previous = patched.pop()
            if had_own:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)

    return restore


def is_patched(module) -> bool:
    return hasattr(module.__dict__.get("forward"), _MARK)
