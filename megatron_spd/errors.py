"""The package's error base class, and the checks every tool makes on lengths and on results.

Every error whose message already says what went wrong and what to do derives from ``SPDError``:
``CheckpointError``, ``PlanError``, ``ConversionError``, ``TokenizerError``, ``GenerationError``,
``BaselineError``, ``ResumeError`` and the generic ones below. Each keeps its built-in base
(ValueError, RuntimeError, ...) as well, so code that catches those still does. The command-line
tools print an ``SPDError`` as one line and exit 1 (``cli.entry``); any other exception is a bug
and keeps its traceback.

- ``check_context``: a sequence length against the model's context, before any work (a forward
  pass far beyond the context runs for minutes on a CPU before anything fails).
- ``check_finite``: NaN or inf in a report is an error naming the metric, never a result
  (damaged weights or a diverged recipe print ``perplexity nan`` otherwise, and JSON cannot
  hold it).
"""
from __future__ import annotations

import math
from typing import Any


class SPDError(Exception):
    """An error whose message names the problem and the fix; tools print it as one line."""


class InputError(SPDError, ValueError):
    """An input file or value that cannot be used as given (text, sensitivity JSON, ...)."""


class OutputError(SPDError, ValueError):
    """An output path that may not be (over)written; nothing was written or removed."""


class ContextError(SPDError, ValueError):
    """A length beyond what the model can attend to."""


class MetricError(SPDError, FloatingPointError):
    """A reported number is NaN or infinite."""


def check_context(length: int, context: int, flag: str, what: str = "tokens") -> None:
    """Raise ContextError unless ``length`` (given by option ``flag``) fits the model's context."""
    if length > context:
        raise ContextError(f"{flag} {length} is longer than the model's context of {context} "
                           f"{what}; pass {flag} {context} or less")


def non_finite(report: Any, path: str = "") -> list[tuple[str, float]]:
    """(key path, value) of every NaN/inf float in a nested dict/list report."""
    if isinstance(report, dict):
        return [hit for k, v in report.items()
                for hit in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(report, (list, tuple)):
        return [hit for i, v in enumerate(report) for hit in non_finite(v, f"{path}[{i}]")]
    if isinstance(report, float) and not math.isfinite(report):
        return [(path or "value", report)]
    return []


def check_finite(report: Any, what: str = "the result") -> None:
    """Raise MetricError naming the first NaN/inf metric of ``report`` (a number or a nested
    dict/list of them)."""
    bad = non_finite(report)
    if bad:
        key, value = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise MetricError(f"{what}: {key} is {value}{more}, not a number; the model produced "
                          "non-finite values (damaged weights, or a run that diverged), so this "
                          "is not reported as a result")
