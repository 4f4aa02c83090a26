"""The float16 batch-1 4-bit product (:mod:`._nf4_half`'s Gluon kernel): when it applies, its tile
configuration, and the plan that launches it. :func:`qwen_magic.kernels.nf4.plan` picks it for float16
compute; bfloat16 and float32 compute, and weights it cannot read, keep the Triton kernel of ``nf4``.

Exactness: bitsandbytes' own float16 batch-1 arithmetic (``half(code) * half(absmax)`` rounded to float16,
times ``x`` rounded to float16, summed in float32), in another summation order. With a K split the float32
partial sums are added in a fixed order by ``_nf4_triton.reduce_kernel``: deterministic, and a CUDA-graph
replay gives the same bits as an eager call.
"""

from typing import Dict, NamedTuple, Optional, Tuple


class HalfConfig(NamedTuple):
    rows: int = 4  # output rows a program (each thread holds its words of every one of them)
    per_thread: int = 4  # consecutive 32-bit words a thread loads per row and step (4: one 16-byte load)
    num_warps: int = 4
    splits: int = 1  # K slices (requested; each slice a whole number of steps)
    stream: bool = False  # load the weight past L1 (.cg, evict first): it is read once


# Measured per (N, K) (benchmarks/bench_nf4.py --sweep; Qwen2.5-7B's shapes on an H100, 2026-11-26: RESULTS.md),
# checked before the heuristic.
TUNED: Dict[Tuple[int, int], HalfConfig] = {
    (3584, 3584): HalfConfig(rows=2, num_warps=2, stream=True),
    (512, 3584): HalfConfig(rows=2, num_warps=2, stream=True),
    (18944, 3584): HalfConfig(rows=4, num_warps=1),
    (3584, 18944): HalfConfig(rows=2, num_warps=4),
}


def _tuned_from_file() -> None:
    """QWEN_MAGIC_NF4_TUNED=path: tile configurations measured on this card by ``benchmarks/bench_nf4.py --sweep``
    (its ``bench_nf4-tuned.json``: ``{"NxK": {HalfConfig fields}}``), used before :data:`TUNED`."""
    import json
    import os

    path = os.environ.get("QWEN_MAGIC_NF4_TUNED")
    if not path:
        return
    try:
        with open(path) as handle:
            entries = json.load(handle)
        for shape, fields in entries.items():
            n, k = (int(v) for v in shape.split("x"))
            TUNED[(n, k)] = HalfConfig(**{name: fields[name] for name in HalfConfig._fields if name in fields})
    except (OSError, ValueError, TypeError) as error:
        import warnings

        warnings.warn(f"QWEN_MAGIC_NF4_TUNED={path} not read: {error}")


_tuned_from_file()


def half_config(n: int, k: int, sm_count: int = 132) -> HalfConfig:
    """:data:`TUNED` first; else 4 rows a program, as many warps (up to 4) as K keeps busy in whole steps,
    and a K split when the rows give fewer than about two programs per SM."""
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    words = k // 8
    warps = 4
    while warps > 1 and 4 * 32 * warps > words:
        warps //= 2
    programs = -(-n // 4)
    steps = -(-words // (4 * 32 * warps))
    splits = 1
    if programs < 2 * sm_count:
        splits = max(1, min(-(-2 * sm_count // programs), steps))
    return HalfConfig(num_warps=warps, splits=splits)


_GLUON: Optional[str] = None  # why Gluon does not import here ("" when it does)


def _gluon_missing() -> str:
    global _GLUON
    if _GLUON is None:
        try:
            from . import _nf4_half  # noqa: F401

            _GLUON = ""
        except Exception as error:  # an older triton without triton.experimental.gluon, or a broken one
            _GLUON = f"{type(error).__name__}: {error}".splitlines()[0]
    return _GLUON


def unsupported(quant_state, dtype, device, cfg: Optional[HalfConfig] = None) -> Optional[str]:
    """None when the float16 kernel reads this weight (already accepted by ``nf4.supports``) for ``dtype``
    compute on ``device``; else why not."""
    import torch

    if dtype != torch.float16:
        return "not float16 compute"
    if device.type != "cuda":
        return "not a CUDA device"
    n, k = (int(v) for v in quant_state.shape)
    blocksize = int(quant_state.blocksize)
    per_thread = (cfg or HalfConfig()).per_thread
    if k % blocksize or blocksize % (8 * per_thread):
        return f"K {k} or blocksize {blocksize} does not fit whole blocks of {8 * per_thread} codes"
    if quant_state.code.numel() != 16:
        return "the code table does not have 16 entries"
    missing = _gluon_missing()
    if missing:
        return f"no Gluon ({missing})"
    return None


_TABLES: Dict[str, list] = {}


def _table(quant_state):
    """The table words of the weight's code table. bitsandbytes builds ``quant_state.code`` from its fixed
    NF4 (or FP4) values (``get_4bit_type``): those are taken on the host, so no device synchronization
    happens (a CUDA-graph capture may build a plan). Another table is read from the device, once."""
    from bitsandbytes.functional import get_4bit_type

    from . import _nf4_half

    kind = quant_state.quant_type
    if kind in ("nf4", "fp4"):
        if kind not in _TABLES:
            _TABLES[kind] = _nf4_half.table_words(get_4bit_type(kind, device="cpu").float())
        return _TABLES[kind]
    cached = getattr(quant_state, "_qwen_magic_half_table", None)
    if cached is None:
        cached = quant_state._qwen_magic_half_table = _nf4_half.table_words(quant_state.code.detach().float().cpu())
    return cached


class HalfPlan:
    """One weight's float16 product, worked out once: flattened tensors, table words, grid, constants."""

    def __init__(self, weight, quant_state, device, cfg: Optional[HalfConfig] = None, out_dtype=None, sm_count: int = 132):
        import torch

        from . import _nf4_half, _nf4_triton
        from .nf4 import _device_offset, _flat, _key

        reason = unsupported(quant_state, torch.float16, device, cfg)
        if reason:
            raise ValueError(f"the float16 kernel cannot read this weight: {reason}")
        n, k = (int(v) for v in quant_state.shape)
        self.n, self.k, self.device = n, k, device
        self.dtype, self.out_dtype = torch.float16, out_dtype or torch.float16
        self.cfg = cfg = cfg or half_config(n, k, sm_count)
        self.kernel, self.reduce = _nf4_half.matvec_half_kernel, _nf4_triton.reduce_kernel
        packed = weight.data if hasattr(weight, "data") else weight
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        self.packed = packed if packed.is_contiguous() else packed.contiguous()
        self.table = _table(quant_state)
        absmax = _flat(quant_state.absmax)
        if quant_state.nested:
            state2 = quant_state.state2
            self.code2, self.absmax2 = _flat(state2.code, torch.float32), _flat(state2.absmax, torch.float32)
            self.offset = _device_offset(quant_state, device)
            blocksize2 = int(state2.blocksize)
        else:
            if absmax.dtype != torch.float32:
                absmax = absmax.float()
            self.code2 = self.absmax2 = self.offset = absmax  # unused
            blocksize2 = 1
        self.absmax = absmax
        words = k // 8
        step = cfg.per_thread * 32 * cfg.num_warps
        steps = -(-words // step)
        per_split = -(-steps // max(1, cfg.splits))
        self.w_split = per_split * step
        self.splits = -(-words // self.w_split)
        self.grid = (-(-n // cfg.rows), self.splits)
        self.constants = dict(BLOCKSIZE=int(quant_state.blocksize), BLOCKSIZE2=blocksize2, NESTED=bool(quant_state.nested),
                              SPLIT=self.splits > 1, R=cfg.rows, U=cfg.per_thread, STREAM=bool(cfg.stream),
                              num_warps=cfg.num_warps)
        self.steps = per_split
        self.key = _key(weight, quant_state)
        self.parts = [(self.packed, self.absmax, self.absmax2, self.offset)]  # one launch's weights (GroupPlan: several)
        self.starts = []  # the output row where each weight after the first starts

    def _segments(self):
        """The kernel's per-weight arguments: the first weight's tensors, then (tensors, first row) of the second and
        third (repeats of the first, never reached, when there are fewer)."""
        parts = self.parts + [self.parts[0]] * (3 - len(self.parts))
        starts = self.starts + [self.n] * (2 - len(self.starts))
        return [*parts[0], *parts[1], starts[0], *parts[2], starts[1]]

    def __call__(self, x, bias=None):
        """``x`` (contiguous float16, K values, 16-byte aligned) -> ``(N,)`` in ``self.out_dtype``."""
        import torch

        from .device import on

        if x.data_ptr() % 16:
            x = x.clone()  # the kernel reads x as 16-byte vectors (a fresh tensor is aligned)
        n, has_bias = self.n, bias is not None
        bias_arg = bias if has_bias else self.absmax
        out = torch.empty(n, dtype=self.out_dtype, device=self.device)
        target = out if self.splits == 1 else torch.empty(self.splits * n, dtype=torch.float32, device=self.device)
        with on(self.device):
            self.kernel[self.grid](x, *self._segments(), self.code2, bias_arg, target, n, self.k // 8, self.w_split, self.steps,
                                   *self.table, HAS_BIAS=has_bias, SEGMENTS=len(self.parts), **self.constants)
            if self.splits > 1:
                block = 256
                self.reduce[(-(-n // block),)](target, bias_arg, out, n, SPLITS=self.splits, HAS_BIAS=has_bias, BLOCK=block, num_warps=4)
        return out


class GroupPlan(HalfPlan):
    """Two or three weights that multiply the same ``x`` (q, k and v; gate and up) in one launch: the output is their
    rows one after the other. Each row's arithmetic and summation order are those of the first weight's own
    :class:`HalfPlan` (same tile configuration), so the results are the same bits as separate launches."""

    def __init__(self, members, device, cfg: Optional[HalfConfig] = None, out_dtype=None, sm_count: int = 132):
        """``members``: ``(weight, quant_state)`` pairs with the same K, blocksize and statistics' layout; ``cfg``:
        the tile configuration (default: the first weight's)."""
        weight, state = members[0]
        super().__init__(weight, state, device, cfg, out_dtype, sm_count)
        plans = [self] + [HalfPlan(weight, state, device, self.cfg, out_dtype, sm_count) for weight, state in members[1:]]
        for plan in plans[1:]:
            if (plan.k, plan.constants["BLOCKSIZE"], plan.constants["BLOCKSIZE2"], plan.constants["NESTED"], plan.table) != (
                    self.k, self.constants["BLOCKSIZE"], self.constants["BLOCKSIZE2"], self.constants["NESTED"], self.table):
                raise ValueError("weights of a group must share K, blocksizes, statistics and table")
        if self.constants["NESTED"] and any(plan.code2 is not self.code2 for plan in plans[1:]):
            import torch

            # one table of the statistics serves all: bitsandbytes builds the same one for every weight (compared
            # on the device, so not while a CUDA graph is being captured)
            if torch.cuda.is_current_stream_capturing() or not all(torch.equal(plan.code2, self.code2) for plan in plans[1:]):
                raise ValueError("weights of a group must share the statistics' table")
        rows = self.cfg.rows
        if not 2 <= len(plans) <= 3 or any(plan.n % rows for plan in plans):
            raise ValueError(f"a group is 2 or 3 weights, each a multiple of {rows} rows")
        self.sizes = [plan.n for plan in plans]
        self.n = sum(self.sizes)
        self.grid = (self.n // rows, self.splits)
        self.parts = [plan.parts[0] for plan in plans]
        self.starts = [sum(self.sizes[:i]) for i in range(1, len(plans))]
        self.key = tuple(plan.key for plan in plans)


def bnb_arithmetic(x, packed, quant_state, bias=None):
    """What the float16 kernel computes, in PyTorch, summed in float64: ``half(code) * half(absmax)``
    rounded to float16, times ``x`` rounded to float16 (bitsandbytes' batch-1 float16 arithmetic).
    Returns ``(y, size)``: ``y`` of shape ``(N,)`` and the sum of the products' magnitudes per row (for error
    bounds). For tests and :func:`check`; memory grows with the weight (small weights only)."""
    import torch
    from bitsandbytes import functional as F

    n, k = (int(v) for v in quant_state.shape)
    blocksize = int(quant_state.blocksize)
    data = packed.reshape(-1).view(torch.uint8)[: n * k // 2].to(torch.int64)
    codes = torch.stack((data >> 4, data & 15), dim=-1).reshape(n, k)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = F.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    weight = quant_state.code.to(x.device).half()[codes].reshape(n, k // blocksize, blocksize)
    weight = (weight * absmax.float().half().reshape(n, k // blocksize, 1)).reshape(n, k)
    products = (weight * x.reshape(1, k).half()).double()
    y = products.sum(dim=1)
    if bias is not None:
        y = y + bias.double().reshape(-1)
    return y, products.abs().sum(dim=1)


def check(device) -> Optional[str]:
    """Run the float16 kernel once on ``device`` (compiling it) against :func:`bnb_arithmetic`, as Qwen2.5's q/k/v
    projections take it (three weights in one launch, a bias, their tile configuration: a model reuses this
    compile); None when it agrees, else why not (one line)."""
    import torch

    try:
        from bitsandbytes import functional as F

        generator = torch.Generator(device=device).manual_seed(0)
        members = [F.quantize_4bit(torch.randn(n, 1024, device=device, generator=generator) * 0.02, blocksize=64, quant_type="nf4")
                   for n in (96, 32, 32)]
        x = torch.randn(1024, device=device, generator=generator).half()
        biases = [torch.randn(n, device=device, generator=generator).half() for n in (96, 32, 32)]
        y = GroupPlan(members, torch.device(device), TUNED[(3584, 3584)])(x, torch.cat(biases)).double()
        worst = 0.0
        for (packed, state), bias, part in zip(members, biases, y.split([96, 32, 32])):
            reference, size = bnb_arithmetic(x, packed, state, bias)
            limit = 2.0 ** -10 * reference.abs() + 2.0 ** -16 * size + 1e-6  # float16 output rounding, float32 sums
            worst = max(worst, ((part - reference).abs() / limit).max().item())
    except Exception as error:
        return f"the float16 4-bit kernel failed to run: {type(error).__name__}: {error}".splitlines()[0][:300]
    return None if worst <= 1 else f"the float16 4-bit kernel disagrees with bitsandbytes' arithmetic ({worst:.3g} times the bound)"
