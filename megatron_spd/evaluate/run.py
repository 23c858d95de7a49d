"""What ``tools/evaluate.py`` runs: one evaluation of a model as a JSON-able report, its text
summary (which the command prints), and the tool body (open a source, evaluate, pair with a
baseline, save).

``run_evaluation`` is kept separate from the tool body so recipes (accuracy vs SPD ratio tables)
produce the same report for each model they build in memory.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..data import texts as data
from ..errors import InputError, check_context, check_finite
from ..loading.run_config import RunConfig
from ..options import option
from ..parallel import distributed
from . import closeness
from .baseline import compare, open_baseline
from .loglik import DEFAULT_BATCH_TOKENS
from .perplexity import perplexity
from .tasks import TASKS, parse_task_list
from .zeroshot import evaluate_tasks


@dataclass
class EvalConfig:
    """What one evaluation scores: zero-shot tasks on their first ``limit`` items, then
    perplexity on the first ``ppl_tokens`` tokens of a text."""

    tasks: str = option("all", f"comma-separated task names ({', '.join(TASKS)}), 'all' or "
                               "'none'")
    limit: Optional[int] = option(None, "score the first N items of each task (default: all)",
                                  type=int)
    ppl_source: Optional[str] = option(None, ".txt/.jsonl/.parquet for perplexity (default: the "
                                             "bundled Wikipedia paragraphs)", type=str,
                                       flag="--ppl-text", metavar="FILE")
    ppl_split: str = option("all", "document split of the perplexity text (data.SPLITS)",
                            choices=tuple(data.SPLITS))
    text_field: str = option("text", "document field of a .jsonl/.parquet file")
    ppl_ctx: int = option(512, "perplexity window (tokens)")
    ppl_stride: Optional[int] = option(None, "window stride (default: --ppl-ctx, "
                                             "non-overlapping)", type=int)
    ppl_tokens: int = option(50_000, "score the first N tokens (0: skip perplexity)")
    batch_tokens: int = option(DEFAULT_BATCH_TOKENS, "padded tokens per forward (memory vs "
                                                     "speed; results do not depend on it)")
    reference_topk: int = option(0, "also store this model's top-K next-token log-probs on the "
                                    "perplexity text beside --json (X.reference.safetensors): "
                                    "the dense reference --baseline X.json measures KL, top-1 "
                                    "and the perplexity ratio against (0: none)")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.ppl_tokens < 0:
            raise ValueError(f"--ppl-tokens must be >= 0, got {self.ppl_tokens}")
        if self.ppl_ctx < 2:
            raise ValueError(f"--ppl-ctx must be >= 2, got {self.ppl_ctx}")
        if self.ppl_stride is not None and not 1 <= self.ppl_stride <= self.ppl_ctx:
            raise ValueError(f"--ppl-stride must be in [1, --ppl-ctx {self.ppl_ctx}], got "
                             f"{self.ppl_stride}")
        if self.batch_tokens < 1:
            raise ValueError(f"--batch-tokens must be >= 1, got {self.batch_tokens}")
        if self.reference_topk < 0 or (self.reference_topk and not self.ppl_tokens):
            raise ValueError(f"--reference-topk must be >= 0 and needs perplexity text "
                             f"(--ppl-tokens > 0), got {self.reference_topk}")
        self.task_names()  # an unknown task is an error now, not after loading the model

    def task_names(self) -> list[str]:
        return [] if self.tasks.strip() == "none" else parse_task_list(self.tasks)


def run_evaluation(model, tokenizer, cfg: EvalConfig = EvalConfig(), *,
                   on_progress: Optional[Callable[[dict[str, Any]], None]] = None,
                   on_window: Optional[Callable[[Any, Any], None]] = None) -> dict[str, Any]:
    """Zero-shot tasks, then perplexity (``cfg``). Keys: tasks, average, limit, ppl, bpb,
    perplexity, seconds, tp, complete. ``on_progress(report)`` is called after each task and
    once more with the 6-task average (complete=False), so a long run that is cut short still
    leaves its finished tasks behind. ``on_window``: ``perplexity``'s hook (closeness.py)."""
    tasks = cfg.task_names()
    texts = None
    if cfg.ppl_tokens != 0:  # both checked before any work: a window beyond the context runs
        check_context(cfg.ppl_ctx, int(model.max_sequence_length), "--ppl-ctx")  # for minutes
        texts = data.load_texts(cfg.ppl_source, split=cfg.ppl_split, text_field=cfg.text_field)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"tasks": {}, "average": None, "limit": cfg.limit, "ppl": None,
                              "bpb": None, "perplexity": None, "seconds": 0.0,
                              "tp": distributed.tp_size(), "complete": False}

    def task_done(results: dict[str, Any]) -> None:
        report.update(tasks=dict(results), seconds=round(time.perf_counter() - t0, 1))
        if on_progress is not None:
            on_progress(report)

    if tasks:
        report.update(evaluate_tasks(model, tokenizer, tasks, cfg.limit,
                                     batch_tokens=cfg.batch_tokens, on_task=task_done))
        if on_progress is not None:  # the average, saved before the perplexity pass
            on_progress(report)
    if texts is not None:
        p = perplexity(model, tokenizer, texts, ctx=cfg.ppl_ctx, n_tokens=cfg.ppl_tokens,
                       stride=cfg.ppl_stride, batch_tokens=cfg.batch_tokens,
                       on_window=on_window)
        p.update(source=str(cfg.ppl_source) if cfg.ppl_source
                 else "default (BoolQ Wikipedia passages)", split=cfg.ppl_split)
        report.update(ppl=p["ppl"], bpb=p["bpb"], perplexity=p)
    check_finite(report, "the evaluation")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["complete"] = True
    return report


def summary(report: dict[str, Any]) -> str:
    """Human-readable table of a ``run_evaluation`` report (and its ``vs_baseline`` line)."""
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
    c = report.get("closeness")
    if c:
        lines.append(f"vs the dense reference of {c['baseline']}: {closeness.line(c)}")
    d = report.get("vs_baseline")
    if d:
        lines.append(f"6-task average vs {d['baseline']}: {100 * d['delta']:+.2f} points "
                     f"(paired s.e. {100 * d['se']:.2f})")
    return "\n".join(lines)


def evaluate_source(run: RunConfig = RunConfig(), cfg: EvalConfig = EvalConfig(), *,
                    baseline: str | Path | None = None) -> dict[str, Any]:
    """Open ``run.source`` (None = SmolLM2-135M) at TP ``run.tp`` with ``run.plan`` (default: its
    own), evaluate it, pair it with ``baseline`` (a report of another model) if given: tasks
    item by item, and closeness (KL, top-1, perplexity ratio) to the baseline's dense reference
    if it has one; save the report to ``run.json_out`` on rank 0 after every task (and, with
    ``cfg.reference_topk``, this model's own reference beside it). Returns the report (the
    command prints its ``summary``)."""
    if cfg.reference_topk and not run.json_out:
        raise InputError("--reference-topk stores the reference beside --json; give --json")
    cmp, own = None, None
    if baseline:
        _, ref = open_baseline(baseline, cfg)  # fail now, not after the evaluation
        cmp = closeness.Comparison(ref) if ref is not None else None
    if cfg.reference_topk:
        own = closeness.Reference({**closeness.text_meta(cfg), "topk": cfg.reference_topk})
    hooks = [h for h in (cmp, own.record if own else None) if h is not None]

    def on_window(targets, logits) -> None:  # one forward pass serves both
        for h in hooks:
            h(targets, logits)

    with run.running():
        lm = run.open_model()
        header = {"ckpt": str(run.source) if run.source else "default (SmolLM2-135M-Instruct)",
                  "plan": lm.plan.to_dict(), "spd_ratio": lm.plan.spd_ratio,
                  "config": asdict(cfg)}

        def save(report: dict[str, Any]) -> None:
            run.write_report({**report, **header})

        report = run_evaluation(lm.model, lm.tokenizer, cfg, on_progress=save,
                                on_window=on_window if hooks else None)
        report.update(header)
        if baseline and report["tasks"]:
            report["vs_baseline"] = compare(baseline, report)
        if cmp is not None:
            report["closeness"] = {"baseline": str(baseline), **cmp.result()}
        if own is not None and distributed.is_rank0():
            own.meta["model"] = header["ckpt"]
            own.save(closeness.reference_path(run.json_out))
        save(report)
        return report
