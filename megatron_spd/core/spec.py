"""ModuleSpec builders: turn an SPDPlan into per-block specs and a megatron-core GPTModel.

Dense blocks use megatron-core's own local spec, with one swap: self-attention is
``CachedSelfAttention`` (megatron's SelfAttention plus the engine's KV-cache path, used only with
the engine's cache; inference/kv_cache.py). SPD blocks further swap in ``SPDTransformerLayer``
and the SPD-aware linears (design.md 4). Parameter names stay the stock ones, so a checkpoint
written by either loads into the other.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from ..parallel import compat
from .block import SPDTransformerLayer
from .cached_attention import CachedSelfAttention
from .config import ModelConfig
from .layers import SPDColumnParallelLinear, SPDRowParallelLinear
from ..parallel.mcore_versions import mlp_submodules
from .plan import SPDPlan


def _local_spec(tcfg) -> ModuleSpec:
    return get_gpt_layer_local_spec(normalization=tcfg.normalization,
                                    qk_layernorm=tcfg.qk_layernorm)


def _sp_capable(norm: type, tcfg) -> type:
    """The stock local norm, except where it cannot do sequence parallel (compat.TorchNorm)."""
    if tcfg.sequence_parallel and norm is WrappedTorchNorm:
        return compat.TorchNorm
    return norm


def _norm(tcfg) -> type:
    return _sp_capable(_local_spec(tcfg).submodules.input_layernorm, tcfg)


def dense_layer_spec(tcfg) -> ModuleSpec:
    """megatron-core's local GPT layer spec (with SP-capable norms where needed and the
    engine's cached attention).

    With ``qk_layernorm`` the spec's q/k norms act on each head's query and key over head_dim
    (SelfAttention builds them with ``hidden_size_per_attention_head``), before RoPE, exactly
    Qwen3's q_norm/k_norm. Their weights are replicated but each TP rank normalises only its own
    heads, so their gradients are partial per rank (grads.py sums them, as megatron's
    ``finalize_model_grads`` does by name)."""
    spec = copy.deepcopy(_local_spec(tcfg))
    spec.submodules.self_attention.module = CachedSelfAttention
    norm = _norm(tcfg)
    spec.submodules.input_layernorm = norm
    spec.submodules.pre_mlp_layernorm = norm
    attn = spec.submodules.self_attention.submodules
    if tcfg.qk_layernorm:
        attn.q_layernorm = _sp_capable(attn.q_layernorm, tcfg)
        attn.k_layernorm = _sp_capable(attn.k_layernorm, tcfg)
    return spec


def spd_layer_spec(tcfg, groups: int, compensation: Optional[dict] = None) -> ModuleSpec:
    """The dense spec with the SPD layer and SPD-aware linears swapped in; ``compensation``
    (``SPDPlan.compensation_for``) adds the block's rank-local compensation."""
    spec = dense_layer_spec(tcfg)
    spec.module = SPDTransformerLayer
    spec.params = {**spec.params, "spd_groups": groups}
    if compensation is not None:
        spec.params["spd_compensation"] = dict(compensation)
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv = SPDColumnParallelLinear
    attn.linear_proj = SPDRowParallelLinear
    mlp = mlp_submodules(spec)
    mlp.linear_fc1 = SPDColumnParallelLinear
    mlp.linear_fc2 = SPDRowParallelLinear
    return spec


def block_spec(tcfg, plan: Optional[SPDPlan]) -> TransformerBlockSubmodules:
    """Per-block layer specs for ``plan`` (None: all dense) plus the final norm."""
    n = tcfg.num_layers
    layer_specs = [spd_layer_spec(tcfg, plan.groups, plan.compensation_for(i))
                   if plan is not None and plan.is_spd(i) else dense_layer_spec(tcfg)
                   for i in range(n)]
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=_norm(tcfg))


def build_model(cfg: ModelConfig, plan: Optional[SPDPlan] = None, *,
                sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                **config_overrides) -> GPTModel:
    """A megatron-core GPTModel for ``cfg`` at the current TP degree with ``plan``'s SPD blocks.

    Needs ``parallel_state`` initialised (``megatron_spd.parallel.distributed.init``). Raises PlanError if
    the plan does not fit the model or the TP degree.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if plan is not None:
        plan.validate_for(cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups,
                          cfg.ffn_hidden_size, tp)
    tcfg = cfg.transformer_config(tp, sequence_parallel=sequence_parallel,
                                  params_dtype=params_dtype, **config_overrides)
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=block_spec(tcfg, plan),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=cfg.rope_theta,
        rotary_percent=1.0,
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
    )
    return model.to(compat.device())
