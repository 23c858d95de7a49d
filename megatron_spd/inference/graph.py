"""One-token decode steps captured in a CUDA graph and replayed (eager elsewhere).

On a GPU, a decode step at batch 1 is dominated by per-step overhead: Python and ~60 kernel
launches per block in megatron's eager path (issue 14 measured ~30x the weight-read time on a
70B TP=8 shard). ``DecodeStep`` runs the whole step (embedding, every block, LM head, logits
gather) on the tensorised KV-cache path (core/cached_attention.py), whose shapes are fixed and
whose state lives on the device, so it can be captured once per (model, cache, batch) with
``torch.cuda.CUDAGraph`` and replayed: a replay costs one launch. The new tokens go into a
static input buffer; the cache slot, mask and position ids are computed inside the graph from
the context's device ``length``, which the graph itself advances.

Without CUDA (or with graphs switched off) the same step runs eagerly with the same static
buffers, which is how CPU tests exercise exactly what a GPU replays. Collectives issued inside
the step (NCCL) are captured with it; the Python collective hooks (parallel/collectives.py) see
them once, at capture, and not at replay.
"""
from __future__ import annotations

import torch

from ..core.cached_attention import CacheContext

WARMUP_STEPS = 2  # eager runs on a side stream before capture (torch's documented recipe)


class DecodeStep:
    """The decode step of ``model`` on ``context`` for ``batch`` rows; call with the new tokens
    [batch] to get the next logits [batch, V] (a fresh tensor)."""

    def __init__(self, model, context: CacheContext, batch: int, *, capture: bool,
                 pool=None) -> None:
        self.model, self.context, self.batch = model, context, batch
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=context.length.device)
        self.graph = None
        if capture:
            self._capture(pool)

    def _step(self) -> torch.Tensor:
        pos = self.context.begin_step(self.batch, 1)
        logits = self.model(self.tokens, pos, None, inference_context=self.context,
                            runtime_gather_output=True)
        self.context.end_step(1)
        return logits[:, -1, :]

    def _capture(self, pool) -> None:
        ctx = self.context
        start = ctx.length.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # writes slot `start`, which the first replay rewrites
                self._step()
                ctx.length.copy_(start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.logits = self._step()
        self.graph = graph

    def __call__(self, next_tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(next_tokens.view(self.batch, 1))
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits.clone()
