"""Rank-local compensation inside an SPD block: each group estimates what it no longer receives.

In an SPD block group g's MLP sees ``H_g = X + A_g + b_O`` instead of ``X + sum_j A_j + b_O``; the
missing term is the other groups' attention partials ``sum_{j != g} A_j``. Much of it is
predictable from what group g has (measured on SmolLM2-135M: a constant alone removes 90 % of
block 24's SPD error; a linear map of LN1(X) removes 99 % of block 0's, whose attention output is
largely a function of the current token). ``SPDCompensation`` adds, per group,

    C_g = c_g + W_out,g (W_in,g f_g)       f_g = LN1(X)  or  [LN1(X); A_g]   (``inputs``)

to ``X + A_g + b_O`` before LN2: a bias ``c_g`` [h] and a rank-r map (r = 0: bias only). It uses
only tensors the rank already holds, so the block keeps its one all-reduce. The parameters are
stacked over groups (dim 0) and TP-sharded along it like the groups themselves (a rank at TP
degree T holds G/T of them), so full state dicts, TP resharding and ``dist_checkpointing`` handle
them like any megatron TP parameter; their names (``...spd_compensation.{bias,weight_in,
weight_out}``) are new, every stock parameter keeps its stock name. They start at zero (the block
is then exactly plain SPD) and are fitted in closed form by ``recipe/compensation.py``.

In a ``dist_checkpointing`` checkpoint megatron stacks each stock layer parameter over all
layers (``decoder.layers.<name>`` [L, ...]); only the plan's compensated blocks have these
parameters, so they are stored per layer instead, under ``decoder.layers.<i>.spd_compensation.
<name>`` (the key megatron's own non-homogeneous layout uses), and ``convert/mcore.py`` reads
them back by name.

Cost per block (``cost``): G (h + r (d_in + h)) parameters and 2 G r (d_in + h) + G h FLOPs per
token, with d_in = h or 2h; for SmolLM2 (h = 576, G = 3) at r = 16 that is 1.4 % of the block's
parameters.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from .compensation_shapes import input_size, param_shapes

PARAM_NAMES = ("bias", "weight_in", "weight_out")


def cost(hidden: int, groups: int, rank: int, inputs: str) -> dict[str, int]:
    """Added parameters and forward FLOPs per token of one block's compensation (all groups)."""
    d_in = input_size(hidden, inputs)
    shapes = param_shapes(groups, hidden, rank, inputs).values()
    return {"params": sum(math.prod(s) for s in shapes),
            "flops_per_token": groups * (2 * rank * (d_in + hidden) + hidden)}


def plan_cost(cfg, plan) -> dict[str, int]:
    """``cost`` summed over the compensated blocks of ``plan`` for model config ``cfg``."""
    out = {"params": 0, "flops_per_token": 0}
    for i in range(cfg.num_layers):
        c = plan.compensation_for(i)
        if c is not None:
            for k, v in cost(cfg.hidden_size, plan.groups, c["rank"], c["inputs"]).items():
                out[k] += v
    return out


class SPDCompensation(MegatronModule):
    """Per-group bias + rank-r map, for the ``local_groups`` groups of this rank."""

    def __init__(self, config, local_groups: int, rank: int, inputs: str = "ln1",
                 tp_group: Optional[Any] = None):
        super().__init__(config)
        h, dtype = config.hidden_size, config.params_dtype
        self.inputs, self.rank, self.tp_group = inputs, rank, tp_group
        for name, shape in param_shapes(local_groups, h, rank, inputs).items():
            p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
            set_tensor_model_parallel_attributes(p, True, 0, 1)  # sharded with the groups
            self.register_parameter(name, p)

    def forward(self, ln1: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """``ln1`` [s, b, h] (shared by the groups), ``partial`` the groups' A_g stacked along
        batch [s, n*b, h] (SPDTransformerLayer's layout) -> C_g in the same layout."""
        s, nb, h = partial.shape
        n = self.bias.shape[0]
        out = self.bias.view(1, n, 1, h)
        if self.rank > 0:
            f = ln1.unsqueeze(1).expand(s, n, nb // n, h)
            if self.inputs == "ln1+partial":
                f = torch.cat([f, partial.view(s, n, nb // n, h)], dim=-1)
            z = torch.einsum("snbd,nrd->snbr", f, self.weight_in)
            out = out + torch.einsum("snbr,nhr->snbh", z, self.weight_out)
        return out.expand(s, n, nb // n, h).reshape(s, nb, h)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Every parameter TP-sharded along the group axis (megatron's default would call
        them replicated), keyed per layer (module docstring).

        In megatron's stacked layout the layer arrives as ``sharded_offsets = ((0, i, L),)``
        and ``TransformerBlock`` then rewrites the key prefix ``decoder.layers.<j>.`` to
        ``decoder.layers.``; dropping the offset and putting ``<i>.`` after that prefix leaves
        ``decoder.layers.<i>.spd_compensation.<name>`` once it has. In the non-homogeneous
        layout (no offset) the block itself rewrites the prefix to ``decoder.layers.<i>.``."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = self.state_dict(prefix="", keep_vars=True)
        out = make_sharded_tensors_for_checkpoint(
            sd, prefix, {k: 0 for k in sd}, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"])
        if sharded_offsets:
            (axis, layer, _), = sharded_offsets
            assert axis == 0, sharded_offsets
            own = prefix.rsplit(".", 2)[-2] + "."              # "spd_compensation."
            for tensor in out.values():  # the dict keys stay the module's state-dict names
                tensor.key = f"{prefix[:-len(own)]}{layer}.{own}{tensor.key[len(prefix):]}"
        return out


def full_shapes(cfg, plan) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the compensation entries of ``plan``'s full state dict (TP=1)."""
    h, out = cfg.hidden_size, {}
    for i in range(cfg.num_layers):
        c = plan.compensation_for(i)
        if c is None:
            continue
        out.update({f"decoder.layers.{i}.spd_compensation.{name}": shape for name, shape
                    in param_shapes(plan.groups, h, c["rank"], c["inputs"]).items()})
    return out


def zero_entries(cfg, plan) -> dict[str, torch.Tensor]:
    """Zero compensation for every block the plan gives one (plain SPD until fitted)."""
    return {k: torch.zeros(shape) for k, shape in full_shapes(cfg, plan).items()}


def entries_for_plan(full: dict[str, torch.Tensor], cfg, plan) -> dict[str, torch.Tensor]:
    """``full`` with exactly the compensation entries ``plan`` gives: zero where the weights lack
    them (plain SPD until fitted), the weights' own that the plan does not give left out."""
    want = full_shapes(cfg, plan)
    kept = {k: v for k, v in full.items() if ".spd_compensation." not in k
            or (k in want and tuple(v.shape) == want[k])}
    return {**zero_entries(cfg, plan), **kept}
