"""Which training samples a rank sees at a given step: a pure function of (seed, step).

Resuming must replay the uninterrupted data order, and DP=d with micro-batch b must see the same
global batch as DP=1 with micro-batch d*b. So nothing here has state: the global batch of step k
is positions [k*B, (k+1)*B) of an endless stream that visits every sample once per epoch in the
order ``randperm(N, seed + epoch)``; micro-step a of DP rank r takes the slice
``((a * dp + r) * micro_batch, + micro_batch)`` of it.
"""
from __future__ import annotations

from functools import lru_cache

import torch


class SampleOrder:
    """Deterministic, resumable order over ``samples`` ([N, seq_len + 1] token blocks)."""

    def __init__(self, samples: torch.Tensor, seed: int, shuffle: bool = True):
        if samples.dim() != 2 or samples.shape[1] < 2:
            raise ValueError(f"training samples must be [N, seq_len + 1] blocks, got "
                             f"{tuple(samples.shape)}")
        self.samples = samples
        self.seed = seed
        self.shuffle = shuffle

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> torch.Tensor:
        n = self.samples.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices at stream positions [start, start + count)."""
        n = self.samples.shape[0]
        pos = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // n)[int(p) % n] for p in pos])

    def micro_batch(self, step: int, micro: int, *, micro_batch: int, grad_accum: int,
                    dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) [micro_batch, seq_len] for micro-step ``micro`` of ``step``."""
        global_batch = micro_batch * grad_accum * dp_size
        start = step * global_batch + (micro * dp_size + dp_rank) * micro_batch
        block = self.samples[self.indices(start, micro_batch)]
        return block[:, :-1], block[:, 1:]
