"""One evaluation run as a JSON-able report (what tools/evaluate.py writes) and its text summary.

Kept in the package, not the tool, so recipes (accuracy vs SPD ratio tables) produce the same
report for each plan they try.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import data, distributed
from .loglik import DEFAULT_BATCH_TOKENS
from .perplexity import perplexity
from .tasks import get_task
from .zeroshot import evaluate_tasks


def run_evaluation(model, tokenizer, *, tasks: Sequence[str] = (), limit: Optional[int] = None,
                   ppl_source: Optional[str | Path] = None, ppl_split: str = "all",
                   ppl_text_field: str = "text", ppl_ctx: int = 512,
                   ppl_tokens: Optional[int] = 50_000, ppl_stride: Optional[int] = None,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   on_progress: Optional[Callable[[dict[str, Any]], None]] = None
                   ) -> dict[str, Any]:
    """Zero-shot ``tasks`` on their first ``limit`` items, then perplexity on the first
    ``ppl_tokens`` tokens of ``ppl_source`` (None = bundled Wikipedia paragraphs; ``ppl_tokens=0``
    skips it). Keys: tasks, average, limit, ppl, bpb, perplexity, seconds, tp, complete.
    ``on_progress(report)`` is called after each task and once more with the 6-task average
    (complete=False), so a long run that is cut short still leaves its finished tasks behind."""
    for name in tasks:
        get_task(name)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"tasks": {}, "average": None, "limit": limit, "ppl": None,
                              "bpb": None, "perplexity": None, "seconds": 0.0,
                              "tp": distributed.tp_size(), "complete": False}

    def task_done(results: dict[str, Any]) -> None:
        report.update(tasks=dict(results), seconds=round(time.perf_counter() - t0, 1))
        if on_progress is not None:
            on_progress(report)

    if tasks:
        report.update(evaluate_tasks(model, tokenizer, tasks, limit, batch_tokens=batch_tokens,
                                     on_task=task_done))
        if on_progress is not None:  # the average, saved before the perplexity pass
            on_progress(report)
    if ppl_tokens != 0:
        texts = data.load_texts(ppl_source, split=ppl_split, text_field=ppl_text_field)
        p = perplexity(model, tokenizer, texts, ctx=ppl_ctx, n_tokens=ppl_tokens,
                       stride=ppl_stride, batch_tokens=batch_tokens)
        p.update(source=str(ppl_source) if ppl_source else "default (BoolQ Wikipedia passages)",
                 split=ppl_split)
        report.update(ppl=p["ppl"], bpb=p["bpb"], perplexity=p)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["complete"] = True
    return report


def summary(report: dict[str, Any]) -> str:
    """Human-readable table of a ``run_evaluation`` report."""
    lines = [f"{'task':<15}{'n':>6}{'acc':>8}{'acc_norm':>10}{'sec':>8}"] if report["tasks"] else []
    for name, r in report["tasks"].items():
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"{name:<15}{r['n']:>6}{r['acc']:>8.4f}{norm:>10}{r['seconds']:>8.1f}")
    avg = report.get("average")
    if avg is not None:
        lines.append(f"6-task average ({avg['metric']}): {avg['value']:.4f}")
    elif report["tasks"]:
        lines.append("6-task average: n/a (needs arc_easy, arc_challenge, hellaswag, lambada, "
                     "piqa, sciq, winogrande)")
    p = report.get("perplexity")
    if p:
        lines.append(f"perplexity {p['ppl']:.3f}, bits/byte {p['bpb']:.4f} ({p['tokens']} tokens "
                     f"scored, ctx {p['ctx']}, stride {p['stride']}, {p['source']}, "
                     f"{p['seconds']:.0f} s)")
    lines.append(f"total {report['seconds']:.0f} s at TP={report['tp']}")
    return "\n".join(lines)
