"""vLLM's Llama/Mistral/Qwen2/Qwen3 models with the plan's SPD blocks (design.md 1-2).

Each ``SPD<Arch>`` class is vLLM's own ``<Arch>`` (its attention, paged KV cache, norms, RoPE,
weight loading, tensor parallelism); after vLLM builds it, every SPD block of the plan
(``hf_config.spd_plan``, convert/spd_hf.py) is turned into ``SPDDecoderLayer``, which holds the
block's own submodules (so parameter names and the weight loading stay vLLM's) and computes

    H_g = X + A_g + b_O (+ C_g)     Z_g = MLP_g(LN2(H_g))     out = X + AllReduce(sum_g (A_g + Z_g)) + b_O + b_fc2

for the G/TP groups ``g`` a rank holds, with each bias added exactly once. In vLLM's residual
convention a layer returns ``(hidden, residual)`` and the next layer's fused add forms the
stream, so the block returns ``(AllReduce(...) + b_O + b_fc2, X)``: X, replicated on every rank,
stays outside the all-reduce.

Groups and ranks: vLLM shards q heads, KV heads and MLP columns contiguously, exactly as the
project defines groups on the full weights (convert/hf.py layouts), so with TP = G its ranks are
the groups. With G = k x TP a rank holds k groups: the block's two projections that mix a rank's
groups (``o_proj``, ``down_proj``) and the MLP's ``gate_up_proj`` become the group-aware linears
below, which stack the k groups' activations along the token axis ([k*T, ...]) so that the stock
attention, norm and activation code in between run unchanged (the layout of megatron_spd's own
layers.py, with tokens for batch). Other TP degrees are refused when the model is built.

The linears are converted by assigning their ``__class__`` to a subclass that only replaces
``forward``: the attention and MLP modules call their projections themselves, and subclassing
vLLM's attention/MLP of four families instead would fork their forwards.

Rank-local compensation (the plan's ``compensation``; core compensation.py) is a module per
compensated block whose parameters, stored with all G groups stacked along dim 0, load the rank's
G/TP slice. Its forward is the megatron module's arithmetic in vLLM's token layout.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_tensor_model_parallel_rank,
                              get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.model_executor.utils import set_weight_attrs

from ...convert.spd_hf import PLAN_KEY
from ...core.compensation_shapes import param_shapes
from ...core.plan import PlanError, SPDPlan

logger = init_logger(__name__)

#: The submodules of the families' decoder layers that an SPD block uses; a layer with more
#: (e.g. Mistral's ada-norm conditioning) is refused rather than served without them.
LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


class SPDError(PlanError):
    """The SPD checkpoint cannot be served as configured; the message says what works."""


# ----- group-aware linears ----------------------------------------------------------------------

class SPDRowParallelLinear(RowParallelLinear):
    """``o_proj`` / ``down_proj`` of an SPD block: no reduction; returns the local groups'
    partial outputs stacked along tokens [k*T, h] and, with ``skip_bias_add``, its bias (added
    once by the block). ``spd_input_stacked``: the input is already per group along tokens
    (down_proj) rather than the groups' features side by side (o_proj). Without
    ``skip_bias_add`` the bias is added on TP rank 0 only, the stock rule."""

    spd_groups: int = 1
    spd_input_stacked: bool = False

    def forward(self, input_):
        bias = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
        n = self.spd_groups
        if n == 1:
            out = self.quant_method.apply(self, input_, bias)
        else:
            k = self.input_size_per_partition // n
            t = input_.shape[0] // n if self.spd_input_stacked else input_.shape[0]
            out = torch.cat([F.linear(input_[j * t:(j + 1) * t] if self.spd_input_stacked
                                      else input_[..., j * k:(j + 1) * k],
                                      self.weight[:, j * k:(j + 1) * k]) for j in range(n)])
            out = out if bias is None else out + bias
        return out, (self.bias if self.skip_bias_add else None)


class SPDMergedColumnParallelLinear(MergedColumnParallelLinear):
    """``gate_up_proj`` of an SPD block with k > 1 groups per rank: input [k*T, h] (each group's
    LN2(H_g)), output [k*T, 2 f/(G)] with group j's gate and up rows (rows j of each half of the
    rank's [gate; up]), so SiluAndMul splits it as usual."""

    spd_groups: int = 1

    def forward(self, input_):
        n = self.spd_groups
        if n == 1:
            return super().forward(input_)
        t, per = input_.shape[0] // n, self.output_size_per_partition // 2 // n
        w = self.weight.view(2, n, per, -1)
        b = None if self.bias is None else self.bias.view(2, n, per)
        out = torch.cat([F.linear(input_[j * t:(j + 1) * t], w[:, j].reshape(2 * per, -1),
                                  None if b is None else b[:, j].reshape(-1))
                         for j in range(n)])
        return out, None


def _to_group_linear(linear: nn.Module, cls: type, groups: int, **attrs) -> None:
    if not isinstance(linear, cls.__mro__[1]):
        raise SPDError(f"an SPD block needs vLLM's {cls.__mro__[1].__name__} at "
                       f"{getattr(linear, 'prefix', linear)}, got {type(linear).__name__}")
    linear.__class__ = cls
    linear.spd_groups = groups
    for k, v in attrs.items():
        setattr(linear, k, v)
    if groups > 1:
        # the groups slice the weight, so keep it as a tensor: vLLM's CPU path would otherwise
        # repack it for oneDNN and drop it (UnquantizedLinearMethod.process_weights_after_loading)
        linear._cpu_skip_gemm_dispatch = True


# ----- compensation -----------------------------------------------------------------------------

def _load_group_slice(param: torch.Tensor, loaded: torch.Tensor, *, rank: int) -> None:
    """Copy this rank's groups (dim 0) of a tensor stored with all G groups."""
    n = param.shape[0]
    piece = loaded.narrow(0, rank * n, n)
    if tuple(piece.shape) != tuple(param.shape) or loaded.shape[0] != n * \
            get_tensor_model_parallel_world_size():
        raise SPDError(f"compensation tensor of shape {tuple(loaded.shape)} does not fit the "
                       f"plan ({tuple(param.shape)} per rank); re-export the checkpoint")
    param.data.copy_(piece)


class SPDCompensation(nn.Module):
    """Per group ``C_g = c_g + W_out,g (W_in,g f_g)``, ``f_g = LN1(X)`` or ``[LN1(X); A_g]``, for
    the rank's k groups; parameters stacked over groups (dim 0) as in core compensation.py."""

    def __init__(self, local_groups: int, hidden: int, rank: int, inputs: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.rank, self.inputs = rank, inputs
        loader = functools.partial(_load_group_slice, rank=get_tensor_model_parallel_rank())
        for name, shape in param_shapes(local_groups, hidden, rank, inputs).items():
            p = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": loader})
            self.register_parameter(name, p)

    def forward(self, ln1: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """``ln1`` [T, h] (shared by the groups), ``partial`` A_g stacked [k*T, h] -> C_g [k*T, h]."""
        n, h = self.bias.shape
        t = ln1.shape[0]
        out = self.bias.view(n, 1, h)
        if self.rank > 0:
            f = ln1.unsqueeze(0).expand(n, t, h)
            if self.inputs == "ln1+partial":
                f = torch.cat([f, partial.view(n, t, h)], dim=-1)
            z = torch.einsum("ntd,nrd->ntr", f, self.weight_in)
            out = out + torch.einsum("ntr,nhr->nth", z, self.weight_out)
        return out.expand(n, t, h).reshape(n * t, h)


# ----- the block --------------------------------------------------------------------------------

class SPDDecoderLayer(nn.Module):
    """An SPD block made of a vLLM decoder layer's own submodules (module docstring)."""

    def __init__(self, layer: nn.Module, local_groups: int,
                 compensation: Optional[SPDCompensation]) -> None:
        super().__init__()
        extra = sorted(n for n, m in layer.named_children() if n not in LAYER_PARTS
                       and m is not None)
        if extra:
            raise SPDError(f"{type(layer).__name__} has submodules {extra} that an SPD block "
                           "does not implement; this model cannot be served with SPD blocks")
        for name in LAYER_PARTS:
            setattr(self, name, getattr(layer, name))
        self.local_groups = local_groups
        self.tp_size = get_tensor_model_parallel_world_size()
        attn, mlp = self.self_attn, self.mlp
        _to_group_linear(attn.o_proj, SPDRowParallelLinear, local_groups,
                         reduce_results=False, skip_bias_add=True)
        _to_group_linear(mlp.down_proj, SPDRowParallelLinear, local_groups,
                         reduce_results=False, skip_bias_add=True, spd_input_stacked=True)
        _to_group_linear(mlp.gate_up_proj, SPDMergedColumnParallelLinear, local_groups)
        self.spd_compensation = compensation

    def biases(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(b_O, b_fc2) where the projections leave them to the block (``skip_bias_add``)."""
        o, down = self.self_attn.o_proj, self.mlp.down_proj
        return (o.bias if o.skip_bias_add else None,
                down.bias if down.skip_bias_add else None)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: hidden_states is the embedding, X itself
            x, normed = hidden_states, self.input_layernorm(hidden_states)
        else:
            normed, x = self.input_layernorm(hidden_states, residual)
        attn = self.self_attn(positions=positions, hidden_states=normed)  # A_g, [k*T, h]
        b_o, b_fc2 = self.biases()
        n = self.local_groups
        h = (x.repeat(n, 1) if n > 1 else x) + attn
        if b_o is not None:
            h = h + b_o
        if self.spd_compensation is not None:
            h = h + self.spd_compensation(normed, attn)
        # LN2 without its residual argument: the fused form updates its inputs in place
        partial = attn + self.mlp(self.post_attention_layernorm(h))
        if n > 1:
            partial = partial.view(n, -1, partial.shape[-1]).sum(dim=0)
        return self.reduce(partial, x, b_o, b_fc2)

    def reduce(self, partial: torch.Tensor, x: torch.Tensor, b_o: Optional[torch.Tensor],
               b_fc2: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's one all-reduce, biases once after it; X returns as the residual."""
        out = tensor_model_parallel_all_reduce(partial) if self.tp_size > 1 else partial
        for b in (b_o, b_fc2):
            if b is not None:
                out = out + b
        return out, x


# ----- plan -> model ----------------------------------------------------------------------------

def plan_from_config(config) -> SPDPlan:
    """The plan of an SPD config (``spd_plan``), checked against the model and the TP degree."""
    raw = getattr(config, PLAN_KEY, None)
    if raw is None:
        raise SPDError(f"config.json has no {PLAN_KEY!r}: export the checkpoint with "
                       "tools/convert_checkpoint.py --to hf")
    plan = SPDPlan.from_dict(raw, source=f"config.json {PLAN_KEY}")
    tp = get_tensor_model_parallel_world_size()
    try:
        plan.validate_for(config.num_hidden_layers, config.num_attention_heads,
                          config.num_key_value_heads, config.intermediate_size, tp)
    except PlanError as e:
        raise SPDError(f"megatron-spd: cannot serve this SPD model (G={plan.groups}) at "
                       f"--tensor-parallel-size {tp}: {e}") from None
    return plan


def apply_plan(model: nn.Module, vllm_config: VllmConfig) -> SPDPlan:
    """Turn the plan's SPD blocks of a built vLLM model into ``SPDDecoderLayer``s."""
    config = vllm_config.model_config.hf_config
    plan = plan_from_config(config)
    local = plan.groups // get_tensor_model_parallel_world_size()
    if local > 1 and vllm_config.quant_config is not None:
        raise SPDError(f"megatron-spd: {local} SPD groups per rank slice the weights, which "
                       "quantized linears do not allow; serve at --tensor-parallel-size "
                       f"{plan.groups} or unquantized")
    dtype = vllm_config.model_config.dtype
    layers = model.model.layers
    for i in plan.spd_blocks:
        if isinstance(layers[i], PPMissingLayer):
            continue  # another pipeline stage's block
        comp = plan.compensation_for(i)
        comp = None if comp is None else SPDCompensation(local, config.hidden_size,
                                                         comp["rank"], comp["inputs"], dtype)
        layers[i] = SPDDecoderLayer(layers[i], local, comp)
    logger.info("megatron-spd: %d of %d blocks SPD, G=%d, %d group(s) per rank",
                len(plan.spd_blocks), plan.num_layers, plan.groups, local)
    return plan


class _SPDModel:
    """Mixed in before a vLLM causal-LM class: build it, then apply the plan."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.spd_plan = apply_plan(self, vllm_config)


class SPDLlamaForCausalLM(_SPDModel, LlamaForCausalLM):
    pass


class SPDMistralForCausalLM(_SPDModel, MistralForCausalLM):
    pass


class SPDQwen2ForCausalLM(_SPDModel, Qwen2ForCausalLM):
    pass


class SPDQwen3ForCausalLM(_SPDModel, Qwen3ForCausalLM):
    pass
