"""The engine's KV cache: megatron's static inference context with its state on the device, and
the self-attention that uses it (the "tensorised" decode path).

Why not megatron's own path. ``StaticInferenceContext`` keeps the cache length as a Python int,
and ``SelfAttention._adjust_key_value_for_inference`` (transformer/attention.py:446) slices the
cache, the RoPE table and the keys by it, copies the new K/V in, re-applies RoPE to every cached
key and runs the unfused softmax over ``[:length]`` keys at every step: the shapes change each
step (no CUDA graph can replay it) and a step is many small kernels. megatron's graph-able
alternative, flash decode (attention.py:642), needs flash-attn. So this module re-implements
the cache handling, and only that:

- ``CacheContext`` is a ``StaticInferenceContext`` (modules that do not know it use it exactly
  as megatron's, e.g. a stock megatron model in the benchmark) that also holds the filled length
  and each row's left padding as device tensors, and K/V buffers laid out ``[batch, KV groups,
  max_seq, head_dim]`` (a row's cache is contiguous for the attention kernel).
- ``CachedSelfAttention`` is megatron's ``SelfAttention`` (the spec uses it in every block).
  Given a ``CacheContext`` with ``tensor_path`` set, outside training, it runs the stock QKV
  projection (``get_query_key_value_tensors``: biases, QK-norm, GQA), RoPE of the new tokens at
  their cache slots (rows of megatron's own RoPE table, ``index_select``ed by a device tensor),
  writes K/V in place (``index_copy_`` at those slots), attends with torch's fused
  ``scaled_dot_product_attention`` over the whole fixed-size cache under a length / padding /
  causal mask, and ends with the stock output projection. Everything else (training, prefill
  through megatron's context, recipes) is ``SelfAttention.forward`` unchanged.

Shapes depend only on the batch and the number of new tokens, and nothing is read back to the
host, so a decode step can be captured in a CUDA graph (graph.py). RoPE follows megatron's
static path: a token's angle is that of its cache slot (see inference/steps.py on left padding).
Grouped-query attention without copying K/V per query head: the query heads that share a KV
group are folded into the query-length axis, ``[b, groups, heads_per_group * s, d]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention


class CacheContext(StaticInferenceContext):
    """megatron's static context plus the device-resident state of the tensorised path.

    ``length`` (0-d long) counts filled slots and ``pad`` ([max_batch] long) each row's left
    padding; ``begin_step``/``end_step`` bracket one forward of ``k`` new tokens. The Python
    ``sequence_len_offset`` is kept equal to ``length`` by the engine (megatron's modules and
    the engine's checks read it); inside a captured graph only the device tensors move.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int, device: torch.device):
        super().__init__(max_batch_size, max_sequence_length)
        self.tensor_path = False
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(max_batch_size, dtype=torch.long, device=device)
        self.slot_ids = torch.arange(max_sequence_length, device=device)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots: Optional[torch.Tensor] = None    # [k] cache slots of this step's tokens
        self.allowed: Optional[torch.Tensor] = None  # [b, 1, k, max_seq] True = may attend

    def begin_step(self, batch: int, k: int) -> torch.Tensor:
        """Set this step's slots and attention mask; returns the position ids [batch, k].

        A real query attends to the filled, non-pad slots up to its own; a pad query only to
        itself (a fully masked row would turn into NaN and spread through the cache).
        """
        self.slots = self.length + torch.arange(k, device=self.length.device)
        j, slot = self.slot_ids, self.slots[:, None]
        pad = self.pad[:batch, None, None, None]
        self.allowed = (j <= slot) & ((j >= pad) | (j == slot))  # [b, 1, k, max_seq]
        return (self.slots[None, :] - self.pad[:batch, None]).clamp_min(0)

    def end_step(self, k: int) -> None:
        self.length.add_(k)

    def set_length(self, length: int) -> None:
        self.sequence_len_offset = length
        self.length.fill_(length)

    def buffers(self, layer_number: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V cache [max_batch, groups, max_seq, head_dim], made on first use."""
        if layer_number not in self.kv:
            shape = (self.max_batch_size, key.shape[2], self.max_sequence_length, key.shape[3])
            self.kv[layer_number] = (torch.zeros(shape, dtype=key.dtype, device=key.device),
                                     torch.zeros(shape, dtype=key.dtype, device=key.device))
        return self.kv[layer_number]

    def reset(self) -> None:
        super().reset()
        self.length.zero_()
        self.pad.zero_()


class CachedSelfAttention(SelfAttention):
    """megatron's SelfAttention with the tensorised KV-cache path (module docstring)."""

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, *, inference_params=None):
        ctx = inference_context
        if not (isinstance(ctx, CacheContext) and ctx.tensor_path and not self.training):
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                inference_params=inference_params)
        self._check_tensor_path()
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        no_rope = self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]
        if rotary_pos_emb is not None and not no_rope:
            query, key = self._rope(query, key, rotary_pos_emb, ctx.slots)
        k_cache, v_cache = ctx.buffers(self.layer_number, key)
        b = key.shape[1]
        k_cache, v_cache = k_cache[:b], v_cache[:b]
        k_cache.index_copy_(2, ctx.slots, key.permute(1, 2, 0, 3))  # [b, groups, k, d]
        v_cache.index_copy_(2, ctx.slots, value.permute(1, 2, 0, 3))
        s, _, heads, d = query.shape
        groups = key.shape[2]
        per_group = heads // groups
        q = query.permute(1, 2, 0, 3).reshape(b, groups, per_group * s, d)
        mask = ctx.allowed if s == 1 else ctx.allowed.repeat(1, 1, per_group, 1)
        scale = self.config.softmax_scale or 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=scale)
        out = out.view(b, groups, per_group, s, d).permute(3, 0, 1, 2, 4).reshape(s, b, heads * d)
        return self.linear_proj(out)

    def _rope(self, query: torch.Tensor, key: torch.Tensor, rotary_pos_emb,
              slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE at the cache slots, from megatron's table for the whole cache [max_seq, 1, 1, d]."""
        if not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb, rotary_pos_emb)
        q_emb, k_emb = rotary_pos_emb
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        cp = self.pg_collection.cp
        query = apply_rotary_pos_emb(query, q_emb.index_select(0, slots), config=self.config,
                                     mscale=mscale, cp_group=cp)
        key = apply_rotary_pos_emb(key, k_emb.index_select(0, slots), config=self.config,
                                   mscale=mscale, cp_group=cp)
        return query, key

    def _check_tensor_path(self) -> None:
        c = self.config
        unsupported = [name for name, on in (
            ("attention_output_gate", c.attention_output_gate), ("flash_decode", c.flash_decode),
            ("window_size", c.window_size is not None),
            ("context_parallel_size > 1", c.context_parallel_size > 1)) if on]
        if unsupported:
            raise ValueError(f"the engine's KV-cache path does not implement {unsupported}; "
                             "use megatron's path (megatron_spd.inference.new_cache(..., "
                             "tensor_path=False))")


def uses_cached_attention(model) -> bool:
    """Whether ``model``'s attention layers can run the tensorised path."""
    return any(isinstance(m, CachedSelfAttention) for m in model.modules())
