"""Next-token choice from full-vocabulary logits: greedy, or sampling with temperature/top-k/top-p.

Every TP rank holds the same gathered logits (``runtime_gather_output``) and draws from a
``torch.Generator`` seeded identically on every rank, so every rank picks the same token without
a broadcast; the decode loop therefore stays in lockstep and issues no extra collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    """``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable the filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [b, V] with everything outside the top-k / nucleus (top-p) set to -inf.

    The nucleus keeps the smallest prefix of tokens (by descending probability) whose mass
    reaches ``top_p``; the most likely token is always kept.
    """
    out = logits.clone()
    vocab = out.size(-1)
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row of ``logits`` [b, V] (fp32 math), as a LongTensor [b]."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded with ``seed``; the same seed on every rank gives the same draws."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
