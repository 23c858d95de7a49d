"""From a target to a recovered SPD model (design.md 1, steps 1-4 together).

``make_plan``: given a sensitivity sweep and either a target SPD ratio r (``round(r * L)`` SPD
blocks) or a maximum perplexity increase, pick the least sensitive blocks and give each its
strategy (classification, or one strategy for all). For a perplexity budget the number of blocks
is the largest whose *measured* zero-shot calibration perplexity stays within the budget
(bisection; the measurement reuses the dense hidden-state cache, so it costs one pass over the
blocks per probe). Zero-shot perplexity is an upper bound on what the recovered model reaches,
so the plan is conservative.

``recover_with_plan``: run the strategies block by block (recover.py): HG (permute weights) on ``hg``
blocks, the closed-form compensation fit on the blocks the plan gives one, B2B on ``b2b`` and
``hg`` blocks; returns the new full state dict and the plan with what was done recorded in it.
``compose`` assembles a plan's weights from per-block results computed once for every block
(valid for B2B with dense inputs, where each block's result is independent of the others).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.compensation import entries_for_plan, zero_entries
from ..core.config import FullStateDict, ModelConfig
from ..core.plan import COMPENSATION_INPUTS, SPDPlan
from ..core.sharding import gather_full_state_dict, load_full_state_dict
from ..core.spec import build_model
from ..options import option
from . import activations, classify, distill, headgroup, recover
from .sensitivity import Sensitivity


@dataclass
class CompensationConfig:
    """Which compensation a new plan gives its SPD blocks (``make_plan``); the
    defaults are the recovery method measured best on SmolLM2-135M (docs/recovery.md)."""

    enabled: bool = option(True, "give every SPD block rank-local compensation (fitted in closed "
                                 "form when the plan is applied)", flag="--no-compensation")
    rank: int = option(0, "rank of the map of LN1(X) (0: a bias per group only)",
                       flag="--compensation-rank")
    inputs: str = option("ln1", "features of the map: LN1(X), or LN1(X) and the group's own "
                                "attention partial", choices=COMPENSATION_INPUTS,
                         flag="--compensation-inputs")

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"compensation rank must be >= 0, got {self.rank}")

    def plan_entry(self, blocks: list[int]) -> Optional[dict[str, Any]]:
        """The plan's ``compensation`` value for ``blocks`` (None when disabled or no blocks)."""
        if not self.enabled or not blocks:
            return None
        return {"blocks": list(blocks), "rank": self.rank, "inputs": self.inputs}


def n_for_ratio(num_layers: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"SPD ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * num_layers))


def n_for_max_ppl(sens: Sensitivity, max_increase: float,
                  measure: Callable[[list[int]], float]) -> tuple[int, float]:
    """Largest N whose N least sensitive blocks, zero-shot SPD, measure within
    ``baseline + max_increase``; ``measure(blocks) -> ppl``. Returns (N, its ppl)."""
    if max_increase < 0:
        raise ValueError(f"maximum perplexity increase must be >= 0, got {max_increase}")
    order = sens.order()
    limit = sens.baseline_ppl + max_increase
    lo, lo_ppl, hi = 0, sens.baseline_ppl, len(order)
    while lo < hi:  # invariant: N=lo fits; find the largest N that fits (monotone in practice)
        mid = (lo + hi + 1) // 2
        ppl = measure(sorted(order[:mid]))
        if ppl <= limit:
            lo, lo_ppl = mid, ppl
        else:
            hi = mid - 1
    return lo, lo_ppl


def zs_measure(dense, spd, tokens: torch.Tensor, dense_inputs: Sequence[torch.Tensor],
               micro_batch: int = 4) -> Callable[[list[int]], float]:
    """``measure(blocks)``: calibration perplexity with exactly those blocks SPD (zero-shot).
    Starts from the cached dense input of the first SPD block."""
    def measure(spd_blocks: list[int]) -> float:
        L = len(dense.decoder.layers)
        first = min(spd_blocks) if spd_blocks else L
        s = set(spd_blocks)
        layers = [spd.decoder.layers[i] if i in s else dense.decoder.layers[i]
                  for i in range(first, L)]
        return activations.perplexity_from(dense, dense_inputs[first], tokens, layers, micro_batch)
    return measure


def make_plan(sens: Sensitivity, *, n_spd: int, strategy: str = "auto",
              t1: Optional[float] = None, t2: Optional[float] = None,
              compensation: Optional[CompensationConfig] = None) -> SPDPlan:
    """Plan with the ``n_spd`` least sensitive blocks SPD. ``strategy="auto"`` classifies them
    (classify.py); ``zs`` / ``b2b`` / ``hg`` gives every SPD block that strategy.
    ``compensation`` (None: none) gives every SPD block rank-local compensation."""
    L = sens.num_layers
    if not 0 <= n_spd <= L:
        raise ValueError(f"n_spd must be in [0, {L}], got {n_spd}")
    chosen = sorted(sens.order()[:n_spd])
    lo, hi = classify.thresholds(sens.sensitivity, t1, t2)
    if strategy == "auto":
        cls = classify.classify(sens.sensitivity, chosen, lo, hi)
    elif strategy in classify.CLASSES:
        cls = {i: strategy for i in chosen}
    else:
        raise ValueError(f"strategy must be 'auto' or one of {classify.CLASSES}, got {strategy!r}")
    strategies = [cls.get(i, "dense") for i in range(L)]
    comp = None if compensation is None else compensation.plan_entry(chosen)
    return SPDPlan(sens.groups, strategies, {**({"compensation": comp} if comp else {}),
        "sensitivity": {"mode": sens.mode, "values": sens.sensitivity,
                        "baseline_ppl": sens.baseline_ppl, "n_samples": sens.n_samples,
                        "seq_len": sens.seq_len},
        "thresholds": {"t1": lo, "t2": hi, "rule": "explicit" if t1 is not None or t2 is not None
                       else "robust (classify.py)"},
        "provenance": {"tool": "megatron_spd.recipe.autoplan", "strategy": strategy,
                       "n_spd": n_spd, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime())},
    })


def recover_with_plan(cfg: ModelConfig, full: FullStateDict, plan: SPDPlan, tokens: torch.Tensor, *,
               b2b: Optional[distill.B2BConfig] = None, hg_mlp: str = "units",
               micro_batch: int = 4, progress: bool = True,
               b2b_budget: Optional[dict[int, recover.B2BBudget]] = None):
    """Run HG, compensation and B2B as the plan says (``recover.recover``, block by block);
    returns (model with the plan, its full state dict, plan with records). ``b2b=None`` does
    HG and compensation only; ``b2b_budget`` gives some blocks their own B2B budget (recorded
    in the plan). HG and compensation need T=1; B2B runs at any T dividing G."""
    dense_plan = SPDPlan.dense(cfg.num_layers, plan.groups)
    dense = build_model(cfg, dense_plan)
    load_full_state_dict(dense, entries_for_plan(full, cfg, dense_plan))
    dense.eval()
    model = build_model(cfg, plan)
    load_full_state_dict(model, {**zero_entries(cfg, plan), **full})
    budget = b2b_budget or {}
    todo = {i: recover.BlockSteps(hg=s == "hg", compensation=plan.compensation_for(i),
                                  b2b=b2b is not None and s in ("b2b", "hg"),
                                  b2b_budget=budget.get(i, recover.B2BBudget()))
            for i, s in enumerate(plan.strategies) if plan.is_spd(i)}
    done = recover.recover(model, dense, tokens, todo, cfg, b2b=b2b, hg_mlp=hg_mlp,
                           micro_batch=micro_batch, progress=progress)
    extra = dict(plan.extra)
    if done.head_grouping:
        extra["head_grouping"] = {"mlp": hg_mlp, "blocks": headgroup.describe(done.head_grouping)}
    if done.compensation:
        extra["compensation"] = {**extra["compensation"], "fit": {
            str(f.block): f.summary() for f in done.compensation}}
    if done.b2b:
        extra["b2b"] = distill.describe(done.b2b, b2b)
        if budget:
            extra["b2b"]["budget"] = {str(i): asdict(b) for i, b in sorted(budget.items())}
    model.eval()
    out_plan = SPDPlan(plan.groups, plan.strategies, extra)
    return model, gather_full_state_dict(model), out_plan


def block_keys(full: FullStateDict, i: int) -> list[str]:
    prefix = f"decoder.layers.{i}."
    return [k for k in full if k.startswith(prefix)]


def compose(dense_full: FullStateDict, recovered: dict[str, FullStateDict],
            plan: SPDPlan) -> FullStateDict:
    """Weights for ``plan``: each SPD block's parameters from ``recovered[strategy]`` (a full
    state dict in which every block was recovered that way, independently), the rest dense."""
    out = dict(dense_full)
    for i, s in enumerate(plan.strategies):
        if s == "dense" or s == "zs":
            continue
        if s not in recovered:
            raise KeyError(f"no recovered weights for strategy {s!r} (block {i})")
        for k in block_keys(dense_full, i):
            out[k] = recovered[s][k]
    return out
