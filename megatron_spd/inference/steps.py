"""The low-level steps on a KV cache (what the latency benchmark times): ``prefill(model, cache,
tokens, prompt_lengths) -> [b, V]``, ``decode_step(model, cache, next_tokens) -> [b, V]`` (full-
vocabulary logits of the last position, identical on every TP rank), ``extend`` (a chunked
prefill: logits of every new position) and ``rewind``. Call each on every TP rank with the same
arguments.

Prompts of different lengths share a batch by left padding: pad keys are masked in prefill and in
every decode step, and each row's position ids count from its first real token. megatron slices
RoPE by cache slot, not by position id, so a padded row's rotary angles are shifted by its pad
length; attention scores depend only on relative positions, so the result equals the row run
alone up to float rounding (and exactly for learned absolute positions).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.cached_attention import CacheContext, uses_cached_attention
from ..core.sharding import causal_mask
from ..errors import SPDError
from ..parallel import compat
from ..parallel.mcore_versions import logits_flag_holder
from .cache import KVCache


class GenerationError(SPDError, RuntimeError):
    """Generation stopped because of bad input or because a peer rank failed."""


def _check_model(model) -> None:
    if model.training:
        raise GenerationError("the model is in training mode; call model.eval() before generating "
                              "(megatron only uses the KV cache in eval mode)")
    if model.config.sequence_parallel:
        raise GenerationError("generation needs a model built without sequence parallel (a "
                              "one-token decode step cannot be split over the sequence); load it "
                              "with sequence_parallel=False")


def _last_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :]


@torch.no_grad()
def prefill(model, cache: KVCache, tokens: torch.Tensor,
            prompt_lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Run the prompts ``tokens`` [b, s] into the empty ``cache``; logits of the last position [b, V].

    ``prompt_lengths`` (optional): each row's real length; rows are left-padded to ``s`` (the pad
    token values do not matter). Call on every TP rank with the same arguments.
    """
    _check_model(model)
    if cache.length:
        raise GenerationError("the KV cache already holds a batch; call cache.reset() first")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise GenerationError(f"prefill needs tokens of shape [batch, seq] with seq >= 1, "
                              f"got {tuple(tokens.shape)}")
    b, s = tokens.shape
    if b > cache.max_batch or s > cache.max_seq_len:
        raise GenerationError(f"batch [{b}, {s}] does not fit a KV cache of "
                              f"[{cache.max_batch}, {cache.max_seq_len}]; make a larger cache")
    dev = compat.device()
    tokens = tokens.to(dev)
    mask = causal_mask(s, dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    pad = None
    if prompt_lengths is not None:
        lengths = torch.as_tensor(list(prompt_lengths), dtype=torch.long, device=dev)
        if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > s:
            raise GenerationError(f"prompt_lengths must be {b} values in [1, {s}], "
                                  f"got {lengths.tolist()}")
        if int(lengths.min()) < s:
            pad = s - lengths
            key_is_pad = torch.arange(s, device=dev).unsqueeze(0) < pad.unsqueeze(1)  # [b, s]
            mask = mask | key_is_pad[:, None, None, :]
            pos = (pos - pad.unsqueeze(1)).clamp_min(0)
    ctx = cache.context
    ctx.tensor_path = cache.tensor_path and uses_cached_attention(model)
    if ctx.tensor_path:
        ctx.pad[:b].copy_(pad if pad is not None else torch.zeros(b, dtype=torch.long))
    logits = _forward(model, ctx, tokens, pos, mask)
    cache.pad, cache.batch = pad, b
    ctx.enable_decode_mode()
    return _last_logits(logits)


def _forward(model, ctx: CacheContext, tokens: torch.Tensor, pos: torch.Tensor,
             mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``tokens`` [b, k] through ``model`` into the cache. ``pos``/``mask`` are megatron's
    (ignored on the tensorised path, which makes its own on the device)."""
    b, k = tokens.shape
    if ctx.tensor_path:
        pos, mask = ctx.begin_step(b, k), None
    logits = model(tokens, pos, mask, inference_context=ctx, runtime_gather_output=True)
    if ctx.tensor_path:
        ctx.end_step(k)
    ctx.increment_sequence_len_offset(k)
    return logits


@torch.no_grad()
def decode_step(model, cache: KVCache, next_tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (``next_tokens`` [b]) to the cache; logits of that position [b, V]."""
    _check_model(model)
    if not cache.length:
        raise GenerationError("decode_step before prefill: the KV cache is empty")
    if cache.length >= cache.max_seq_len:
        raise GenerationError(f"the KV cache is full ({cache.max_seq_len} tokens); make a larger "
                              "cache or generate fewer tokens")
    b = cache.batch
    if next_tokens.shape != (b,):
        raise GenerationError(f"decode_step needs one token per row, shape ({b},), "
                              f"got {tuple(next_tokens.shape)}")
    dev = compat.device()
    ctx = cache.context
    if ctx.tensor_path:
        logits = cache.decode_step_for(model)(next_tokens.to(dev))
        ctx.increment_sequence_len_offset(1)
        return logits
    n = cache.length
    pos = torch.full((b, 1), n, dtype=torch.long, device=dev)
    mask = None  # no padding: every cached key is visible (megatron's decode default)
    if cache.pad is not None:
        pos = pos - cache.pad.unsqueeze(1)
        mask = (torch.arange(n + 1, device=dev).unsqueeze(0) < cache.pad.unsqueeze(1))
        mask = mask[:, None, None, :]
    return _last_logits(_forward(model, ctx, next_tokens.to(dev).unsqueeze(1), pos, mask))


@torch.no_grad()
def extend(model, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append ``tokens`` [b, k] to a prefilled ``cache`` (a chunked prefill); logits of every new
    position [b, k, V].

    Scoring several continuations of one context uses it with ``rewind``: prefill the context
    once, then extend by each continuation from the same cache length.
    """
    _check_model(model)
    if not cache.length:
        raise GenerationError("extend before prefill: the KV cache is empty")
    b, k = tokens.shape if tokens.dim() == 2 else (0, 0)
    if b != cache.batch or k < 1:
        raise GenerationError(f"extend needs tokens of shape [{cache.batch}, k >= 1], "
                              f"got {tuple(tokens.shape)}")
    n = cache.length
    if n + k > cache.max_seq_len:
        raise GenerationError(f"{n} cached + {k} new tokens exceed the KV cache's "
                              f"{cache.max_seq_len}; make a larger cache")
    dev = compat.device()
    keys = torch.arange(n + k, device=dev)
    mask = keys[None, :] > (n + torch.arange(k, device=dev))[:, None]  # [k, n+k] future keys
    mask = mask[None, None].expand(b, 1, k, n + k)
    pos = (n + torch.arange(k, device=dev)).unsqueeze(0).expand(b, k)
    if cache.pad is not None:
        mask = mask | (keys.unsqueeze(0) < cache.pad.unsqueeze(1))[:, None, None, :]
        pos = pos - cache.pad.unsqueeze(1)
    context = cache.context
    flag = logits_flag_holder(context)
    only_last = flag.materialize_only_last_token_logits
    flag.materialize_only_last_token_logits = False  # every new position's logits
    try:
        return _forward(model, context, tokens.to(dev), pos, mask)
    finally:
        flag.materialize_only_last_token_logits = only_last


def rewind(cache: KVCache, length: int) -> None:
    """Forget every cached position from ``length`` on (later steps overwrite those slots)."""
    if not 1 <= length <= cache.length:
        raise GenerationError(f"can only rewind the KV cache to a length in [1, {cache.length}], "
                              f"got {length}")
    cache.context.set_length(length)
