"""Sampling on the device, as transformers' logits processors do it, without a host synchronisation."""

import random
from typing import List

import torch

from .settings import GenerationSettings


class Sampler:
    """Repetition penalty, temperature, top-k, top-p and the draw, in that order (as transformers'), on the device.

    The draw is the exponential-race form of sampling (argmax of p / E, E ~ Exp(1)),
    which needs no host synchronisation, unlike ``torch.multinomial``.

    ``kernels``: the fast engine's kernel modules; with :mod:`qwen_magic.kernels.sample` among them, greedy
    picks and top-k sampling take its two launches instead of about twenty PyTorch kernels.
    """

    def __init__(self, model, settings: GenerationSettings, prompt: List[int], device, kernels=()):
        defaults = model.generation_config
        self.greedy = not settings.do_sample or settings.temperature == 0
        self.temperature = settings.temperature
        self.top_p = settings.top_p
        top_k = settings.top_k if settings.top_k is not None else defaults.top_k
        self.top_k = 50 if top_k is None else top_k
        penalty = settings.repetition_penalty if settings.repetition_penalty is not None else defaults.repetition_penalty
        self.penalty = 1.0 if penalty is None else penalty
        vocab = model.get_output_embeddings().weight.shape[0]
        self.seen = None
        if self.penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
        self.generator = None
        seed = settings.seed if settings.seed is not None else random.randrange(2**63)
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.kernel = None
        sample = next((module for module in kernels if module.__name__.endswith(".sample")), None)
        if sample is not None and sample.handles(self.top_k, vocab, self.greedy):
            self.kernel = sample.SampleKernel(vocab, device, greedy=self.greedy, temperature=self.temperature, top_k=self.top_k,
                                              top_p=self.top_p, penalty=self.penalty, seed=seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, vocab) logits -> (1, 1) token id, on the same device."""
        if self.kernel is not None and self.kernel.takes(logits):
            return self.kernel(logits, self.seen)
        scores = logits.float()
        if self.seen is not None:
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(self.seen, penalized, scores)
        if self.greedy:
            token = scores.argmax(dim=-1, keepdim=True)
        else:
            scores = scores / self.temperature
            if 0 < self.top_k < scores.shape[-1]:
                kth = torch.topk(scores, self.top_k).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if self.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=False)
                cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative <= 1 - self.top_p
                remove[..., -1:] = False
                scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
            probs = scores.softmax(dim=-1)
            race = torch.empty_like(probs).exponential_(generator=self.generator)
            token = (probs / race).argmax(dim=-1, keepdim=True)
        if self.seen is not None:
            self.seen.scatter_(0, token.view(-1), True)
        return token
