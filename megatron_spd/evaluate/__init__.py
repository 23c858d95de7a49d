"""Evaluation: perplexity over text and zero-shot multiple-choice tasks (lm-eval conventions).

Public entry points (everything runs identically on every TP rank; only rank 0 shows progress):
``perplexity(model, tokenizer, texts_or_tokens, ctx=, n_tokens=)``,
``evaluate_tasks(model, tokenizer, tasks, limit)``, ``evaluate_task``, ``loglikelihoods``,
``TASKS`` / ``PAPER_TASKS`` / ``paper_average`` (and its standard error ``paper_average_se``) /
``paired_difference``. ``baseline`` pairs a report with another model's; ``closeness``
measures KL / top-1 / perplexity ratio against a stored dense ``Reference`` (hooked into
``perplexity``'s forward pass by ``Comparison``; ``paired_change`` pairs two such
comparisons token by token); ``run`` is one
evaluation as a report, and what tools/evaluate.py runs.
"""
from .closeness import Comparison, Reference, paired_change
from .loglik import loglikelihoods
from .perplexity import perplexity
from .tasks import (
                    DEFAULT_TASKS,
                    PAPER_TASKS,
                    TASKS,
                    TaskError,
                    get_task,
                    paired_difference,
                    paper_average,
                    paper_average_se,
                    parse_task_list,
)
from .zeroshot import encode_pair, evaluate_task, evaluate_tasks

__all__ = ["Comparison", "Reference", "paired_change", "loglikelihoods", "perplexity", "DEFAULT_TASKS", "PAPER_TASKS", "TASKS", "TaskError",
           "get_task", "paired_difference", "paper_average", "paper_average_se",
           "parse_task_list", "encode_pair", "evaluate_task", "evaluate_tasks"]
