"""Head grouping (HG, design.md 1 step 4): choose which heads and MLP units form each SPD group.

In an SPD block MLP shard g sees only its own attention partial ``H_g = X + A_g + b_O`` instead of
``H = X + sum A + b_O``. Which heads and which MLP hidden units share a group is free: permuting
whole KV groups (the query heads of a KV head stay with it, GQA) in Q/K/V (weight rows and
q/k/v bias alike; QK-norm weights are shared by every head and stay) and the columns of W_O, and
permuting MLP hidden units in fc1 rows (gate and up alike) and fc2 columns, leaves the *dense*
block's function unchanged (up to float summation order) but changes the SPD block.

Three levels of freedom, used in this order:
1. **Head regrouping** (paper): when there are more KV groups than SPD groups, partition the KV
   groups so each SPD group holds functionally diverse heads: maximise the within-group sum of
   distances between attention maps (mean total-variation distance of the softmax rows,
   calibration data). With exactly one KV group per SPD group (SmolLM2-135M: 3 KV heads, G=3)
   there is no freedom here: every partition is the same up to order, and we say so.
2. **Matching groups to MLP shards** (paper, ``mlp="match"``): assign head groups to the
   contiguous MLP shards so that the sum of MLP output norms ``||MLP_m(LN2(H_a))||`` is maximal.
3. **MLP unit re-partitioning** (ours, ``mlp="units"``, the default): the MLP hidden units can be
   moved freely between groups, so assign each unit to the attention group whose partial gives it
   the pre-activation closest to the dense one: minimise
   ``sum_u ||W2[:, u]||^2 E[(a_u(LN2(H_g(u))) - a_u(LN2(H)))^2]`` subject to ``ffn/G`` units per
   group (a balanced assignment, solved greedily and refined with pairwise swaps). This is the
   diagonal of the block's SPD output error, and it is the main freedom for GQA models like
   SmolLM2, where (1) is empty and (2) only permutes 3 shards.
Statistics are gathered at T=1 on the full weights (the result is a permutation of them).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..core.config import FullStateDict, ModelConfig
from ..parallel import distributed
from . import activations
from .compensation_fit import fit_stats, group_partials

MLP_MODES = ("units", "match", "none")


@dataclass
class HGResult:
    """One block's regrouping: ``kv_order[p]`` = old KV group now at position p;
    ``unit_order[j]`` = old MLP unit now at position j."""

    block: int
    kv_order: list[int]
    unit_order: list[int]
    head_freedom: bool
    error_before: float         # diagonal SPD MLP error, contiguous groups
    error_after: float          # same, after regrouping
    notes: list[str] = field(default_factory=list)
    # fitted rank-local compensation of the regrouped block (full tensors), when asked for
    compensation: Optional[dict[str, torch.Tensor]] = field(default=None, repr=False)
    compensation_explained: Optional[float] = None   # its fit's explained energy, when fitted

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("unit_order")
        d.pop("compensation")
        if d["compensation_explained"] is None:
            d.pop("compensation_explained")
        d["units_moved"] = sum(1 for j, u in enumerate(self.unit_order) if u != j)
        return d


def _prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def permute_block(full: FullStateDict, cfg: ModelConfig, block: int, kv_order: list[int],
                  unit_order: list[int]) -> FullStateDict:
    """A copy of ``full`` with block ``block``'s KV groups and MLP units permuted. The dense
    model's function is unchanged (tests check logits)."""
    ng, np_, hd, ffn = (cfg.num_query_groups, cfg.num_attention_heads, cfg.head_dim,
                        cfg.ffn_hidden_size)
    if sorted(kv_order) != list(range(ng)) or sorted(unit_order) != list(range(ffn)):
        raise ValueError("kv_order / unit_order must be permutations of the KV groups / MLP units")
    kv = torch.tensor(kv_order)
    units = torch.tensor(unit_order)
    p = _prefix(block)
    out = dict(full)
    for suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        if p + suffix in full:
            t = full[p + suffix]
            out[p + suffix] = t.reshape(ng, -1, *t.shape[1:])[kv].reshape(t.shape).clone()
    w = full[p + "self_attention.linear_proj.weight"]
    out[p + "self_attention.linear_proj.weight"] = \
        w.reshape(w.shape[0], ng, (np_ // ng) * hd)[:, kv].reshape(w.shape).clone()
    halves = 2 if cfg.gated else 1
    for suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        if p + suffix in full:
            t = full[p + suffix]
            out[p + suffix] = t.reshape(halves, ffn, *t.shape[1:])[:, units].reshape(t.shape).clone()
    w2 = full[p + "mlp.linear_fc2.weight"]
    out[p + "mlp.linear_fc2.weight"] = w2[:, units].clone()
    return out


# ----- statistics on calibration inputs ---------------------------------------------------

@torch.no_grad()
def _mlp_act(layer, h: torch.Tensor) -> torch.Tensor:
    """Hidden activations a(LN2(h)) ``[t, ffn]`` of the block's full MLP, from its weights."""
    mlp = layer.mlp
    u = layer.pre_mlp_layernorm(h)
    y = u @ mlp.linear_fc1.weight.float().t()
    if mlp.linear_fc1.bias is not None:
        y = y + mlp.linear_fc1.bias.float()
    if mlp.config.gated_linear_unit:
        gate, up = y.chunk(2, dim=-1)
        return mlp.config.activation_func(gate) * up
    return mlp.config.activation_func(y)


def _attention_distance(maps: torch.Tensor) -> torch.Tensor:
    """[ng, ng] mean total-variation distance between the KV groups' attention rows."""
    ng = maps.shape[0]
    flat = maps.reshape(ng, maps.shape[1], -1)
    d = torch.zeros(ng, ng)
    for a in range(ng):
        for b in range(ng):
            d[a, b] = 0.5 * (flat[a] - flat[b]).abs().sum(-1).mean()
    return d


def diverse_partition(dist: torch.Tensor, groups: int) -> list[list[int]]:
    """Partition items into ``groups`` equal groups maximising the within-group distance sum
    (greedy placement, then pairwise swaps while they help)."""
    n = dist.shape[0]
    size = n // groups
    order = sorted(range(n), key=lambda i: -float(dist[i].sum()))
    parts: list[list[int]] = [[] for _ in range(groups)]
    for i in order:
        open_ = [g for g in range(groups) if len(parts[g]) < size]
        parts[max(open_, key=lambda g: (float(dist[i, parts[g]].sum()) if parts[g] else 0.0,
                                        -len(parts[g])))].append(i)

    def score(p: list[int]) -> float:
        return float(dist[p][:, p].sum()) / 2

    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(groups), 2):
            for ia, ib in itertools.product(range(size), range(size)):
                pa, pb = parts[a][:], parts[b][:]
                pa[ia], pb[ib] = parts[b][ib], parts[a][ia]
                if score(pa) + score(pb) > score(parts[a]) + score(parts[b]) + 1e-9:
                    parts[a], parts[b] = pa, pb
                    improved = True
    return [sorted(p) for p in parts]


def balanced_assignment(cost: torch.Tensor) -> list[int]:
    """Assign each row (unit) to a column (group), ``rows/cols`` per column, minimising total
    cost: greedy by regret, then pairwise swaps between columns while they lower the cost."""
    n, g = cost.shape
    cap = n // g
    best, second = cost.topk(min(2, g), dim=1, largest=False).values.unbind(1) if g > 1 \
        else (cost[:, 0], cost[:, 0])
    order = torch.argsort(second - best, descending=True).tolist()
    assign = [-1] * n
    load = [0] * g
    for u in order:
        for c in torch.argsort(cost[u]).tolist():
            if load[c] < cap:
                assign[u], load[c] = c, load[c] + 1
                break
    assign_t = torch.tensor(assign)
    for _ in range(20):
        changed = False
        for a, b in itertools.permutations(range(g), 2):
            ua = (assign_t == a).nonzero().flatten()
            ub = (assign_t == b).nonzero().flatten()
            gain_a = cost[ua, a] - cost[ua, b]          # saved by moving ua -> b
            gain_b = cost[ub, b] - cost[ub, a]
            ga, ia = gain_a.sort(descending=True)
            gb, ib = gain_b.sort(descending=True)
            k = int(((ga[:min(len(ga), len(gb))] + gb[:min(len(ga), len(gb))]) > 1e-12).sum())
            if k:
                assign_t[ua[ia[:k]]] = b
                assign_t[ub[ib[:k]]] = a
                changed = True
        if not changed:
            break
    return assign_t.tolist()


@torch.no_grad()
def regroup_block(model, block: int, x_cache: torch.Tensor, cfg: ModelConfig, groups: int, *,
                  mlp: str = "units", micro_batch: int = 4, max_tokens: int = 4096,
                  compensation: Optional[dict[str, Any]] = None) -> HGResult:
    """Choose the regrouping of dense ``model``'s block ``block`` from its calibration inputs
    ``x_cache`` ``[n, s, h]``. With ``compensation`` (``fit_stats`` keywords: rank, inputs)
    the block's rank-local compensation is fitted for the groups as regrouped, and the MLP
    units are assigned on the compensated partials ``H_g + C_g`` the SPD block will see."""
    if mlp not in MLP_MODES:
        raise ValueError(f"unknown HG mlp mode {mlp!r}; use one of {MLP_MODES}")
    activations.require_full_weights("head grouping", "permuted")
    ng, ffn = cfg.num_query_groups, cfg.ffn_hidden_size
    layer = model.decoder.layers[block]
    ctx = activations.context(model, x_cache.shape[1])
    x, parts, maps = activations.block_stats(layer, x_cache, cfg, ctx, micro_batch, max_tokens)
    notes: list[str] = []
    head_freedom = ng > groups
    if head_freedom:
        kv_groups = diverse_partition(_attention_distance(maps), groups)
    else:
        kv_groups = [[k] for k in range(ng)]
        notes.append(f"{ng} KV heads for G={groups}: each SPD group holds exactly one KV head "
                     "and its query heads, so head regrouping has no freedom (GQA); only the "
                     "MLP side is regrouped")
    bias = layer.self_attention.linear_proj.bias
    b_o = 0.0 if bias is None else bias.float()
    comp_weights, comp = None, torch.zeros(x.shape[0], groups, x.shape[1])
    if compensation is not None:

        comp_weights, comp, explained = fit_stats(layer, x, group_partials(parts, kv_groups),
                                                  b_o, **compensation)
        notes.append(f"compensation fitted: {explained:.1%} of the missing partials' energy "
                     "explained; units assigned on the compensated partials")
    h_full = x + parts.sum(1) + b_o
    a_full = _mlp_act(layer, h_full)
    w2sq = layer.mlp.linear_fc2.weight.float().pow(2).sum(0)              # [ffn]
    cost = torch.zeros(ffn, groups)
    acts = []
    for g, kvs in enumerate(kv_groups):
        a_g = _mlp_act(layer, x + parts[:, kvs].sum(1) + b_o + comp[:, g])
        cost[:, g] = (a_g - a_full).pow(2).mean(0) * w2sq
        acts.append(a_g)
    per = ffn // groups
    contiguous = torch.arange(ffn) // per
    error_before = float(cost[torch.arange(ffn), contiguous].sum())
    if mlp == "units":
        assign = torch.tensor(balanced_assignment(cost))
    elif mlp == "match":
        w2 = layer.mlp.linear_fc2.weight.float()
        norm = torch.zeros(groups, groups)                                 # [head group, shard]
        for a in range(groups):
            for m in range(groups):
                sl = slice(m * per, (m + 1) * per)
                norm[a, m] = (acts[a][:, sl] @ w2[:, sl].t()).norm(dim=-1).mean()
        best = max(itertools.permutations(range(groups)),
                   key=lambda perm: sum(float(norm[a, perm[a]]) for a in range(groups)))
        # shard best[a] now serves head group a: reorder the shards instead of the heads
        assign = torch.tensor([best.index(int(c)) for c in contiguous])
    else:
        assign = contiguous
    error_after = float(cost[torch.arange(ffn), assign].sum())
    unit_order = torch.cat([(assign == g).nonzero().flatten() for g in range(groups)]).tolist()
    kv_order = [k for kvs in kv_groups for k in kvs]
    return HGResult(block=block, kv_order=kv_order, unit_order=unit_order,
                    head_freedom=head_freedom, error_before=error_before,
                    error_after=error_after, notes=notes, compensation=comp_weights,
                    compensation_explained=explained if compensation is not None else None)


def regroup(full: FullStateDict, cfg: ModelConfig, dense_model, block_list: list[int],
            dense_inputs: list[torch.Tensor], groups: int, *, mlp: str = "units",
            micro_batch: int = 4, max_tokens: int = 4096,
            progress: bool = True) -> tuple[FullStateDict, list[HGResult]]:
    """Regroup ``block_list`` (statistics from ``dense_model`` on ``dense_inputs[i]``) and return
    the permuted full state dict with one HGResult per block. Inputs of later blocks are
    unchanged, since every permutation preserves the dense function."""
    results = []
    for i in distributed.progress(block_list, desc="head grouping", enabled=progress):
        r = regroup_block(dense_model, i, dense_inputs[i], cfg, groups,
                          mlp=mlp, micro_batch=micro_batch, max_tokens=max_tokens)
        full = permute_block(full, cfg, i, r.kv_order, r.unit_order)
        results.append(r)
    return full, results


def describe(results: list[HGResult]) -> Optional[dict[str, Any]]:
    """Compact record for the plan file (the weights themselves are already permuted)."""
    if not results:
        return None
    return {str(r.block): r.summary() for r in results}
