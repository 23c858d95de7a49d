"""The KV cache of generation on a megatron-core GPTModel (dense or SPD blocks), on every TP rank.

megatron-core's ``StaticInferenceEngine`` needs CUDA-only calls (docs/megatron-core-on-cpu.md,
item 19), so generation here is a thin engine over ``GPTModel.forward`` with a megatron static
inference context as its KV cache. Two paths, chosen per batch at prefill (steps.py):
- tensorised (models from ``megatron_spd.core.spec``, whose attention is ``CachedSelfAttention``):
  cache length, padding and masks in device tensors, K/V written in place, fused attention
  (core/cached_attention.py); each decode step is one ``DecodeStep``, captured in a CUDA graph on
  GPU (graph.py; eager on CPU, with ``cuda_graph=False``, or if capture fails, with a warning);
- megatron's own static path (any other GPTModel, e.g. the benchmark's stock model, or
  ``tensor_path=False``): ``StaticInferenceContext`` with explicit masks, as megatron does it.
Both give the same logits (tests/test_decode_path.py); SPDTransformerLayer hands the context to
the attention like a dense layer does, so SPD blocks cache exactly like dense ones.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core.cached_attention import CacheContext
from ..parallel import compat
from .graph import DecodeStep


class KVCache:
    """The inference context (cached_attention.CacheContext) plus each row's left-pad length, and
    the decode steps (graphs) made for it.

    One cache holds one batch from prefill to the end of its decode; ``reset()`` reuses the
    allocated buffers (and captured decode graphs) for the next batch of the same or smaller
    size. ``tensor_path``: use the tensorised path where the model supports it; ``cuda_graph``:
    capture its decode step on GPU (``graph_error`` says why a capture failed, if one did).
    """
    def __init__(self, max_batch: int, max_seq_len: int, *, tensor_path: bool = True,
                 cuda_graph: bool = True) -> None:
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"KV cache needs max_batch >= 1 and max_seq_len >= 1, "
                             f"got {max_batch} and {max_seq_len}")
        self.context = CacheContext(max_batch, max_seq_len, compat.device())
        self.pad: Optional[torch.Tensor] = None  # [b] left-pad lengths; None = no padding
        self.batch = 0
        self.tensor_path, self.cuda_graph = tensor_path, cuda_graph
        self.graph_error: Optional[str] = None
        self._steps: dict[tuple[int, int], DecodeStep] = {}
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.context.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.context.max_sequence_length

    @property
    def length(self) -> int:
        """Cache slots filled so far (padded prompt length + decoded tokens)."""
        return self.context.sequence_len_offset

    def reset(self) -> None:
        self.context.reset()
        self.pad = None
        self.batch = 0

    def decode_step_for(self, model) -> DecodeStep:
        """The (captured, where possible) tensorised decode step of ``model`` for this batch."""
        key = (id(model), self.batch)
        step = self._steps.get(key)
        if step is not None and step.model is model:
            return step
        capture = self.cuda_graph and compat.on_gpu() and self.graph_error is None
        if capture and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            step = DecodeStep(model, self.context, self.batch, capture=capture, pool=self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure: decode eagerly, say why
            self.graph_error = f"{type(exc).__name__}: {exc}"
            warnings.warn("CUDA graph capture of the decode step failed, decoding eagerly "
                          f"instead: {self.graph_error}")
            step = DecodeStep(model, self.context, self.batch, capture=False)
        self._steps[key] = step
        return step


def new_cache(max_batch: int, max_seq_len: int, *, tensor_path: bool = True,
              cuda_graph: bool = True) -> KVCache:
    """An empty KV cache for up to ``max_batch`` rows of ``max_seq_len`` tokens (padding
    included). ``tensor_path=False`` forces megatron's own static path; ``cuda_graph=False``
    decodes eagerly on GPU too."""
    return KVCache(max_batch, max_seq_len, tensor_path=tensor_path, cuda_graph=cuda_graph)
