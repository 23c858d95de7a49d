#!/usr/bin/env python
"""lm-evaluation-harness (``megatron-spd`` backend) against tools/evaluate.py on SmolLM2-135M:
item-by-item agreement, rolling perplexity, and the speed of both routes.

    python research/lm_eval_agreement.py --items 50 --speed-items 30 \\
        --json docs/evaluation/lm_eval_agreement.json

For the dense model and a zero-shot SPD plan (G=3, blocks 15-29 SPD), at T=1: the seven
``spd_paper`` tasks on their first ``--items`` items through lm-eval and through
``evaluate_task``; per task the largest per-choice log-likelihood difference, the items whose
acc/acc_norm differ and the closest call. Rolling perplexity of the first
``--ppl-windows`` x 512 tokens of the bundled Wikipedia paragraphs: lm-eval's
``loglikelihood_rolling`` (max_length 512) against our ``perplexity`` over the same tokens with
the prefix token in front at ctx 513 / stride 512 (the same windows: must agree), and against our
default (ctx = stride = 512, no prefix: fewer tokens scored, a token less of context each; the
difference by construction). Speed: the first ``--speed-items`` items of each of the seven
tasks (30 x 7 = 210 by default) through both routes (dense model, the same process, alternately,
``--speed-repeats`` times each; the medians), in items/s: lm-eval's whole ``simple_evaluate``
(its task set-up, request building and metrics included) and the time spent inside the
backend's request methods alone. ``--speed-only`` remeasures the speed into an existing JSON.
Needs the extra: ``pip install -e '.[lm-eval]'``. Measured figures only; the JSON records the
machine's load average, which on a shared machine moves the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

PLAN_SPD_BLOCKS = range(15, 30)


def _rolling(model_lm, backend_cls, windows: int) -> dict:
    from lm_eval.api.instance import Instance

    from megatron_spd.data.texts import load_texts, token_stream
    from megatron_spd.evaluate import perplexity

    ctx = 512
    tok = model_lm.tokenizer
    tokens = token_stream(tok, load_texts(split="eval"), windows * ctx)
    text = tok.decode(tokens.tolist())
    if tok.encode(text, add_bos=False) != tokens.tolist():
        raise RuntimeError("the decoded Wikipedia text does not encode back to the same tokens")
    backend = backend_cls(loaded=model_lm, max_length=ctx)
    t0 = time.perf_counter()
    ll = backend.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    lm_s = time.perf_counter() - t0
    prefixed = perplexity(model_lm.model, None,
                          torch.cat([torch.tensor([backend.prefix_token_id]), tokens]),
                          ctx=ctx + 1, stride=ctx, desc=None)
    default = perplexity(model_lm.model, tok, tokens, ctx=ctx, desc=None)
    n = tokens.numel()
    return {"tokens": n, "max_length": ctx, "prefix_token_id": backend.prefix_token_id,
            "lm_eval": {"nll_sum": -ll, "tokens_scored": n, "ppl": float(torch.exp(
                torch.tensor(-ll / n, dtype=torch.float64))), "seconds": round(lm_s, 2)},
            "ours_prefixed_ctx513_stride512": {"nll_sum": prefixed["nll"] * prefixed["tokens"],
                                               "tokens_scored": prefixed["tokens"],
                                               "ppl": prefixed["ppl"]},
            "ours_default_ctx512": {"nll_sum": default["nll"] * default["tokens"],
                                    "tokens_scored": default["tokens"], "ppl": default["ppl"]},
            "abs_nll_sum_diff_lm_eval_vs_prefixed": abs(-ll - prefixed["nll"]
                                                        * prefixed["tokens"])}


def _timed_backend(backend_cls, lm, spent: list[float]):
    """A backend whose request methods add their wall time to ``spent`` (what lm-eval's own
    task set-up, request building and metrics leave out)."""
    backend = backend_cls(loaded=lm)
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(backend, name)

        def timed(*a, _method=method, **k):
            t0 = time.perf_counter()
            try:
                return _method(*a, **k)
            finally:
                spent.append(time.perf_counter() - t0)
        setattr(backend, name, timed)
    return backend


def _speed(lm, backend_cls, per_task: int, repeats: int) -> dict:
    from megatron_spd.evaluate import evaluate_tasks
    from megatron_spd.integrations.lm_eval_agreement import (PAPER_LM_EVAL_TASKS, lm_eval_items,
                                                             ours_name)

    items = per_task * len(PAPER_LM_EVAL_TASKS)
    times: dict[str, list[float]] = {"ours": [], "lm_eval": [], "lm_eval_backend_calls": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_tasks(lm.model, lm.tokenizer, [ours_name(t) for t in PAPER_LM_EVAL_TASKS],
                       per_task)
        times["ours"].append(time.perf_counter() - t0)
        spent: list[float] = []
        t0 = time.perf_counter()
        lm_eval_items(_timed_backend(backend_cls, lm, spent), ["spd_paper"], per_task)
        times["lm_eval"].append(time.perf_counter() - t0)
        times["lm_eval_backend_calls"].append(sum(spent))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"tasks": "spd_paper", "items_per_task": per_task, "items": items, "repeats": repeats,
            "seconds": times, "items_per_s": {k: items / v for k, v in median.items()},
            "ratio_lm_eval_over_ours": median["ours"] / median["lm_eval"],
            "ratio_backend_calls_over_ours": median["ours"] / median["lm_eval_backend_calls"],
            "loadavg_1min_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--speed-items", type=int, default=30,
                   help="items per task for the speed comparison (0: skip it)")
    p.add_argument("--speed-repeats", type=int, default=3,
                   help="each route this many times, alternately; the median is reported")
    p.add_argument("--speed-only", action="store_true",
                   help="only (re)measure the speed, into the existing --json")
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    from megatron_spd.core.plan import SPDPlan
    from megatron_spd.files import atomic_write_json
    from megatron_spd.integrations.lm_eval import SPDLM
    from megatron_spd.integrations.lm_eval_agreement import (PAPER_LM_EVAL_TASKS, compare,
                                                             lm_eval_items, our_items)
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.parallel import distributed

    if args.speed_only:
        report = json.loads(Path(args.json).read_text())
        with distributed.running(1):
            report["speed"] = _speed(open_model(None), SPDLM, args.speed_items,
                                     args.speed_repeats)
        print("speed", report["speed"], flush=True)
        atomic_write_json(args.json, report)
        return
    report = {"items_per_task": args.items, "models": {},
              "loadavg_1min_start": os.getloadavg()[0], "threads": torch.get_num_threads()}
    t_start = time.perf_counter()
    with distributed.running(1):
        for name in ("dense", "spd"):
            plan = None if name == "dense" else SPDPlan.from_spd_blocks(30, 3, PLAN_SPD_BLOCKS)
            lm = open_model(None, plan=plan)
            lm_rows = lm_eval_items(SPDLM(loaded=lm), ["spd_paper"], args.items)
            tasks = {t: compare(lm_rows[t], our_items(lm.model, lm.tokenizer, t, args.items))
                     for t in PAPER_LM_EVAL_TASKS}
            report["models"][name] = {"plan": lm.plan.to_dict(), "tasks": tasks,
                                      "rolling": _rolling(lm, SPDLM, args.ppl_windows)}
            print(name, {t: (c["max_abs_loglik_diff"], c["acc_mismatch"],
                             c["acc_norm_mismatch"]) for t, c in tasks.items()}, flush=True)
            if name == "dense" and args.speed_items:
                report["speed"] = _speed(lm, SPDLM, args.speed_items, args.speed_repeats)
                print("speed", report["speed"], flush=True)
            atomic_write_json(args.json, report)  # partial results survive a cut-short run
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
