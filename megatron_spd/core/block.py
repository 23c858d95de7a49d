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

The layer replaces ``TransformerLayer.forward``, so every setting that the stock forward
implements is either re-implemented here with megatron's own pieces or refused at construction
(``check_supported``), never silently ignored:
- activation recompute: ``full`` is done by TransformerBlock around whole layers (layer-agnostic);
  selective ``core_attn`` by the stock attention; selective ``layernorm`` and ``mlp`` here, with
  the stock ``CheckpointWithoutOutput`` / ``tensor_parallel.checkpoint`` exactly as the stock
  forward uses them;
- offloading: ``cpu_offloading`` is TransformerBlock's (layer-agnostic); fine-grained offloading
  of ``qkv_linear``/``core_attn``/``attn_proj`` happens inside the stock attention; of
  ``attn_norm``/``mlp_norm`` it is refused (its commit frees the block input, which the SPD
  output still adds);
- megatron's layer CUDA graphs (``cuda_graph_impl``) are refused: ``transformer_engine`` replays
  ``_forward_attention``/``_forward_mlp`` (the dense block), ``local`` decode needs flash-attn;
  the inference engine captures whole decode steps itself (inference/graph.py);
- generalized tensor parallelism (megatron-core 0.19's ``tensor_parallel_num_weight_shards``
  > TP, i.e. ``gtp_weight_remat_size`` > 1) is refused: SPD linears split by groups over the TP
  ranks and do not rematerialise further weight shards;
- ``bias_dropout_fusion`` applies to the output's bias + dropout + residual (megatron's own
  ``mlp_bda``).

Optional rank-local compensation (``spd_compensation``, from the plan; compensation.py): each
group adds its estimate C_g of the partials it does not receive, H_i = X + A_i + b_O + C_i,
computed from LN1(X) (and A_i) on the rank itself, so the communication is unchanged. Its
rank-r map reads LN1(X), so it is refused with selective ``layernorm`` recompute (which frees
LN1's output after the attention); a bias-only compensation (r = 0) works with it.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from .compensation import SPDCompensation
from .layers import SPDColumnParallelLinear, SPDRowParallelLinear
from .plan import check_groups


def check_supported(config, local_groups: int, compensation_rank: int = 0) -> None:
    """Raise ValueError for a TransformerConfig setting the SPD block (with a rank-
    ``compensation_rank`` compensation, compensation.py) cannot honour."""
    problems = []
    if config.cuda_graph_impl != "none":
        problems.append(f"cuda_graph_impl={config.cuda_graph_impl!r}: megatron's per-layer CUDA "
                        "graphs replay the dense block ('transformer_engine') or need flash-attn "
                        "decode ('local'); use cuda_graph_impl='none' and the inference engine's "
                        "decode graph (megatron_spd.inference.new_cache(..., cuda_graph=True))")
    norms = sorted({"attn_norm", "mlp_norm"} & set(config.offload_modules or ()))
    if config.fine_grained_activation_offloading and norms:
        problems.append(f"fine-grained offloading of {norms}: its commit releases the block "
                        "input, which the SPD output X + sum_i(A_i + Z_i) still needs; offload "
                        "qkv_linear/core_attn/attn_proj or use cpu_offloading instead")
    if config.inference_fuse_tp_communication:
        problems.append("inference_fuse_tp_communication fuses the dense block's two reductions "
                        "with its norms; turn it off for SPD blocks")
    if config.mlp_chunks_for_prefill > 1:
        problems.append("mlp_chunks_for_prefill > 1; set it to 1 for SPD blocks")
    if getattr(config, "gtp_weight_remat_size", 1) > 1:  # megatron-core >= 0.19
        problems.append(f"gtp_weight_remat_size={config.gtp_weight_remat_size} (generalized "
                        "tensor parallelism, tensor_parallel_num_weight_shards > TP): SPD blocks "
                        "shard their linears by groups over the TP ranks only and do not "
                        "rematerialise GTP weight shards; set tensor_parallel_num_weight_shards "
                        "to the TP size (or leave it unset) for models with SPD blocks")
    if config.fp8 or config.fp4:
        problems.append("fp8/fp4: SPD blocks use megatron's local linears, which have no "
                        "low-precision path; use bf16")
    if (config.bias_activation_fusion and local_groups > 1 and config.add_bias_linear
            and not config.gated_linear_unit):
        problems.append(f"bias_activation_fusion with biased GeLU and {local_groups} SPD groups "
                        "per rank: each group's fc1 bias is added inside the linear, and "
                        "megatron's fused bias-GeLU needs one bias tensor; turn the fusion off "
                        "or run with TP = G")
    if (compensation_rank > 0 and config.recompute_granularity == "selective"
            and "layernorm" in config.recompute_modules):  # TransformerLayer's own test
        problems.append(f"a rank-{compensation_rank} SPD compensation reads LN1's output, which "
                        "selective 'layernorm' recompute frees after the attention; drop "
                        "'layernorm' from recompute_modules or use a bias-only compensation "
                        "(rank 0)")
    if problems:
        raise ValueError("SPDTransformerLayer cannot honour this TransformerConfig: "
                         + "; ".join(problems))


def _norm(norm, x: torch.Tensor, recompute: bool):
    """``norm(x)``, and the checkpoint that drops and recomputes its output when ``recompute``.

    ``fp8=None``: megatron's default ``CheckpointWithoutOutput(fp8=False)`` sets
    ``self.fp8 = fp8 is not None``, i.e. True (tensor_parallel/random.py:636), and then needs
    Transformer Engine's FP8 state even without fp8 (which SPD blocks refuse anyway).
    """
    if not recompute:
        return norm(x), None
    checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
    return checkpoint.checkpoint(norm, x), checkpoint


class SPDTransformerLayer(TransformerLayer):
    """TransformerLayer in SPD form for ``spd_groups`` groups (given through the spec's params)."""

    def __init__(self, config, submodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage=None,
                 spd_groups: int = 1, spd_compensation: Optional[dict] = None):
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        check_groups(spd_groups, tp, config.num_attention_heads, config.num_query_groups,
                     config.ffn_hidden_size)
        check_supported(config, spd_groups // tp,  # before megatron acts on the settings
                        (spd_compensation or {}).get("rank", 0))
        super().__init__(config, submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
        self.spd_groups = spd_groups
        self.local_groups = spd_groups // tp
        self.spd_compensation = None if spd_compensation is None else SPDCompensation(
            config, self.local_groups, tp_group=self.tp_group, **spd_compensation)
        attn, mlp = self.self_attention, self.mlp
        expected = ((attn.linear_qkv, SPDColumnParallelLinear), (mlp.linear_fc1, SPDColumnParallelLinear),
                    (attn.linear_proj, SPDRowParallelLinear), (mlp.linear_fc2, SPDRowParallelLinear))
        for mod, cls in expected:
            if not isinstance(mod, cls):
                raise TypeError(f"SPDTransformerLayer needs {cls.__name__} in its spec, got "
                                f"{type(mod).__name__}; build specs with megatron_spd.core.spec")
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
                padding_mask=None, **kwargs: Any):
        x = hidden_states
        if self.config.sequence_parallel:
            x_full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                          group=self.tp_group)
        else:
            x_full = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        attn_out, b_o, comp = self._attention(
            x_full, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)
        partial, b_fc2 = self._spd_partial(x_full, attn_out, b_o, comp, padding_mask)
        if self.config.sequence_parallel:
            reduced = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            reduced = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        return self._output(x, reduced, b_o, b_fc2), context

    def _attention(self, x_full: torch.Tensor, **attention_kwargs: Any):
        """LN1 then the stock attention: this group's partial A_i (and b_O, not added), and the
        group's compensation C_i (None without one), computed while LN1's output still exists."""
        normed, checkpoint = _norm(self.input_layernorm, x_full, self.recompute_input_layernorm)
        attn_out, b_o = self.self_attention(normed, **attention_kwargs)
        comp = (None if self.spd_compensation is None
                else self.spd_compensation(normed, attn_out))
        if checkpoint is not None:  # LN1 is recomputed when attn_out's grad arrives
            checkpoint.discard_output_and_register_recompute(attn_out)
        return attn_out, b_o, comp

    def _local_residual(self, x_groups: torch.Tensor, attn_out: torch.Tensor,
                        b_o: Optional[torch.Tensor], comp: Optional[torch.Tensor]) -> torch.Tensor:
        """H_i = X + A_i + b_O (+ C_i): each group's own residual stream, the input of LN2 and
        its MLP."""
        h = x_groups + attn_out
        h = h if b_o is None else h + b_o
        return h if comp is None else h + comp

    def _spd_partial(self, x_full: torch.Tensor, attn_out: torch.Tensor,
                     b_o: Optional[torch.Tensor], comp: Optional[torch.Tensor],
                     padding_mask=None):
        """The SPD math of one rank: sum over its local groups of A_i + MLP_i(LN2(H_i)).

        ``attn_out`` holds the local groups' partials A_i stacked along batch, [s, n*b, h].
        Returns the contiguous sum [s, b, h] (megatron's _reduce silently skips non-contiguous
        input) and the fc2 bias (not added).
        """
        n = self.local_groups
        x_groups = x_full.repeat(1, n, 1) if n > 1 else x_full
        mlp_out, b_fc2 = self._mlp(self._local_residual(x_groups, attn_out, b_o, comp),
                                   padding_mask)
        partial = attn_out + mlp_out
        if n > 1:
            s, nb, hid = partial.shape
            partial = partial.view(s, n, nb // n, hid).sum(dim=1)
        return partial.contiguous(), b_fc2

    def _mlp(self, h_local: torch.Tensor, padding_mask=None):
        """LN2 then the stock MLP, each recomputed in backward where the config says so."""
        normed, checkpoint = _norm(self.pre_mlp_layernorm, h_local,
                                   self.recompute_pre_mlp_layernorm)
        if self.recompute_mlp:
            out, bias = tensor_parallel.checkpoint(
                functools.partial(self.mlp, padding_mask=padding_mask), False, normed)
        else:
            out, bias = self.mlp(normed, padding_mask=padding_mask)
        if checkpoint is not None:  # LN2 is recomputed when out's grad arrives
            checkpoint.discard_output_and_register_recompute(out)
        return out, bias

    def _output(self, x: torch.Tensor, reduced: torch.Tensor, b_o: Optional[torch.Tensor],
                b_fc2: Optional[torch.Tensor]) -> torch.Tensor:
        """X + dropout(sum_i (A_i + Z_i) + b_O + b_fc2) through megatron's bias-dropout-add."""
        if b_o is not None and not self.config.sequence_parallel and self.tp_group.rank() != 0:
            b_o = b_o.detach()  # its replicated-path grad is counted once, on TP rank 0
        biases = [b for b in (b_o, b_fc2) if b is not None]
        bias = None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]
        return self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
            (reduced, bias), x, self.hidden_dropout)
