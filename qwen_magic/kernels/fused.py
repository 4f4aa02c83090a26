"""Fused Triton kernels for the small non-linear parts of a Qwen decoder layer (issue 13, part 2).

A CUDA-graph decode step of a 7B model spends about half its time launching small
kernels: an RMSNorm is six of them, the rotary embedding of q and k twelve, SiLU
then multiply two. Here each is one kernel, doing the same arithmetic as
transformers' eager code, rounding where it rounds:

- **RMSNorm** (Qwen2/Qwen3/Qwen3-MoE and the text models of Qwen2.5-VL/Qwen3-VL, including
  Qwen3's per-head ``q_norm``/``k_norm``):
  ``x.float()``, mean of squares, ``x * rsqrt(var + eps)``, rounded to the input dtype,
  then ``weight * x``. The sum of squares is added in another order than PyTorch's
  reduction, so the result is within 1 unit in the last place of the output, usually equal.
  The ``(1 + weight)`` norms of Qwen3.5 / Qwen3-Next (no rounding before the weight)
  are reproduced too. Any other norm class is left alone.
- **Rotary embedding** of q and k in one kernel: ``q*cos`` rounded to the dtype,
  ``rotate_half(q)*sin`` rounded, their sum rounded, as eager does: bitwise equal.
  ``apply_rotary_pos_emb`` is a module-level function of modeling_qwen2/qwen3/qwen3_moe,
  so the patch replaces it there with a dispatcher that takes the kernel only inside
  the forward of a patched model's attention (a per-thread flag); every other caller
  gets the original function.
- **SiLU times up** in the MLP: ``silu`` in float32 (``x / (1 + exp(-x))`` with the
  accurate exp and division PyTorch's CUDA kernel uses), rounded to the dtype, then
  the product rounded: bitwise equal on CUDA (on a CPU, PyTorch's vectorized exp
  may differ from the interpreter's by an ulp of float32).

Modules are patched only when their ``forward`` source is exactly the code reproduced
here (checked with ``inspect``), so a transformers release that changes the
arithmetic falls back to eager instead of silently computing something else.

    from qwen_magic.kernels import fused
    reason = fused.available(model.device) or fused.check(model.device, model.dtype)
    if reason is None:
        restore = fused.patch(model)   # ...; restore() puts the original forwards back

``available`` is cheap (triton importable, a CUDA device of compute capability 7.5 or newer);
``check`` compiles and runs each kernel once against eager arithmetic (seconds the first time),
catching a Triton install that cannot build its launcher.

The kernels run on CUDA tensors of float16, bfloat16 or float32; anything else
takes the original code. They use fixed launch configurations (no autotuning, no
host synchronization), so they can be captured in a CUDA graph. For tests,
``force_kernels(True)`` runs them on CPU tensors too, through Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""

import functools
import os
import threading
from typing import Optional

import torch

from . import allowed
from .device import on, unsupported

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_force_cpu = False
_local = threading.local()  # .depth > 0 inside a patched attention's forward
_kernels = None
_MARK = "_qwen_magic_fused_restore"


def force_kernels(on: bool = True) -> None:
    """Take the kernels on CPU tensors too (for tests under ``TRITON_INTERPRET=1``)."""
    global _force_cpu
    _force_cpu = bool(on)


def available(device=None) -> Optional[str]:
    """None when the kernels can run on ``device`` (default: the current CUDA device), else why not, in one line."""
    return unsupported(device)


def check(device=None, dtype=torch.float16) -> Optional[str]:
    """Run each kernel once on ``device`` (compiling it: a few seconds the first time) against the eager
    arithmetic; None when all agree, else a one-line reason (a missing C compiler for Triton's
    launcher, say). ``available`` first."""
    device = torch.device("cuda") if device is None else torch.device(device)
    reason = None if (_force_cpu and device.type == "cpu") else available(device)
    if reason:
        return reason
    try:
        generator = torch.Generator().manual_seed(0)
        random = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)
        x, weight = random(2, 64), random(64)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        norm_ok = torch.allclose(rms_norm(x, weight, 1e-6).float(), (weight * normed.to(dtype)).float(), rtol=2e-2, atol=1e-3)
        q, k, cos, sin = random(1, 2, 3, 16), random(1, 1, 3, 16), random(1, 3, 16), random(1, 3, 16)
        rotate = lambda t: torch.cat((-t[..., 8:], t[..., :8]), dim=-1)
        eager = [(t * cos[:, None]) + (rotate(t) * sin[:, None]) for t in (q, k)]
        rope_ok = all(torch.equal(a, b) for a, b in zip(rope(q, k, cos, sin), eager))
        gate, up = random(100), random(100)
        silu_ok = torch.allclose(silu_mul(gate, up).float(), (torch.nn.functional.silu(gate) * up).float(), rtol=2e-2, atol=1e-3)
    except Exception as error:  # compilation or launch
        return f"the fused kernels failed to run: {type(error).__name__}: {error}".splitlines()[0][:300]
    failed = [name for name, ok in (("RMSNorm", norm_ok), ("rotary embedding", rope_ok), ("SiLU*up", silu_ok)) if not ok]
    return f"the fused kernels disagree with eager PyTorch: {', '.join(failed)}" if failed else None


# --- the kernels


def _build():
    """The Triton kernels, imported on first use (``import qwen_magic.kernels.fused`` needs no triton)."""
    global _kernels
    if _kernels is None:
        import triton

        from . import _fused_triton as k

        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        _kernels = dict(rms_norm=k.rms_norm_kernel, rope=k.rope_kernel, silu_mul=k.silu_mul_kernel,
                        interpreted=interpreted, next_power_of_2=triton.next_power_of_2)
    return _kernels


# No fused multiply-add: eager PyTorch rounds every product before it is added.
_LAUNCH = dict(enable_fp_fusion=False)


def _usable(*tensors) -> bool:
    return allowed(prefill=True) and all(
        isinstance(t, torch.Tensor) and t.dtype in _DTYPES and (t.is_cuda or (_force_cpu and t.device.type == "cpu"))
        for t in tensors
    )


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


@functools.lru_cache(maxsize=None)
def _reciprocal(n: int) -> float:
    """1/n divided in float32, as PyTorch's CUDA mean computes its factor (not rounded from a double)."""
    return (torch.ones((), dtype=torch.float32) / n).item()  # a CPU tensor: no device sync


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension, as Qwen2RMSNorm (``offset=False``) or Qwen3NextRMSNorm (``offset=True``) computes it."""
    k = _build()
    n = x.shape[-1]
    if offset:
        out_dtype = x.dtype
    else:
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
    rows = x.reshape(-1, n)
    if rows.shape[0] and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    block = k["next_power_of_2"](n)
    with on(x.device):
        k["rms_norm"][(rows.shape[0],)](
            rows, weight, out, rows.stride(0), n, float(n), _reciprocal(n), float(eps),
            BLOCK=block, OFFSET=offset, DIVIDE=x.device.type != "cuda", INTERPRETED=k["interpreted"], num_warps=_warps(block), **_LAUNCH,
        )
    return out


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``apply_rotary_pos_emb(q, k, cos, sin)`` (unsqueeze_dim=1): q (B, Hq, S, D), k (B, Hk, S, D), cos/sin (B, S, D)."""
    kern = _build()
    batch, hq, seq, dim = q.shape
    hk = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    programs = batch * seq * (hq + hk)
    if programs == 0:
        return q_out, k_out
    cos = cos.expand(batch, seq, dim)
    sin = sin.expand(batch, seq, dim)
    block = kern["next_power_of_2"](dim // 2)
    with on(q.device):
        kern["rope"][(programs,)](
            q, k, cos, sin, q_out, k_out, hq, hk, seq,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            HALF=dim // 2, BLOCK=block, INTERPRETED=kern["interpreted"], num_warps=1, **_LAUNCH,
        )
    return q_out, k_out


def _rope_supported(q, k, cos, sin) -> bool:
    if not _usable(q, k, cos, sin) or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return False
    if len({q.device, k.device, cos.device, sin.device}) != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    batch, _, seq, dim = q.shape
    if dim % 2 or k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != dim:
        return False
    for t in (cos, sin):
        if t.shape[-1] != dim or t.shape[1] != seq or t.shape[0] not in (1, batch):
            return False
    if any(t.stride(-1) != 1 for t in (q, k, cos, sin)):
        return False
    # empty_like keeps q's strides only for a dense tensor; the kernel takes any output strides anyway
    return True


def silu_mul(gate: torch.Tensor, up: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of one shape and dtype; ``in_place``: written over ``gate`` when it is
    contiguous (each element is read before it is written), so a long prompt's MLP holds two intermediates, not three."""
    k = _build()
    g, u = gate.contiguous(), up.contiguous()
    out = gate if in_place and g is gate else torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = g.numel()
    if n == 0:
        return out
    block = 1024
    with on(gate.device):
        k["silu_mul"][(triton_cdiv(n, block),)](g, u, out, n, BLOCK=block, INTERPRETED=k["interpreted"], num_warps=4, **_LAUNCH)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


from .fused_patch import _kind, _rope_installs, patch  # noqa: E402,F401 (the patch lives there; tests reach these)
