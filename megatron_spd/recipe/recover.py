"""Recovering a plan's SPD blocks in block order: head grouping, compensation fit, B2B.

For each block i with something to do, in order 0..L-1 (``recover``):
1. its inputs: the dense model's hidden states at block i (``inputs="dense"``: every block is
   recovered independently of the others) or those of the student model, whose blocks 0..i-1
   are already in their final, recovered form (``"spd"``: sequential);
2. head grouping (``hg``): statistics of the dense block on those inputs choose the KV-group
   and MLP-unit permutation, which is applied to the student's block i (the dense teacher's
   function does not change under it, so the teacher keeps its weights);
3. rank-local compensation (blocks the plan gives one): fitted in closed form on the same
   inputs, for hg blocks inside the regrouping so that MLP units are assigned on the
   compensated partials;
4. B2B (``b2b``): train the student block on those inputs towards the dense block's output on
   them (``targets="block"``) or towards the dense model's own hidden state after block i
   (``"trajectory"``, sequential only); a block's ``B2BBudget`` can give it other epochs or
   only the first k calibration sequences (a per-block budget, e.g. weighted by sensitivity:
   research/recovery.py measures one), while HG and the compensation fit always see them all.
The hidden-state caches live on the CPU ([n, s, h]); steps 2 and 3 need T=1 (they read the full
weights), B2B alone also runs at T=G.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..parallel import distributed
from . import activations, distill, headgroup
from . import compensation_fit as compensation


@dataclass(frozen=True)
class B2BBudget:
    """One block's B2B budget where it differs from the ``B2BConfig``'s ``epochs`` over all
    calibration sequences."""

    epochs: Optional[int] = None     # None: the B2BConfig's
    sequences: Optional[int] = None  # train on the first k calibration sequences; None: all

    def config(self, b2b: distill.B2BConfig) -> distill.B2BConfig:
        return b2b if self.epochs is None else replace(b2b, epochs=self.epochs)

    def inputs(self, block: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The [n, s, h] caches cut to the budget's sequences."""
        if self.sequences is None:
            return x, y
        if not 1 <= self.sequences <= x.shape[0]:
            raise ValueError(f"block {block}: a B2B budget of {self.sequences} sequences needs "
                             f"1 to {x.shape[0]} (the calibration sequences given); pass more "
                             f"calibration samples or a smaller budget")
        return x[:self.sequences], y[:self.sequences]


@dataclass
class BlockSteps:
    """What to do to one block: head grouping, compensation (``{"rank", "inputs"}``), B2B
    (with its budget)."""

    hg: bool = False
    compensation: Optional[dict[str, Any]] = None
    b2b: bool = False
    b2b_budget: B2BBudget = field(default_factory=B2BBudget)


@dataclass
class Recovered:
    """What ``recover`` did, per step (results in block order)."""

    head_grouping: list[headgroup.HGResult]
    compensation: list[compensation.CompensationFit]
    b2b: list[distill.B2BResult]


def _regroup(model, teacher, i: int, x_in: torch.Tensor, cfg, groups: int, comp, hg_mlp: str,
             micro_batch: int) -> tuple[headgroup.HGResult, Optional[compensation.CompensationFit]]:
    r = headgroup.regroup_block(teacher, i, x_in, cfg, groups, mlp=hg_mlp,
                                micro_batch=micro_batch, compensation=comp)
    permuted = headgroup.permute_block(activations.get_block(teacher, i), cfg, i, r.kv_order,
                                       r.unit_order)
    activations.set_block(model, i, permuted)
    return r, None if comp is None else compensation.CompensationFit(i, r.compensation,
                                                                     r.compensation_explained)


def recover(model, teacher, tokens: torch.Tensor, todo: dict[int, BlockSteps], cfg, *,
            b2b: Optional[distill.B2BConfig] = None, hg_mlp: str = "units",
            micro_batch: int = 4, progress: bool = True) -> Recovered:
    """Recover ``todo``'s blocks of the SPD ``model`` (built from the plan, holding the dense
    weights in those blocks) against the dense ``teacher`` on calibration ``tokens`` [n, s].
    ``b2b`` (needed when a block has ``b2b``) also sets the inputs and targets."""
    activations.check_model(model)
    done = Recovered([], [], [])
    order = sorted(i for i, s in todo.items() if s.hg or s.compensation or s.b2b)
    if not order:
        return done
    if any(todo[i].b2b for i in order) and b2b is None:
        raise ValueError("blocks marked for B2B need a B2BConfig")
    inputs = b2b.inputs if b2b is not None else "dense"
    targets = b2b.targets if b2b is not None else "block"
    mb = b2b.micro_batch if b2b is not None else micro_batch
    groups = model.decoder.layers[order[0]].spd_groups
    ctx = activations.context(model, tokens.shape[1])
    with torch.no_grad():
        x_dense = torch.cat([activations.to_bsh(activations.embed(teacher, tokens[sl]))
                             for sl in activations.micro_batches(tokens.shape[0], mb)])
    x_spd = x_dense.clone() if inputs == "spd" else None
    bar = distributed.progress(range(order[-1] + 1), desc=f"recover ({inputs} inputs)",
                               enabled=progress)
    for i in bar:
        t_layer, s_layer = teacher.decoder.layers[i], model.decoder.layers[i]
        x_in = x_dense if inputs == "dense" else x_spd
        y_dense = None  # the teacher's output on the dense stream, computed once
        steps = todo.get(i, BlockSteps())
        if i in order:
            if steps.hg:
                r, fit = _regroup(model, teacher, i, x_in, cfg, groups, steps.compensation,
                                  hg_mlp, micro_batch)
                done.head_grouping.append(r)
            elif steps.compensation:
                fit = compensation.fit_block(teacher, i, x_in, cfg, groups, micro_batch=micro_batch,
                                             **steps.compensation)
            else:
                fit = None
            if fit is not None:
                activations.set_block(model, i, compensation.state_dict_entries([fit]))
                done.compensation.append(fit)
            if steps.b2b:
                if targets == "trajectory":
                    y_dense = distill.apply_layer(t_layer, x_dense, ctx, mb)
                    y_t = y_dense
                else:
                    y_t = distill.apply_layer(t_layer, x_in, ctx, mb)
                    if inputs == "dense":
                        y_dense = y_t
                r = distill.distill_block(model, i, *steps.b2b_budget.inputs(i, x_in, y_t),
                                          steps.b2b_budget.config(b2b))
                done.b2b.append(r)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(block=i, mse=f"{r.mse_before:.3g}->{r.mse_after:.3g}")
        if i < order[-1]:
            if inputs == "spd":
                x_spd = distill.apply_layer(s_layer, x_spd, ctx, mb)
            if inputs == "dense" or targets == "trajectory":
                x_dense = y_dense if y_dense is not None else distill.apply_layer(
                    t_layer, x_dense, ctx, mb)
    return done
