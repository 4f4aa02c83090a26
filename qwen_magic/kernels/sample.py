"""The decode sampler in two kernel launches (:mod:`._sample_triton`), for :class:`qwen_magic.sampler.Sampler`.

PyTorch's way (transformers' logits processors, and the Sampler's fallback) costs about twenty kernels a
token, with a sort and a top-k over the whole vocabulary: 0.28 ms of GPU time for Qwen2.5's 152,064
entries on an H100, next to a 4 ms decode step. Here the vocabulary is scored in blocks that each keep
their ``K`` best; one program takes the ``K`` best of those and picks the token.

What stays the same as transformers' processors: the repetition penalty and the temperature are the same
float32 operations; greedy is the argmax of the same scores (the first of equal ones); top-k keeps every
score at least the k-th largest; top-p drops the smallest kept scores while their probability mass is at
most ``1 - top_p`` (the largest always stays). The only limit is ``K``: ``top_k`` must be below it
(:data:`MAX_TOP_K`), and scores tied with the k-th are kept only while they fit among the ``K``
candidates. A sampler without top-k (``top_k=0``) keeps PyTorch's way. Probabilities are computed over
the candidates (the others are zero either way), with ``exp`` in float32 as the GPU computes it; the
draw is an exponential race with Triton's Philox stream from the reply's seed (reproducible by seed,
as the fallback is, though not the same stream).
"""

from typing import Optional

import numpy

BLOCK = 1024  # vocabulary entries a program scores (with 8 warps: the quickest to compile of those measured)
CHUNK = 512  # candidates the finishing program reads at a time
MAX_TOP_K = 63  # top_k must leave the candidates one slot at least for a tie


def available(device=None) -> Optional[str]:
    from .device import unsupported

    return unsupported(device)


def check(device, dtype=None) -> Optional[str]:
    """Run both kernels once (compiling them) and compare a greedy pick and a draw with PyTorch's; None when right.
    The logits are in ``dtype`` (the model's), so the model's first reply reuses these compiles."""
    import torch

    try:
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(1, 3000, device=device, generator=generator) * 4).to(dtype or torch.float32).float()
        logits_in_dtype = logits.to(dtype or torch.float32)
        seen = torch.zeros(3000, dtype=torch.bool, device=device)
        seen[:100] = True
        # the variants Qwen2.5 takes (its repetition penalty; top-k 20), so a model reuses these compiles
        penalized = torch.where(seen, torch.where(logits < 0, logits * 1.3, logits / 1.3), logits)
        greedy = SampleKernel(3000, device, greedy=True, penalty=1.3)
        if int(greedy(logits_in_dtype, seen.clone())) != int(penalized.argmax(dim=-1)):
            return "the sampling kernel's greedy pick differs from PyTorch's"
        sampled = SampleKernel(3000, device, temperature=0.7, top_k=20, top_p=0.9, penalty=1.3, seed=1)
        allowed = set((penalized / 0.7).topk(20).indices.view(-1).tolist())
        if int(sampled(logits_in_dtype, seen.clone())) not in allowed:
            return "the sampling kernel drew a token outside the top-k"
    except Exception as error:
        return f"the sampling kernel failed to run: {type(error).__name__}: {error}".splitlines()[0][:300]
    return None


def patch(model):
    """Nothing to patch: :class:`qwen_magic.sampler.Sampler` asks for a :class:`SampleKernel`."""
    return lambda: None


def handles(top_k: int, vocab: int, greedy: bool) -> bool:
    """Whether :class:`SampleKernel` takes this sampling (sampling needs 0 < top_k <= MAX_TOP_K)."""
    return greedy or 0 < min(top_k, vocab) <= MAX_TOP_K


class SampleKernel:
    """One reply's sampler: ``(1, vocab)`` logits (and the seen-token mask, for the penalty) -> ``(1, 1)`` token id."""

    def __init__(self, vocab: int, device, *, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, penalty: float = 1.0, seed: int = 0, block: int = BLOCK, chunk: int = CHUNK):
        import torch

        from . import _sample_triton

        self.kernels, self.vocab, self.device = _sample_triton, vocab, torch.device(device)
        if not handles(top_k, vocab, greedy):
            raise ValueError(f"the sampling kernel needs 0 < top_k <= {MAX_TOP_K}, got {top_k}")
        top_k = min(top_k, vocab)
        self.greedy = greedy
        self.K = 1 if greedy else max(2, 1 << top_k.bit_length())  # a power of two above top_k: room for ties
        self.block, self.chunk = block, max(chunk, self.K)
        self.programs = -(-vocab // block)
        self.keys = torch.empty(self.programs * self.K, dtype=torch.int64, device=device)
        self.draws = torch.zeros(1, dtype=torch.int64, device=device)
        f32 = numpy.float32
        self.penalty = float(f32(penalty))
        self.inv_penalty = float(f32(1.0) / f32(penalty))  # PyTorch divides a float32 tensor by a scalar so
        self.inv_temperature = float(f32(1.0) / f32(temperature)) if not greedy else 1.0
        self.scale = not greedy and temperature != 1.0
        self.use_penalty = penalty != 1.0
        self.top_k, self.top_p, self.seed = top_k, top_p, int(seed) % (2**31)
        self.threshold = float(f32(1.0) - f32(top_p))  # transformers compares with 1 - top_p
        self.top_k_active = not greedy and top_k < vocab
        self.top_p_active = not greedy and top_p < 1.0

    def takes(self, logits) -> bool:
        """Whether ``logits`` are this kernel's: its vocabulary, on its device."""
        device = logits.device
        return (logits.shape[-1] == self.vocab and device.type == self.device.type
                and (self.device.index is None or device.index == self.device.index))

    def __call__(self, logits, seen=None):
        """The token for ``logits``; ``seen`` (the penalty's mask of tokens so far, bool) gets it marked."""
        import torch

        out = torch.empty((1, 1), dtype=torch.int64, device=self.device)
        self.score(logits, seen)
        self.pick(out, seen)
        return out

    def score(self, logits, seen=None) -> None:
        """The candidates of ``logits``: each block's ``K`` best, in ``self.keys``."""
        from .device import on

        logits = logits.reshape(-1)
        if not logits.is_contiguous():
            logits = logits.contiguous()
        with on(self.device):
            self.kernels.candidates_kernel[(self.programs,)](
                logits, seen if seen is not None else self.draws, self.keys, self.vocab, self.penalty, self.inv_penalty,
                self.inv_temperature, BLOCK=self.block, K=self.K, PENALTY=self.use_penalty and seen is not None,
                SCALE=self.scale, num_warps=8)

    def pick(self, out, seen=None) -> None:
        """The token from the candidates into ``out`` (``(1, 1)`` int64); a draw advances the random stream."""
        from .device import on

        with on(self.device):
            self.kernels.finish_kernel[(1,)](
                self.keys, self.keys.numel(), out, seen if seen is not None else self.draws, self.draws, self.seed, self.top_k,
                self.threshold, K=self.K, GREEDY=self.greedy, TOP_K=self.top_k_active, TOP_P=self.top_p_active,
                MARK=seen is not None, CHUNK=self.chunk, num_warps=4)
