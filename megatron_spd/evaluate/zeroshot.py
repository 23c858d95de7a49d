"""Zero-shot multiple-choice scoring with the lm-evaluation-harness conventions.

Per choice: log P(continuation | context), summed over the continuation's tokens. ``acc`` picks the
choice with the highest sum, ``acc_norm`` the highest sum divided by the choice's length in
characters; LAMBADA's ``acc`` is whether greedy decoding reproduces the last word. Tokenization
follows the harness' ``_encode_pair``: trailing spaces of the context move to the continuation,
the continuation's ids are those of ``encode(context + continuation)`` after the context's ids,
no BOS is added (the harness' default for causal models), and an empty context becomes one prefix
token (``empty_context_id``; the harness uses the end-of-text token, id 0 in SmolLM2/GPT-2-style
vocabularies).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from .loglik import DEFAULT_BATCH_TOKENS, loglikelihoods
from .tasks import Item, get_task, paper_average


def encode_pair(tokenizer, context: str, continuation: str,
                empty_context_id: int = 0) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the harness' way (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context == "":
        return [empty_context_id], tokenizer.encode(continuation, add_bos=False)
    whole = tokenizer.encode(context + continuation, add_bos=False)
    ctx = tokenizer.encode(context, add_bos=False)
    return ctx, whole[len(ctx):]


def model_max_length(model) -> int:
    """The longest input the model was built for (GPTModel's ``max_sequence_length``)."""
    n = getattr(model, "max_sequence_length", None)
    if n is None:
        raise ValueError("the model has no max_sequence_length; pass max_length explicitly")
    return int(n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])


def score_items(model, tokenizer, items: Sequence[Item], *, max_length: Optional[int] = None,
                batch_tokens: int = DEFAULT_BATCH_TOKENS, empty_context_id: int = 0,
                desc: Optional[str] = None) -> list[list[tuple[float, bool]]]:
    """Per item, per choice: (log-likelihood, greedy match)."""
    requests, owner = [], []
    for i, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append(encode_pair(tokenizer, ctx, cont, empty_context_id))
            owner.append(i)
    flat = loglikelihoods(model, requests, max_length=max_length or model_max_length(model),
                          batch_tokens=batch_tokens, desc=desc)
    out: list[list[tuple[float, bool]]] = [[] for _ in items]
    for i, r in zip(owner, flat):
        out[i].append(r)
    return out


def task_metrics(task_name: str, items: Sequence[Item],
                 scores: Sequence[Sequence[tuple[float, bool]]]) -> dict[str, Any]:
    """acc (and acc_norm where the task defines it) from per-choice scores, and ``correct``:
    per item 0/1 under the primary metric, so two models scored on the same items can be
    compared pairwise (``paired_difference``)."""
    task = get_task(task_name)
    n = len(items)
    if n == 0:
        raise ValueError(f"task {task_name}: no items to score")
    if task.greedy:
        correct = [int(s[0][1]) for s in scores]
        return {"acc": sum(correct) / n, "n": n, "correct": correct}
    hits, norm_hits = [], []
    for item, s in zip(items, scores):
        lls = [ll for ll, _ in s]
        hits.append(int(_argmax(lls) == item.gold))
        norm_hits.append(int(_argmax([ll / c for ll, c in zip(lls, item.choice_chars)])
                             == item.gold))
    out: dict[str, Any] = {"acc": sum(hits) / n}
    if task.has_norm:
        out["acc_norm"] = sum(norm_hits) / n
    out["n"] = n
    out["correct"] = norm_hits if task.has_norm else hits  # per item, primary metric (pairing)
    return out


def evaluate_task(model, tokenizer, name: str, limit: Optional[int] = None, *,
                  max_length: Optional[int] = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  empty_context_id: int = 0, return_scores: bool = False) -> dict[str, Any]:
    """One task on its first ``limit`` items (None = all): metrics, item count, seconds; with
    ``return_scores`` also the per-item, per-choice log-likelihoods under ``"scores"``."""
    t0 = time.perf_counter()
    items = get_task(name).load(limit)
    scores = score_items(model, tokenizer, items, max_length=max_length,
                         batch_tokens=batch_tokens, empty_context_id=empty_context_id, desc=name)
    out = task_metrics(name, items, scores)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if return_scores:
        out["scores"] = [[ll for ll, _ in s] for s in scores]
    return out


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], limit: Optional[int] = None, *,
                   max_length: Optional[int] = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   empty_context_id: int = 0,
                   on_task: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Several tasks: ``{"tasks": {name: metrics}, "average": paper_average or None, "limit"}``.
    ``on_task(results_so_far)`` runs after each task (e.g. to save partial results)."""
    for name in tasks:  # fail on a bad name before spending minutes on the good ones
        get_task(name)
    results: dict[str, Any] = {}
    for name in tasks:
        results[name] = evaluate_task(model, tokenizer, name, limit, max_length=max_length,
                                      batch_tokens=batch_tokens, empty_context_id=empty_context_id)
        if on_task is not None:
            on_task(results)
    return {"tasks": results, "average": paper_average(results), "limit": limit}
