"""SPDTransformerLayer: a megatron-core TransformerLayer whose attention sync point is dropped.

Dense block (two all-reduces):       H = X + sum_i A_i + b_O;  Out = H + sum_i MLP_i(LN2(H)) + b_fc2
SPD block (one all-reduce, design.md 1):
    H_i = X + A_i + b_O  (local);    Z_i = MLP_i(LN2(H_i));    Out = X + sum_i (A_i + Z_i) + b_O + b_fc2

The layer owns all communication of the block (design.md 3); its linears are the SPD-aware ones
from layers.py, which issue none:
- no sequence parallel: one ``copy_to_tensor_model_parallel_region`` on X (identity forward,
  all-reduce backward) feeds LN1 -> QKV and the MLP residual X + A_i; one
  ``reduce_from_tensor_model_parallel_region`` of sum_i (A_i + Z_i).  1 + 1 all-reduces.
- sequence parallel: one all-gather of X (its backward reduce-scatters) and one reduce-scatter of
  sum_i (A_i + Z_i), then the local shard of X is added.

Gradients of replicated parameters that act on rank-local tensors (both norms, ``b_O`` on the
H_i path) are partial per rank. Without sequence parallel they are marked ``spd_tp_partial`` and
``grads.reduce_tp_partial_grads`` sums them over TP after backward; ``b_O`` on the output path is
replicated, so only TP rank 0 lets its gradient through there (the others add a detached copy),
which makes that sum exact. With sequence parallel every one of them is already partial per
rank and marked ``sequence_parallel`` (megatron's own convention), so megatron's
``finalize_model_grads`` (or the same reduction) covers them.

A rank with TP degree T holds G/T groups (``spd_groups`` is G); with T = 1 this is the exact
single-process emulation of the G-way model.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from .layers import SPDColumnParallelLinear, SPDRowParallelLinear
from .plan import check_groups


class SPDTransformerLayer(TransformerLayer):
    """TransformerLayer in SPD form for ``spd_groups`` groups (given through the spec's params)."""

    def __init__(self, config, submodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage=None,
                 spd_groups: int = 1):
        super().__init__(config, submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
        tp = self.tp_group.size()
        check_groups(spd_groups, tp, config.num_attention_heads, config.num_query_groups,
                     config.ffn_hidden_size)
        self.spd_groups = spd_groups
        self.local_groups = spd_groups // tp
        attn, mlp = self.self_attention, self.mlp
        expected = ((attn.linear_qkv, SPDColumnParallelLinear), (mlp.linear_fc1, SPDColumnParallelLinear),
                    (attn.linear_proj, SPDRowParallelLinear), (mlp.linear_fc2, SPDRowParallelLinear))
        for mod, cls in expected:
            if not isinstance(mod, cls):
                raise TypeError(f"SPDTransformerLayer needs {cls.__name__} in its spec, got "
                                f"{type(mod).__name__}; build specs with megatron_spd.spec")
        attn.linear_proj.spd_groups = self.local_groups
        mlp.linear_fc1.spd_groups = self.local_groups
        mlp.linear_fc1.spd_gated = config.gated_linear_unit
        mlp.linear_fc2.spd_groups = self.local_groups
        mlp.linear_fc2.spd_input_stacked = True
        if not config.sequence_parallel:
            partial = [*self.input_layernorm.parameters(), *self.pre_mlp_layernorm.parameters()]
            if attn.linear_proj.bias is not None:
                partial.append(attn.linear_proj.bias)
            for p in partial:
                setattr(p, "spd_tp_partial", True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                context: Any = None, context_mask: Any = None,
                rotary_pos_emb: Optional[torch.Tensor] = None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context: Any = None, packed_seq_params=None, sequence_len_offset=None,
                **kwargs: Any):
        sp = self.config.sequence_parallel
        x = hidden_states
        if sp:
            x_full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                          group=self.tp_group)
        else:
            x_full = copy_to_tensor_model_parallel_region(x, group=self.tp_group)

        attn_out, b_o = self.self_attention(
            self.input_layernorm(x_full), attention_mask=attention_mask,
            inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        # attn_out: the local groups' partials A_g stacked along batch, [s, n*b, h]
        n = self.local_groups
        x_groups = x_full.repeat(1, n, 1) if n > 1 else x_full
        h_local = x_groups + attn_out if b_o is None else x_groups + attn_out + b_o
        mlp_out, b_fc2 = self.mlp(self.pre_mlp_layernorm(h_local))
        partial = attn_out + mlp_out
        if n > 1:
            s, nb, hid = partial.shape
            partial = partial.view(s, n, nb // n, hid).sum(dim=1)
        partial = partial.contiguous()  # megatron's _reduce silently skips non-contiguous input
        if sp:
            reduced = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            reduced = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        if b_o is not None:
            if not sp and self.tp_group.rank() != 0:
                b_o = b_o.detach()  # its replicated-path grad is counted once, on TP rank 0
            reduced = reduced + b_o
        if b_fc2 is not None:
            reduced = reduced + b_fc2
        if self.hidden_dropout > 0 and self.training:
            reduced = torch.nn.functional.dropout(reduced, p=self.hidden_dropout)
        return x + reduced, context
