"""SPDPlan: which blocks drop their attention sync point, for how many groups (design.md 7).

The plan file is a user-facing format people edit and diff, so loading is strict about what it
must have (format, groups, num_layers, strategies) and lenient about what it may have: unknown
optional keys (sensitivity, thresholds, head order, provenance, ...) round-trip untouched.

One optional key changes the model built from the plan, so it is checked on load:
``"compensation": {"blocks": [...], "rank": r, "inputs": "ln1" | "ln1+partial"}`` gives the
listed SPD blocks rank-local compensation (compensation.py): per group a bias plus a rank-r map
of the group's LN1 input (and its own attention partial), added before LN2; an optional
``"ranks": {"<block>": r}`` gives some blocks another rank.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import SPDError
from ..files import OutputKind, atomic_write_text, read_json_object

PLAN_FORMAT = "megatron-spd-plan/1"
STRATEGIES = ("dense", "zs", "b2b", "hg")
REQUIRED_KEYS = ("format", "groups", "num_layers", "strategies")
COMPENSATION_INPUTS = ("ln1", "ln1+partial")


class PlanError(SPDError, ValueError):
    """A plan that cannot be used as given; the message says what to change."""


def check_groups(groups: int, tp: int, num_heads: int, num_query_groups: int, ffn: int) -> None:
    """Raise PlanError unless G groups can be formed on this model and T ranks can hold them."""
    for what, n in (("attention heads", num_heads), ("KV heads (query groups)", num_query_groups),
                    ("MLP hidden units", ffn)):
        if n % groups:
            raise PlanError(f"{n} {what} do not divide into G={groups} SPD groups; choose G "
                            f"among the common divisors of heads {num_heads}, KV heads "
                            f"{num_query_groups} and ffn {ffn}")
    if groups % tp:
        raise PlanError(f"TP={tp} does not divide G={groups}: each rank must hold whole SPD "
                        f"groups; run at TP in {[t for t in range(1, groups + 1) if groups % t == 0]}"
                        " or make a plan for G=TP")


@dataclass
class SPDPlan:
    """G (``groups``) and one strategy per block; ``zs``/``b2b``/``hg`` blocks all run as SPD."""

    groups: int
    strategies: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.strategies = list(self.strategies)
        if not isinstance(self.groups, int) or self.groups < 1:
            raise PlanError(f"plan 'groups' must be a positive integer, got {self.groups!r}")
        bad = [(i, s) for i, s in enumerate(self.strategies) if s not in STRATEGIES]
        if bad:
            i, s = bad[0]
            raise PlanError(f"plan block {i} has unknown strategy {s!r}; use one of {STRATEGIES}")
        if not self.strategies:
            raise PlanError("plan 'strategies' is empty; give one strategy per transformer block")
        self._check_compensation()

    def _check_compensation(self) -> None:
        comp = self.extra.get("compensation")
        if comp is None:
            return
        fix = ('; write it as {"blocks": [SPD block indices], "rank": r >= 0, "inputs": one of '
               f'{list(COMPENSATION_INPUTS)}, optionally "ranks": {{"<block>": r}}}}')
        if not isinstance(comp, dict) or not isinstance(comp.get("blocks"), list):
            raise PlanError(f"plan 'compensation' must be an object with a 'blocks' list{fix}")
        rank, inputs, ranks = comp.get("rank"), comp.get("inputs", "ln1"), comp.get("ranks", {})
        if not isinstance(ranks, dict):
            raise PlanError(f"plan 'compensation' ranks must be an object{fix}")
        for r in (rank, *ranks.values()):
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise PlanError(f"plan 'compensation' rank must be an integer >= 0, got {r!r}{fix}")
        stray = [k for k in ranks if not k.isdigit() or int(k) not in comp["blocks"]]
        if stray:
            raise PlanError(f"plan 'compensation' ranks names block(s) {stray} that are not in "
                            f"its 'blocks'{fix}")
        if inputs not in COMPENSATION_INPUTS:
            raise PlanError(f"plan 'compensation' inputs {inputs!r} is unknown{fix}")
        dense = [i for i in comp["blocks"]
                 if not isinstance(i, int) or not 0 <= i < self.num_layers or not self.is_spd(i)]
        if dense:
            raise PlanError(f"plan 'compensation' lists block(s) {dense} that are not SPD blocks "
                            "of this plan; only SPD blocks can carry compensation")

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int, groups: int = 1) -> "SPDPlan":
        return cls(groups, ["dense"] * num_layers)

    @classmethod
    def from_spd_blocks(cls, num_layers: int, groups: int, spd_blocks: Iterable[int],
                        strategy: str = "zs") -> "SPDPlan":
        strategies = ["dense"] * num_layers
        for i in spd_blocks:
            if not 0 <= i < num_layers:
                raise PlanError(f"block index {i} out of range for {num_layers} blocks")
            strategies[i] = strategy
        return cls(groups, strategies)

    # ----- queries -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.strategies)

    def is_spd(self, layer: int) -> bool:
        return self.strategies[layer] != "dense"

    def compensation_for(self, layer: int) -> Optional[dict[str, Any]]:
        """``{"rank": r, "inputs": ...}`` if block ``layer`` carries compensation, else None."""
        comp = self.extra.get("compensation")
        if comp is None or layer not in comp["blocks"]:
            return None
        return {"rank": comp.get("ranks", {}).get(str(layer), comp["rank"]),
                "inputs": comp.get("inputs", "ln1")}

    @property
    def spd_blocks(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_spd(i)]

    @property
    def spd_ratio(self) -> float:
        return len(self.spd_blocks) / self.num_layers

    def validate_for(self, num_layers: int, num_attention_heads: int, num_query_groups: int,
                     ffn_hidden_size: int, tp: int) -> None:
        """Raise PlanError if this plan cannot run on that model at TP degree ``tp``."""
        if self.num_layers != num_layers:
            raise PlanError(f"plan has {self.num_layers} blocks but the model has {num_layers}; "
                            "make a plan for this model (tools/spd.py plan) or pick the right one")
        if not self.spd_blocks:
            return  # an all-dense plan runs at any TP the model itself allows
        check_groups(self.groups, tp, num_attention_heads, num_query_groups, ffn_hidden_size)

    # ----- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"format": PLAN_FORMAT, "groups": self.groups, "num_layers": self.num_layers,
             "strategies": list(self.strategies)}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "plan") -> "SPDPlan":
        if not isinstance(d, dict):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise PlanError(f"{source}: missing required key(s) {missing}; a plan needs "
                            f"{list(REQUIRED_KEYS)}")
        if d["format"] != PLAN_FORMAT:
            raise PlanError(f"{source}: format {d['format']!r} is not {PLAN_FORMAT!r}")
        strategies = d["strategies"]
        if not isinstance(strategies, list) or len(strategies) != d["num_layers"]:
            n = len(strategies) if isinstance(strategies, list) else "not a list"
            raise PlanError(f"{source}: 'strategies' has {n} entries but num_layers is "
                            f"{d['num_layers']}; give exactly one strategy per block")
        extra = {k: v for k, v in d.items() if k not in REQUIRED_KEYS}
        try:
            return cls(d["groups"], strategies, extra)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SPDPlan":
        if not Path(path).is_file():
            raise PlanError(f"plan file {path} does not exist")
        d = read_json_object(path, "an SPD plan (tools/spd.py plan)", PlanError)
        return cls.from_dict(d, source=str(path))


def is_plan_file(path: str | Path) -> bool:
    """Whether ``path`` is a plan file (a JSON object of this format), without validating it."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") == PLAN_FORMAT


#: What ``tools/spd.py plan --out`` writes: an existing plan is replaced only with --overwrite
#: (plans are edited by hand), anything else never.
PLAN_OUTPUT = OutputKind("SPD plan", ours=is_plan_file)
