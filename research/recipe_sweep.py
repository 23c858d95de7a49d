"""SmolLM2-135M at G=3: accuracy and perplexity versus SPD ratio for ZS, ZS+B2B and ZS+B2B+HG.

One script for the docs/recipe.md table and plot. Stages (each cached under --work, so a rerun
resumes; results are written after every evaluated model, so a cut-off run still leaves a table):

1. cumulative sensitivity sweep on calibration text (split ``calib``) -> plan order;
2. B2B for every block (dense inputs: each block's result is independent of the others, so it is
   computed once and composed into every plan, autoplan.compose), and HG + B2B for every block;
3. for each SPD ratio and variant: the plan's weights, Wikipedia perplexity (split ``eval``, held
   out from calibration) and the paper's zero-shot tasks on the first --limit items (the same
   items for every model);
4. docs/recipe_results.json, docs/recipe_results.md (table) and docs/recipe_accuracy.png.

Variants: ``zs``: every SPD block zero-shot; ``b2b`` (ZS+B2B): every SPD block distilled;
``hg`` (ZS+B2B+HG): every SPD block head-grouped, then distilled; ``auto`` (perplexity only):
the classification rule of classify.py (zs / b2b / hg by sensitivity); ``b2b_spd`` (perplexity
only, --inputs-compare ratios): B2B on the partially-SPD model's hidden states instead of the
dense model's, to choose the default inputs.

    .venv/bin/python research/recipe_sweep.py            # defaults = the committed run
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from megatron_spd.cli import common as cli
from megatron_spd.cli import logs
from megatron_spd.core.plan import SPDPlan
from megatron_spd.core.sharding import load_full_state_dict
from megatron_spd.core.spec import build_model
from megatron_spd.data.defaults import DEFAULT_GROUPS
from megatron_spd.data.texts import calibration_batches, load_texts
from megatron_spd.evaluate import (PAPER_TASKS, evaluate_tasks, paired_difference,
                                   paper_average_se, perplexity)
from megatron_spd.files import atomic_write_json, atomic_write_text, save_figure
from megatron_spd.loading.sources import load_weights
from megatron_spd.parallel import distributed
from megatron_spd.recipe import autoplan, distill, sensitivity
from megatron_spd.recipe.distill import B2BConfig
from megatron_spd.recipe.run import Calibration
from paths import ROOT, repo_path

VARIANTS = {"zs": "ZS", "b2b": "ZS+B2B", "hg": "ZS+B2B+HG", "auto": "auto (classified)",
            "b2b_spd": "ZS+B2B, partially-SPD inputs"}


def parse_args(argv=None):
    # the settings of the published sweep (docs/recipe.md section 6); the package defaults have
    # since become the recovery recipe's (docs/recovery.md)
    calib = Calibration(samples=4)
    b2b = B2BConfig(epochs=2, inputs="dense", targets="block")
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="model (default: the bundled SmolLM2-135M)")
    p.add_argument("--text", default=None, help="calibration and perplexity text, split calib "
                   "and eval (default: the bundled Wikipedia paragraphs)")
    p.add_argument("--groups", type=int, default=DEFAULT_GROUPS)
    p.add_argument("--ratios", default="0,0.25,0.5,0.75,1")
    p.add_argument("--variants", default="zs,b2b,hg,auto")
    p.add_argument("--calib-samples", type=int, default=calib.samples)
    p.add_argument("--calib-len", type=int, default=calib.seq_len)
    p.add_argument("--sweep-samples", type=int, default=calib.samples,
                   help="calibration samples used by the sensitivity sweep (first of them)")
    p.add_argument("--b2b-epochs", type=int, default=b2b.epochs)
    p.add_argument("--b2b-lr", type=float, default=b2b.lr)
    p.add_argument("--micro-batch", type=int, default=b2b.micro_batch)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--ppl-ctx", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--limit", type=int, default=80, help="items per task")
    p.add_argument("--tasks", default="paper")
    p.add_argument("--merge", nargs="*", default=[],
                   help="results.json files of parallel runs to merge into this one")
    p.add_argument("--report-only", action="store_true",
                   help="write the table and plot from the results so far, compute nothing")
    p.add_argument("--chunk", type=int, default=10, help="blocks per stage-2 recovery file")
    p.add_argument("--results", default="results.json",
                   help="results file under --work (parallel evaluation runs use one each, "
                        "then --merge)")
    p.add_argument("--priority", default="0,0.5,1,0.25,0.75",
                   help="order in which the ratios are evaluated")
    p.add_argument("--skip-missing", action="store_true",
                   help="evaluate only plans whose blocks are recovered already (no stage 2 here)")
    p.add_argument("--only-recover", default=None, metavar="STRATEGY:FIRST_BLOCK",
                   help="only compute one stage-2 chunk, e.g. hg:10 (to run chunks in parallel "
                        "processes), then exit")
    p.add_argument("--inputs-compare", default="0.5",
                   help="ratios at which B2B with partially-SPD inputs is also measured (ppl)")
    p.add_argument("--work", default=str(ROOT / "runs" / "recipe_sweep"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logs.setup()  # the package's own lines (as tools/*.py show them)
    with distributed.running(1):
        sweep(args)


def sweep(args) -> None:
    """Stages 1-4 (module doc) in the current single-process world."""
    work, docs = Path(args.work), Path(args.docs)
    work.mkdir(parents=True, exist_ok=True)
    cfg, full, tok, _ = load_weights(args.ckpt)
    L, G = cfg.num_layers, args.groups
    calib = calibration_batches(tok, args.calib_samples, args.calib_len, args.text)
    eval_texts = load_texts(args.text, split="eval")
    tasks = ([t for group in PAPER_TASKS.values() for t in group] if args.tasks == "paper"
             else args.tasks.split(","))
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = args.variants.split(",")
    args.inputs_compare = [float(r) for r in args.inputs_compare.split(",") if r]
    log = lambda *a: print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)  # noqa: E731

    # 1. sensitivity ------------------------------------------------------------------------
    sweeps = {}
    for mode in ("cumulative", "local"):   # the cheap local variant for comparison
        path = work / f"sensitivity_{mode}.json"
        if not path.exists():
            dense, spd = sensitivity.build_pair(cfg, full, G)
            sensitivity.sweep(dense, spd, calib[:args.sweep_samples], mode=mode).save(path)
            del dense, spd
        sweeps[mode] = sensitivity.Sensitivity.load(path)
    sens = sweeps["cumulative"]
    sensitivity.plot(list(sweeps.values()), docs / "recipe_sensitivity.png",
                     title=f"SmolLM2-135M, G={G}, {sens.n_samples}x{sens.seq_len} calibration tokens")
    log("sensitivity", [round(s, 3) for s in sens.sensitivity], "baseline", sens.baseline_ppl)

    # 2. per-block recovery, once for all plans (computed when a variant first needs it) -----
    b2b_cfg = distill.B2BConfig(epochs=args.b2b_epochs, lr=args.b2b_lr, inputs="dense",
                                targets="block",
                                micro_batch=args.micro_batch)
    recovered, records = {}, {}

    def recover_blocks(strategy: str, chunk: list[int], path: Path) -> None:
        t0 = time.time()
        plan_chunk = SPDPlan(G, [strategy if i in chunk else "dense" for i in range(L)])
        model, rec_full, rec_plan = autoplan.recover_with_plan(cfg, full, plan_chunk, calib, b2b=b2b_cfg,
                                                        micro_batch=args.micro_batch)
        del model
        tmp = path.with_name(f".{path.name}.tmp")  # parallel readers glob the final names
        torch.save({"full": {k: rec_full[k] for i in chunk for k in autoplan.block_keys(full, i)},
                    "plan": rec_plan.to_dict(), "seconds": time.time() - t0}, tmp)
        tmp.replace(path)
        log(f"recovered blocks {chunk[0]}-{chunk[-1]} with {strategy} in {time.time() - t0:.0f}s")

    def chunk_path(strategy: str, chunk: list[int]) -> Path:
        return work / f"{strategy}_blocks{chunk[0]}-{chunk[-1]}.pt" if chunk == list(
            range(chunk[0], chunk[-1] + 1)) else work / f"{strategy}_blocks{'_'.join(map(str, chunk))}.pt"

    def recover(strategy: str) -> None:
        """Blocks recovered with ``strategy``, from the chunk files written so far (by this run
        or by parallel --only-recover runs); without --skip-missing, missing chunks of
        --chunk blocks are computed here first."""
        if not args.skip_missing:
            for a in range(0, L, args.chunk):
                chunk = list(range(a, min(L, a + args.chunk)))
                if not chunk_path(strategy, chunk).exists():
                    recover_blocks(strategy, chunk, chunk_path(strategy, chunk))
        rec_full, recs, seconds, covered = dict(full), {}, 0.0, set()
        for path in sorted(work.glob(f"{strategy}_blocks*.pt")):
            saved = torch.load(path, weights_only=True)
            rec_full.update(saved["full"])
            covered |= {int(k.split(".")[2]) for k in saved["full"]}
            seconds += saved["seconds"]
            for k in ("b2b", "head_grouping"):
                part = saved["plan"].get(k) or {}
                recs.setdefault(k, {}).update(part.get("blocks") or {})
        recovered[strategy] = rec_full
        coverage[strategy] = covered
        records[strategy] = {**recs, "seconds (sum over chunks)": seconds,
                             "blocks": sorted(covered),
                             "b2b_config": {"epochs": args.b2b_epochs, "lr": args.b2b_lr,
                                            "micro_batch": args.micro_batch}}

    coverage: dict[str, set] = {}
    if args.only_recover:  # run chunks of stage 2 in parallel processes next to the main one
        strategy, _, spec = args.only_recover.partition(":")
        chunk = ([int(b) for b in spec.split(",")] if "," in spec
                 else list(range(int(spec), min(L, int(spec) + args.chunk))))
        if not chunk_path(strategy, chunk).exists():
            recover_blocks(strategy, sorted(chunk), chunk_path(strategy, sorted(chunk)))
        return

    # 3. evaluate --------------------------------------------------------------------------
    res_path = work / args.results
    results = json.loads(res_path.read_text()) if res_path.exists() else {}

    def plan_for(variant: str, ratio: float) -> SPDPlan:
        n = autoplan.n_for_ratio(L, ratio)
        strategy = {"auto": "auto", "b2b_spd": "b2b"}.get(variant, variant)
        return autoplan.make_plan(sens, n_spd=n, strategy=strategy)

    def distill_spd_inputs(plan: SPDPlan, key: str):
        path = work / f"{key}.pt"
        if not path.exists():
            t0 = time.time()
            cfg_spd = distill.B2BConfig(epochs=args.b2b_epochs, lr=args.b2b_lr, inputs="spd",
                                        targets="block",
                                        micro_batch=args.micro_batch)
            _, rec_full, rec_plan = autoplan.recover_with_plan(cfg, full, plan, calib, b2b=cfg_spd,
                                                        micro_batch=args.micro_batch)
            torch.save({"full": rec_full, "plan": rec_plan.to_dict(),
                        "seconds": time.time() - t0}, path)
            log(f"{key}: B2B with partially-SPD inputs in {time.time() - t0:.0f}s")
        saved = torch.load(path, weights_only=True)
        records[key] = {"b2b": saved["plan"].get("b2b"), "seconds": saved["seconds"]}
        return saved["full"]

    def run(variant: str, ratio: float, with_tasks: bool) -> None:
        key = f"{variant}@{ratio:g}"
        entry = results.get(key, {})
        if (entry.get("tasks") or {}).get("limit") != args.limit:
            entry.pop("tasks", None)  # scored on another number of items: not comparable
        if "ppl" in entry and (not with_tasks or "tasks" in entry):
            return
        plan = plan_for(variant, ratio)
        if variant == "b2b_spd":  # B2B on the partially-SPD model's inputs: per plan
            weights = distill_spd_inputs(plan, key)
        else:
            for strategy in set(plan.strategies) & {"b2b", "hg"}:
                recover(strategy)
                missing = [i for i, st in enumerate(plan.strategies)
                           if st == strategy and i not in coverage[strategy]]
                if missing:
                    log(f"{key}: skipped, blocks {missing} not recovered with {strategy} yet")
                    return
            weights = autoplan.compose(full, recovered, plan)
        model = build_model(cfg, plan)
        load_full_state_dict(model, weights)
        model.eval()
        t0 = time.time()
        with torch.no_grad():
            if "ppl" not in entry:
                entry["ppl"] = perplexity(model, tok, eval_texts, ctx=args.ppl_ctx,
                                          n_tokens=args.ppl_tokens, desc=f"ppl {key}")["ppl"]
            if with_tasks and "tasks" not in entry:
                entry["tasks"] = evaluate_tasks(model, tok, tasks, args.limit)
        entry.update(strategies=plan.strategies, n_spd=len(plan.spd_blocks))
        results[key] = entry
        atomic_write_json(res_path, results)
        avg = entry.get("tasks", {}).get("average") or {}
        log(f"{key}: ppl {entry['ppl']:.2f} avg {avg.get('value')} ({time.time() - t0:.0f}s)")
        report(results)
        del model

    def report(results: dict) -> None:
        write_report(results, sens, sweeps["local"].to_dict(), records, args, docs, tasks,
                     ratios, variants)

    for extra in args.merge:  # results of parallel runs (other --work dirs) of this script
        for key, entry in json.loads(Path(extra).read_text()).items():
            results.setdefault(key, {}).update(entry)
    if args.merge or args.report_only:
        args.skip_missing = True
        atomic_write_json(res_path, results)
        for strategy in ("b2b", "hg"):
            if list(work.glob(f"{strategy}_blocks*.pt")):
                recover(strategy)
        report(results)
    if args.report_only:
        return
    priority = [float(r) for r in args.priority.split(",")]
    order = sorted(ratios, key=lambda r: priority.index(r) if r in priority else len(priority))
    for ratio in order:                       # perplexity of everything first (cheap)
        for v in variants:
            if not (ratio == 0 and v != "zs"):
                run(v, ratio, with_tasks=False)
    for ratio in args.inputs_compare:         # which B2B inputs: dense (above) or partially SPD
        run("b2b_spd", ratio, with_tasks=False)
    for ratio in order:                       # then the zero-shot tasks, most important first
        for v in variants:
            if v != "auto" and not (ratio == 0 and v != "zs"):
                run(v, ratio, with_tasks=True)
    log("done")


def _avg(entry: dict):
    avg = (entry.get("tasks") or {}).get("average")
    return None if not avg else avg["value"]


def _stderr(entry: dict):
    """Standard error of the 6-task average (evaluate.paper_average_se)."""
    t = (entry.get("tasks") or {}).get("tasks")
    return paper_average_se(t) if t and _avg(entry) is not None else None


def _change(dense: dict, entry: dict) -> str:
    """Points gained vs the dense model on the same items, with the paired standard error."""
    a, b = (dense.get("tasks") or {}).get("tasks"), (entry.get("tasks") or {}).get("tasks")
    if not a or not b:
        return ""
    if any("correct" not in r for r in (*a.values(), *b.values())):  # results of older runs
        return f"{100 * (_avg(entry) - _avg(dense)):+.2f}"
    d = paired_difference(a, b)
    return f"{100 * d['delta']:+.2f} +/- {100 * d['se']:.2f}"


def write_report(results, sens, sens_local, records, args, docs: Path, tasks, ratios,
                 variants) -> None:
    dense = results.get("zs@0", {})
    rows = ["| variant | SPD ratio | SPD blocks | Wikipedia ppl | 6-task avg (%) | +/- s.e. | "
            "change vs dense (points, +/- paired s.e.) |", "|---|---|---|---|---|---|---|"]
    for v in [*variants, "b2b_spd"]:
        for r in ratios:
            e = results.get(f"{v}@{r:g}") if not (r == 0 and v != "zs") else None
            if not e:
                continue
            a, se, change = _avg(e), _stderr(e), _change(dense, e)
            rows.append(f"| {VARIANTS[v]} | {r:.0%} | {e.get('n_spd')} | {e['ppl']:.2f} | "
                        f"{'' if a is None else f'{100 * a:.2f}'} | "
                        f"{'' if se is None else f'{100 * se:.2f}'} | "
                        f"{change} |")
    cmd = "research/recipe_sweep.py " + " ".join(args.argv)
    text = "\n".join([
        f"Generated by `.venv/bin/python {cmd.strip()}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
        f"Calibration: {args.calib_samples}x{args.calib_len} tokens (sweep: first "
        f"{sens.n_samples}); perplexity: first {args.ppl_tokens} tokens of the held-out split, "
        f"ctx {args.ppl_ctx}; tasks: {', '.join(tasks)}, first {args.limit} items each "
        f"(same items for every "
        f"model); B2B: {args.b2b_epochs} epochs, lr {args.b2b_lr}, dense inputs.", "", *rows, ""])
    atomic_write_text(docs / "recipe_results.md", text)
    atomic_write_json(docs / "recipe_results.json", {"results": results, "records": records,
                                                     "sensitivity": sens.to_dict(),
                                                     "sensitivity_local": sens_local,
                                                     "args": {k: str(repo_path(v)) if k in (
                                                         "work", "docs") else v
                                                              for k, v in vars(args).items()}})
    plot(results, ratios, variants, docs / "recipe_accuracy.png")


def plot(results, ratios, variants, path: Path) -> None:
    import matplotlib  # lazy: a heavy import only the plot needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for v in variants:
        pts = [(r, results.get(f"{'zs' if r == 0 else v}@{r:g}")) for r in ratios]
        pp = [(100 * r, e["ppl"]) for r, e in pts if e and "ppl" in e]
        if pp:
            ax2.plot(*zip(*pp), marker="o", label=VARIANTS[v])
        aa = [(100 * r, 100 * _avg(e)) for r, e in pts if e and _avg(e) is not None]
        if aa and v != "auto":
            ax1.plot(*zip(*aa), marker="o", label=VARIANTS[v])
    ax1.set(xlabel="SPD ratio (%)", ylabel="6-task average accuracy (%)",
            title="zero-shot accuracy")
    ax2.set(xlabel="SPD ratio (%)", ylabel="Wikipedia perplexity (ctx 512)", yscale="log",
            title="perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, SPD with G=3 groups")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
