"""The two evaluation routes side by side, item by item: lm-eval with the ``megatron-spd``
backend on the ``spd_paper`` tasks, and the project's own ``evaluate_task`` on the same items.

Used by tests/test_lm_eval.py (a tiny model, a few items) and research/lm_eval_agreement.py
(SmolLM2, 50 items per task, and the speed of both routes). Per item both routes give the
choices' log-likelihoods and the item's acc (and acc_norm where the task has it): lm-eval from
its logged samples, ours from ``task_metrics`` applied to that one item.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from ..evaluate.tasks import get_task, paper_average
from ..evaluate.zeroshot import evaluate_task, task_metrics

#: lm-eval's names of the paper's tasks (lm-eval -> the project's name where they differ).
LM_EVAL_NAMES = {"lambada_openai": "lambada"}
PAPER_LM_EVAL_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "hellaswag", "piqa",
                                        "winogrande", "sciq", "lambada_openai")

ItemRow = tuple[list[float], dict[str, int]]  # (per-choice log-likelihoods, {acc, acc_norm})


def ours_name(lm_eval_task: str) -> str:
    return LM_EVAL_NAMES.get(lm_eval_task, lm_eval_task)


def lm_eval_items(backend, tasks: Sequence[str], limit: int,
                  tasks_out: Sequence[str] = PAPER_LM_EVAL_TASKS, **evaluate_kw: Any
                  ) -> Optional[dict[str, list[ItemRow]]]:
    """lm-eval's ``simple_evaluate`` of ``backend`` on ``tasks`` (task or group names; the
    offline ``spd_paper`` definitions are included) on their first ``limit`` documents: per task
    of ``tasks_out``, per item in document order. None on ranks that do not report (TP ranks
    other than local rank 0)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_tasks import TASKS_DIR

    res = lm_eval.simple_evaluate(model=backend, tasks=list(tasks), limit=limit,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                  log_samples=True, bootstrap_iters=0, **evaluate_kw)
    if res is None:
        return None
    return {t: [([r[0][0] for r in s["resps"]],
                 {m: int(s[m]) for m in ("acc", "acc_norm") if m in s})
                for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
            for t in tasks_out}


def our_items(model, tokenizer, task: str, limit: int, **kw: Any) -> list[ItemRow]:
    """``evaluate_task`` on the same items (``task`` in lm-eval's name), as ``lm_eval_items``
    rows: LAMBADA's acc is the greedy match, as in lm-eval's ``lambada_openai``."""
    name = ours_name(task)
    res = evaluate_task(model, tokenizer, name, limit, return_scores=True, **kw)
    scores = res["scores"]
    if get_task(name).greedy:  # the greedy match is not a function of the scores
        return [(lls, {"acc": c}) for lls, c in zip(scores, res["correct"])]
    rows = []
    for item, lls in zip(get_task(name).load(limit), scores):
        m = task_metrics(name, [item], [[(ll, False) for ll in lls]])
        rows.append((lls, {k: int(m[k]) for k in ("acc", "acc_norm") if k in m}))
    return rows


def compare(lm_rows: Sequence[ItemRow], our_rows: Sequence[ItemRow]) -> dict[str, Any]:
    """Item counts, the largest per-choice log-likelihood difference, items whose acc/acc_norm
    differ, and the closest call (smallest gap between the best and second-best choice, in
    nats, over items with two or more choices: how close a 1e-4 difference came to mattering)."""
    if len(lm_rows) != len(our_rows):
        raise ValueError(f"{len(lm_rows)} lm-eval items vs {len(our_rows)} of ours")
    diff, mismatch, closest = 0.0, {"acc": [], "acc_norm": []}, None
    for i, ((a, ma), (b, mb)) in enumerate(zip(lm_rows, our_rows)):
        if len(a) != len(b):
            raise ValueError(f"item {i}: {len(a)} choices in lm-eval vs {len(b)} in ours")
        diff = max([diff] + [abs(x - y) for x, y in zip(a, b)])
        for m in mismatch:
            if ma.get(m) != mb.get(m):
                mismatch[m].append(i)
        if len(b) > 1:
            top = sorted(b, reverse=True)
            closest = top[0] - top[1] if closest is None else min(closest, top[0] - top[1])
    return {"items": len(our_rows), "max_abs_loglik_diff": diff,
            "acc_mismatch": mismatch["acc"], "acc_norm_mismatch": mismatch["acc_norm"],
            "closest_call_nats": closest}


def paper_average_of(lm_eval_results: dict[str, dict]) -> Optional[dict]:
    """The paper's 6-task average (``tasks.paper_average``) from lm-eval's ``results`` section
    (``{"arc_easy": {"acc,none": ..., "acc_norm,none": ...}, ...}``); None unless all seven
    tasks are there."""
    per_task = {ours_name(t): {m.split(",")[0]: v for m, v in r.items()
                               if m.split(",")[0] in ("acc", "acc_norm")}
                for t, r in lm_eval_results.items()}
    return paper_average(per_task)


def logged_items(output_dir: str | Path) -> dict[str, list[ItemRow]]:
    """``lm_eval_items``' rows from what ``lm_eval --output_path DIR --log_samples`` wrote
    (``DIR/<model>/samples_<task>_<time>.jsonl``; the newest file of each task), to compare two
    command-line runs, e.g. TP=3 under torchrun against TP=1."""
    newest: dict[str, Path] = {}
    for f in sorted(Path(output_dir).glob("*/samples_*.jsonl")):
        newest[f.name[len("samples_"):].rsplit("_", 1)[0]] = f  # names sort by their time
    out = {}
    for task, f in newest.items():
        samples = sorted((json.loads(line) for line in f.read_text().splitlines() if line),
                         key=lambda s: s["doc_id"])
        out[task] = [([float(r[0][0]) for r in s["resps"]],
                      {m: int(s[m]) for m in ("acc", "acc_norm") if m in s}) for s in samples]
    return out
