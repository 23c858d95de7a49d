"""What a latency sweep's records mean: per-plan statistics, the bound on what SPD can save, and
the analytic model checked against the measurement (``latency.run_latency`` records, this module
judges).

- Across ranks a step lasts as long as its slowest rank, so step times are the max over ranks.
  Time inside collectives is the min over ranks: a rank that arrives early also waits for the
  slowest one there, and that wait is load imbalance, not communication, and it does not go away
  when the collective is dropped.
- The bound (design.md 6): SPD saves at most the time of the all-reduces it drops, i.e. (dense
  all-reduces per step - plan all-reduces per step) x the dense run's time per all-reduce;
  ``achieved / bound`` says how much of that the measurement realised.
- The analytic model (analytic.py) gets one compute rate fitted to the dense plan's measured
  step and predicts every SPD plan; the relative errors say whether it can be trusted for
  shapes this machine cannot run.
"""
from __future__ import annotations

import statistics
from typing import Optional

from ..core.config import ModelConfig
from ..core.plan import SPDPlan
from ..parallel.collectives import LinkProfile
from . import analytic


def stats(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2],
            "n": len(v), "values": values}


def summarise(name: str, plan: Optional[SPDPlan], per_rank: list[list[dict]]) -> dict:
    """Step time = max over ranks per visit; collective time = min over ranks (module doc)."""
    visits = list(zip(*per_rank))  # per repeat: one record per rank
    out = {"name": name, "spd_ratio": plan.spd_ratio if plan else 0.0,
           "n_spd": len(plan.spd_blocks) if plan else 0, "stock": plan is None}
    for ph in ("prefill", "decode"):
        out[ph] = stats([max(r[f"{ph}_s"] for r in v) for v in visits])
        colls = per_rank[0][0][f"{ph}_coll"]
        out[ph]["collectives"] = {k: {"calls": c["calls"], "bytes": c["bytes"]}
                                  for k, c in colls.items()}
        out[ph]["comm_s"] = stats([min(sum(c["seconds"] for c in r[f"{ph}_coll"].values())
                                        for r in v) for v in visits])
        ar = [min(r[f"{ph}_coll"].get("all_reduce", {}).get("seconds", 0.0) for r in v)
              for v in visits]
        calls = colls.get("all_reduce", {}).get("calls", 0)
        out[ph]["all_reduce_s_each"] = statistics.median(ar) / calls if calls else 0.0
    return out


def add_bounds(report: dict) -> None:
    """achieved / bound for every plan against the dense (spd0) plan, per phase; and the stock
    model against the dense plan."""
    plans = {p["name"]: p for p in report["plans"]}
    dense = plans["spd0"]
    for p in report["plans"]:
        for ph in ("prefill", "decode"):
            d, q = dense[ph], p[ph]
            dropped = (d["collectives"].get("all_reduce", {}).get("calls", 0)
                       - q["collectives"].get("all_reduce", {}).get("calls", 0))
            bound = dropped * d["all_reduce_s_each"]
            achieved = d["median"] - q["median"]
            q["dropped_all_reduces"] = dropped
            q["bound_s"] = bound
            q["achieved_s"] = achieved
            q["achieved_over_bound"] = achieved / bound if bound > 0 else None
            q["speedup"] = d["median"] / q["median"]
    # all ratios at once: least-squares slope of achieved on bound through the origin
    spd = [p for p in report["plans"] if not p["stock"] and p["n_spd"] > 0]
    report["realised_fraction"] = {}
    for ph in ("prefill", "decode"):
        bb = sum(p[ph]["bound_s"] ** 2 for p in spd)
        report["realised_fraction"][ph] = (sum(p[ph]["achieved_s"] * p[ph]["bound_s"] for p in spd)
                                           / bb if bb > 0 else None)
    if "stock" in plans:
        report["stock_vs_dense"] = {
            ph: {"stock_median_s": plans["stock"][ph]["median"],
                 "dense_plan_median_s": dense[ph]["median"],
                 "dense_over_stock": dense[ph]["median"] / plans["stock"][ph]["median"]}
            for ph in ("prefill", "decode")}


def validate_analytic(report: dict, cfg: ModelConfig, links) -> dict:
    """Fit this machine's compute rate to the dense plan's measured step, predict every SPD plan
    with the analytic model, and report the relative error per plan and phase.

    The link is the simulated profile; without a simulator it is the dense run's measured time
    per all-reduce (alpha only), so the prediction then checks only the counting.
    """
    wl = report["workload"]
    tp = report["tp"]
    dense = next(p for p in report["plans"] if p["name"] == "spd0")
    prompt, new_tokens, batch = wl["prompt"], wl["new_tokens"], wl["batch"]
    shape = {"prefill": (prompt, (prompt + 1) / 2), "decode": (1, prompt + (new_tokens + 1) / 2)}
    out = {}
    for ph, (tokens, context) in shape.items():
        link = links.link(ph) or LinkProfile("measured", dense[ph]["all_reduce_s_each"], 1e30)
        try:
            fitted = analytic.fit_rate(dense[ph]["median"], cfg, tp, link, batch, tokens,
                                       context, bytes_per_param=4)
        except ValueError as e:
            out[ph] = {"error": str(e)}
            continue
        rows = []
        for p in report["plans"]:
            if p["stock"]:
                continue
            pred = analytic.predict_measured(cfg, tp, p["n_spd"], link, fitted, batch, tokens,
                                             context)
            rows.append({"name": p["name"], "measured_s": p[ph]["median"], "predicted_s": pred,
                         "rel_error": pred / p[ph]["median"] - 1})
        out[ph] = {"fitted_GFLOPs": fitted.flops / 1e9, "plans": rows,
                   "max_abs_rel_error": max(abs(r["rel_error"]) for r in rows)}
    return out
