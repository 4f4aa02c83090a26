"""Which transformers modules the fused kernels (fused.py) may replace, and the patch that does it.

A module's ``forward`` is replaced only when its source is exactly the arithmetic the
kernels reproduce (compared after removing comments and whitespace), so a transformers
release that changes it falls back to eager. ``fused.patch`` is this module's ``patch``.
"""

import functools
import importlib
import inspect
import re
from typing import Callable, Optional

import torch

from . import fused as _fused


# --- which transformers code is reproduced (checked by source, so a changed formula is never patched)


@functools.lru_cache(maxsize=None)
def _body(function) -> Optional[str]:
    """The statements of a function, without its signature, comments, docstring, whitespace. Read once per function:
    reading a source costs about 0.3 ms, and the same functions are asked again (every MLP module's activation at a
    patch; transformers' ``StaticLayer.update`` at each new cache, ~10 ms for the 7B's 28 layers before)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    lines = []
    for line in source.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("@"):
            lines.append(line)
    text = "".join(lines)
    text = re.sub(r'^def\w+\(.*?\)(->[^:]+)?:', "", re.sub(r"\s+", "", text), count=1)
    return re.sub(r'^("""|\'\'\').*?\1', "", text, flags=re.S)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


_RMS_FORWARD = _squash("""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
""")
_OFFSET_FORWARD = _squash("""
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""")
_OFFSET_NORM = _squash("return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)")
_MLP_FORWARD = _squash("""
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
""")
_ROPE = _squash("""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
""")
_ROTATE_HALF = _squash("""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
""")

# The Qwen families whose norm and MLP classes are considered (any class named ...RMSNorm or
# ...MLP there whose source is exactly one of the formulas above; vision MLPs, written otherwise, stay eager).
_FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Attention classes whose module-level apply_rotary_pos_emb is the plain one (Qwen3.5 / Qwen3-Next rotate part
# of each head, the VL models take multimodal sections: theirs stays eager).
_ROPE_ATTENTIONS = {"Qwen2Attention": "qwen2", "Qwen3Attention": "qwen3", "Qwen3MoeAttention": "qwen3_moe"}


def _family_of(cls) -> Optional[str]:
    parts = cls.__module__.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3] == f"modeling_{parts[2]}" and parts[2] in _FAMILIES:
        return parts[2]
    return None


@functools.lru_cache(maxsize=None)
def _module(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _verified(cls) -> Optional[str]:
    """'norm', 'offset_norm' or 'mlp' when ``cls`` (a transformers class) computes what our kernels reproduce."""
    forward = _body(cls.forward)
    if forward == _RMS_FORWARD:
        return "norm"
    if forward == _OFFSET_FORWARD and getattr(cls, "_norm", None) is not None and _body(cls._norm) == _OFFSET_NORM:
        return "offset_norm"
    if forward == _MLP_FORWARD:
        return "mlp"
    return None


@functools.lru_cache(maxsize=None)
def _rope_verified(family: str) -> bool:
    module = _module(family)
    function = getattr(module, "apply_rotary_pos_emb", None)
    rotate = getattr(module, "rotate_half", None)
    return (
        function is not None and rotate is not None and _body(function) == _ROPE and _body(rotate) == _ROTATE_HALF
        and list(inspect.signature(function).parameters)[:4] == ["q", "k", "cos", "sin"]
    )


def _is_silu(act) -> bool:
    if type(act) is torch.nn.SiLU:
        return not act.inplace
    return type(act).__name__ == "SiLUActivation" and _body(type(act).forward) == _squash("return nn.functional.silu(input)")


@functools.lru_cache(maxsize=None)
def _kind(cls) -> Optional[str]:
    """'norm', 'offset_norm', 'mlp', 'rope' (an attention whose rotary embedding we take) or None, for a module class."""
    family = _family_of(cls)
    if family is None:
        return None
    if cls.__name__.endswith(("RMSNorm", "MLP")):
        return _verified(cls)
    if _ROPE_ATTENTIONS.get(cls.__name__) == family and _rope_verified(family):
        return "rope"
    return None


# --- the forwards that take the kernels


def _norm_usable(x, weight) -> bool:
    return (
        _fused._usable(x, weight) and x.device == weight.device and x.dim() >= 1 and weight.dim() == 1
        and weight.shape[0] == x.shape[-1] and weight.is_contiguous()
    )


def _norm_forward(module, original):
    def forward(hidden_states):
        if _norm_usable(hidden_states, module.weight):
            return _fused.rms_norm(hidden_states, module.weight, module.variance_epsilon)
        return original(hidden_states)
    return forward


def _offset_norm_forward(module, original):
    def forward(x):
        if _norm_usable(x, module.weight):
            return _fused.rms_norm(x, module.weight, module.eps, offset=True)
        return original(x)
    return forward


def _mlp_forward(module, original):
    def forward(x):
        gate = module.gate_proj(x)
        up = module.up_proj(x)
        if _fused._usable(gate, up) and gate.dtype == up.dtype and gate.shape == up.shape and gate.device == up.device:
            hidden = _fused.silu_mul(gate, up, in_place=True)  # gate is this forward's own
        else:
            hidden = module.act_fn(gate) * up
        return module.down_proj(hidden)
    return forward


def _attention_forward(original):
    def forward(*args, **kwargs):
        _fused._local.depth = getattr(_fused._local, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _fused._local.depth -= 1
    return forward


_rope_installs = {}  # family -> [original function, number of patched models using it]


def _rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and all(key == "unsqueeze_dim" and value == 1 for key, value in kwargs.items())
        if plain and getattr(_fused._local, "depth", 0) > 0 and _fused._rope_supported(q, k, cos, sin):
            return _fused.rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)
    apply_rotary_pos_emb._qwen_magic_original = original
    return apply_rotary_pos_emb


def _install_rope(family: str) -> None:
    module = _module(family)
    entry = _rope_installs.get(family)
    if entry is None:
        original = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = _rope_dispatcher(original)
        entry = _rope_installs[family] = [original, 0]
    entry[1] += 1


def _uninstall_rope(family: str) -> None:
    entry = _rope_installs.get(family)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        module = _module(family)
        if getattr(module.apply_rotary_pos_emb, "_qwen_magic_original", None) is entry[0]:
            module.apply_rotary_pos_emb = entry[0]
        del _rope_installs[family]


def patch(model) -> Callable[[], None]:
    """Route ``model``'s RMSNorms, SiLU MLPs and rotary embeddings through the fused kernels.

    Instance-level: each module's ``forward`` is replaced on that module only. Calls on
    CUDA tensors (or CPU ones after ``force_kernels``) take the kernels; anything else
    the original code. Returns ``restore()``, which puts everything back; patching a
    patched model returns the same ``restore``. ``restore.counts`` says how many
    modules of each kind were patched.
    """
    existing = getattr(model, _fused._MARK, None)
    if existing is not None:
        return existing
    replaced = []  # (module, the forward it had in its own __dict__ (an accelerate hook's, say) or None)
    families = []
    counts = {"norm": 0, "offset_norm": 0, "mlp": 0, "rope": 0}
    for module in model.modules():
        kind = _kind(type(module))
        make = {"norm": _norm_forward, "offset_norm": _offset_norm_forward, "mlp": _mlp_forward}.get(kind)
        if kind is None or (kind == "mlp" and not _is_silu(getattr(module, "act_fn", None))):
            continue
        # An instance-level forward already there (accelerate's hooks put one) is wrapped, and put back by restore
        own = module.__dict__.get("forward")
        original = module.forward
        if make is not None:
            module.forward = make(module, original)
            counts[kind] += 1
        else:
            module.forward = _attention_forward(original)
            counts["rope"] += 1
            family = _family_of(type(module))
            if family not in families:
                families.append(family)
                _install_rope(family)
        replaced.append((module, own))

    def restore() -> None:
        if getattr(model, _fused._MARK, None) is not restore:
            return  # already restored
        for module, own in replaced:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = own
        for family in families:
            _uninstall_rope(family)
        try:
            delattr(model, _fused._MARK)
        except AttributeError:
            pass

    restore.counts = counts
    object.__setattr__(model, _fused._MARK, restore)
    return restore
