"""SPD-aware column- and row-parallel linears: megatron-core's linears without their own collectives.

Inside an SPD block (block.py) the layer itself issues exactly one "copy to TP region" (or, with
sequence parallel, one all-gather) on the block input and one reduction of ``A_i + Z_i``; the
linears must therefore neither all-reduce their input gradient (ColumnParallel) nor reduce their
output (RowParallel). Outside SPD blocks these classes are never used: dense blocks keep the stock
``ColumnParallelLinear``/``RowParallelLinear``. Parameter names, shapes, TP attributes and
sharded-state-dict keys are the stock ones, so checkpoints are interchangeable.

Group emulation (design.md 2): a rank holding ``n`` > 1 SPD groups computes each group separately.
Activations of different groups are stacked along the batch dimension ([s, n*b, ...]) so that the
stock MLP code in between (bias, SwiGLU/GeLU) runs unchanged; each group's slice of the weight is
taken from the local shard (contiguous per group, since group slices are defined on the full
weights and TP shards are contiguous unions of groups). With ``n`` == 1 (the deployment, T = G)
the full local weight is used directly, so megatron's fused wgrad path stays available.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _local_linear(module, x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """megatron's linear autograd function with every collective switched off."""
    sliced = weight is not module.weight
    return module._forward_impl(
        input=x, weight=weight, bias=bias,
        # the fused wgrad kernel accumulates into weight.main_grad and needs the real parameter
        gradient_accumulation_fusion=module.gradient_accumulation_fusion and not sliced,
        allreduce_dgrad=False, sequence_parallel=False, tp_group=None, grad_output_buffer=None,
    )


def _stack(chunks: list[torch.Tensor]) -> torch.Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class SPDColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear whose input is already replicated (or gathered) by the SPD block.

    ``spd_groups`` local groups; ``spd_gated`` says the local output rows are laid out
    [gate; up] (megatron's SwiGLU fc1 per TP shard), so group j takes rows j of both halves.
    The input is either one tensor shared by all groups ([s, b, h], e.g. LN1(X) for QKV) or the
    groups' inputs stacked along batch ([s, n*b, h], e.g. LN2(X + A_g) for fc1).
    """

    spd_groups: int = 1
    spd_gated: bool = False

    def _group_rows(self, j: int) -> torch.Tensor:
        out = self.output_size_per_partition
        if self.spd_gated:
            half, per = out // 2, out // 2 // self.spd_groups
            return torch.cat([torch.arange(j * per, (j + 1) * per),
                              torch.arange(half + j * per, half + (j + 1) * per)])
        per = out // self.spd_groups
        return torch.arange(j * per, (j + 1) * per)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        assert weight is None and not runtime_gather_output, "unsupported inside an SPD block"
        bias = self.bias if not self.skip_bias_add else None
        n = self.spd_groups
        if n == 1:
            out = _local_linear(self, input_, self.weight, bias)
            return out, (self.bias if self.skip_bias_add else None)
        b = input_.shape[1] // n
        chunks = []
        for j in range(n):
            rows = self._group_rows(j).to(self.weight.device)
            x_j = input_[:, j * b:(j + 1) * b]
            b_j = None if self.bias is None else self.bias[rows]
            # per-group bias can't be returned as one tensor, so it is always added here
            chunks.append(_local_linear(self, x_j, self.weight[rows], b_j))
        return _stack(chunks), None


class SPDRowParallelLinear(RowParallelLinear):
    """RowParallelLinear that returns the unreduced per-group partial outputs and its bias.

    ``spd_input_stacked`` False (attention output projection): the input [s, b, n*k] holds all
    local groups' features side by side; group j uses columns j. True (fc2): the input is
    already stacked per group along batch, [s, n*b, k]. The output is always stacked per group
    along batch, [s, n*b, h]; the bias is returned, never added (the block adds it once).
    """

    spd_groups: int = 1
    spd_input_stacked: bool = False

    def forward(self, input_: torch.Tensor):
        n = self.spd_groups
        if n == 1:
            return _local_linear(self, input_, self.weight, None), self.bias
        k = self.input_size_per_partition // n
        chunks = []
        for j in range(n):
            if self.spd_input_stacked:
                b = input_.shape[1] // n
                x_j = input_[:, j * b:(j + 1) * b]
            else:
                x_j = input_[..., j * k:(j + 1) * k]
            chunks.append(_local_linear(self, x_j, self.weight[:, j * k:(j + 1) * k], None))
        return _stack(chunks), self.bias
