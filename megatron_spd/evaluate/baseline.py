"""Pairing an evaluation report with a baseline report of another model on the same items.

``tools/evaluate.py --baseline OTHER.json`` reports the change of the 6-task average versus
another model with its paired standard error (``tasks.paired_difference``). The baseline must hold
per-item results and cover at least this run's items: tasks take their first ``--limit`` items,
so a baseline scored on more items pairs on their common prefix. ``load_baseline`` checks that
before the (long) evaluation starts; ``compare`` pairs the finished report.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ..errors import SPDError
from .tasks import paired_difference


class BaselineError(SPDError, ValueError):
    """A baseline report that cannot be paired with this run; the message says why and what to
    do."""


def covers(base_limit: Optional[int], limit: Optional[int]) -> bool:
    """Whether a baseline scored on the first ``base_limit`` items (None = all) covers ``limit``."""
    return (base_limit or math.inf) >= (limit or math.inf)


def load_baseline(path: str | Path, limit: Optional[int]) -> dict[str, Any]:
    """The baseline report at ``path``, checked to pair with a run on ``limit`` items per task."""
    try:
        base = json.loads(Path(path).read_text())
        paired = all("correct" in r for r in base["tasks"].values()) and base["tasks"]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise BaselineError(f"--baseline {path}: not a readable tools/evaluate.py report "
                            f"({e})") from None
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
