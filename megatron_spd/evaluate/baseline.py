"""Pairing an evaluation report with a baseline report of another model on the same items.

``tools/evaluate.py --baseline OTHER.json`` reports the change of the 6-task average versus
another model with its paired standard error (``tasks.paired_difference``). The baseline must hold
per-item results and cover at least this run's items: tasks take their first ``--limit`` items,
so a baseline scored on more items pairs on their common prefix. ``load_baseline`` checks that
before the (long) evaluation starts; ``compare`` pairs the finished report. ``open_baseline``
also reads the baseline's dense reference (closeness.py: ``X.reference.safetensors`` beside
``X.json``) when there is one, checked to cover this run's perplexity text, for KL / top-1 /
perplexity ratio against it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ..errors import SPDError
from .closeness import Reference, reference_path, text_meta
from .tasks import paired_difference


class BaselineError(SPDError, ValueError):
    """A baseline report that cannot be paired with this run; the message says why and what to
    do."""


def covers(base_limit: Optional[int], limit: Optional[int]) -> bool:
    """Whether a baseline scored on the first ``base_limit`` items (None = all) covers ``limit``."""
    return (base_limit or math.inf) >= (limit or math.inf)


def load_baseline(path: str | Path, limit: Optional[int], *, tasks: bool = True
                  ) -> dict[str, Any]:
    """The baseline report at ``path``, checked to pair with a run on ``limit`` items per task
    (``tasks=False``: a run that scores no tasks; only readability is checked)."""
    try:
        base = json.loads(Path(path).read_text())
        paired = all("correct" in r for r in base["tasks"].values()) and base["tasks"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise BaselineError(f"--baseline {path}: not a readable tools/evaluate.py report "
                            f"({e})") from None
    if not tasks:
        return base
    if not paired:
        raise BaselineError(f"--baseline {path} has no per-item results (made by an older "
                            "version or with --tasks none); re-evaluate the baseline")
    if not covers(base.get("limit"), limit):
        raise BaselineError(f"--baseline {path} was scored with --limit {base.get('limit')}, "
                            f"this run asks for {limit}; the baseline needs at least as many "
                            "items")
    return base


def compare(baseline_path: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """``paired_difference`` of ``report``'s tasks versus the baseline's, on this run's items."""
    base = load_baseline(baseline_path, report["limit"])
    tasks = {t: {**r, "correct": r["correct"][:report["tasks"][t]["n"]]}
             for t, r in base["tasks"].items() if t in report["tasks"]}
    return {"baseline": str(baseline_path), **paired_difference(tasks, report["tasks"])}


def open_baseline(path: str | Path, cfg) -> tuple[dict[str, Any], Optional[Reference]]:
    """The baseline report for a run configured by ``cfg`` (an ``EvalConfig``) and its dense
    reference (None when the baseline has none or the run skips perplexity); an error when the
    two runs share nothing to compare or score different perplexity text."""
    scores_tasks = bool(cfg.task_names())
    base = load_baseline(path, cfg.limit, tasks=scores_tasks)
    ref_file = reference_path(path)
    if cfg.ppl_tokens == 0 or not ref_file.is_file():
        if not scores_tasks:
            raise BaselineError(f"--baseline {path}: this run scores no tasks and "
                                f"{ref_file} (the dense reference for KL/top-1) does not exist"
                                f"{' or perplexity is skipped' if cfg.ppl_tokens == 0 else ''}; "
                                "make the baseline with --reference-topk 64, or score tasks")
        return base, None
    ref = Reference.load(ref_file)
    try:
        ref.check_text(text_meta(cfg), "this run")
    except ValueError as e:
        raise BaselineError(f"--baseline {path}: {e}") from None
    return base, ref
