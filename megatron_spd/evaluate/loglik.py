"""Continuation log-likelihoods: the one primitive zero-shot scoring is built on.

A request is (context ids, continuation ids). Two paths, chosen per request:

- **shared context** (the choices of a multiple-choice item): requests with the same context that
  need no truncation run the context once into a KV cache (``inference.prefill``), then each
  continuation from that cache position (``inference.extend`` after ``rewind``). The context is
  the long part of HellaSwag, ARC and SciQ items, so this does 2-4x less work than one row per
  choice; numbers equal the full recompute up to float rounding (cached attention).
- **batched** (everything else): rows sorted longest first (so a batch wastes little padding),
  packed into batches of at most ``batch_tokens`` padded tokens, padded on the right (under a
  causal mask padding never affects real positions) and run through ``forward_logits``.

Only the continuation positions are scored. Every TP rank runs the same steps and gets the same
numbers; only rank 0 shows progress.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from ..core.sharding import forward_logits
from ..inference import extend, new_cache, prefill, rewind
from ..parallel import distributed

Request = tuple[Sequence[int], Sequence[int]]

DEFAULT_BATCH_TOKENS = 2048


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model.eval()`` and no autograd for the duration; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _score(logits: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """(sum of log P(cont), greedy match) from the logits [len(cont), V] that predict ``cont``."""
    target = torch.tensor(list(cont), device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def _check(requests: Sequence[Request], max_length: int) -> None:
    for ctx, cont in requests:
        if len(cont) == 0:
            raise ValueError("a continuation encodes to no tokens; it cannot be scored")
        if len(ctx) == 0:
            raise ValueError("a context encodes to no tokens; give it a prefix token")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's "
                             f"maximum length {max_length}")


def _shared_context_groups(requests: Sequence[Request], max_length: int) -> list[list[int]]:
    """Indices of requests grouped by identical context, for groups of two or more whose every
    input fits ``max_length`` untruncated (truncation would shift the context per choice)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    return [g for g in groups.values() if len(g) > 1
            and all(len(requests[i][0]) + len(requests[i][1]) - 1 <= max_length for i in g)]


def _score_shared_context(model, requests: Sequence[Request], group: Sequence[int], cache,
                          results: list) -> None:
    ctx = torch.tensor([list(requests[group[0]][0])])
    cache.reset()
    first = prefill(model, cache, ctx)  # [1, V]: predicts every continuation's first token
    n = ctx.shape[1]
    for i in group:
        cont = requests[i][1]
        logits = first
        if len(cont) > 1:
            rewind(cache, n)
            rest = extend(model, cache, torch.tensor([list(cont[:-1])]))[0]  # [k-1, V]
            logits = torch.cat([first, rest])
        results[i] = _score(logits, cont)


def _score_batched(model, requests: Sequence[Request], indices: Sequence[int], *,
                   max_length: int, batch_tokens: int, results: list, bar) -> None:
    """Identical inputs (e.g. one-token choices after a shared context) share one row, as in the
    lm-evaluation-harness. The input is ``(context + continuation)[-(max_length+1):][:-1]`` (the
    harness' left truncation)."""
    shared: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        ctx, cont = requests[i]
        full = list(ctx) + list(cont)
        shared.setdefault(tuple(full[-(max_length + 1):][:-1]), []).append(i)
    order = sorted(shared, key=lambda k: (-len(k), k))
    start = 0
    while start < len(order):
        width = len(order[start])
        batch = order[start:start + max(1, batch_tokens // width)]
        start += len(batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for r, key in enumerate(batch):
            tokens[r, :len(key)] = torch.tensor(key)
        logits = forward_logits(model, tokens)
        for r, key in enumerate(batch):
            for i in shared[key]:
                n, length = len(requests[i][1]), len(key)
                results[i] = _score(logits[r, length - n:length], requests[i][1])
            bar.update(len(shared[key]))


def loglikelihoods(model, requests: Sequence[Request], *, max_length: int,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, desc: Optional[str] = None,
                   share_context: bool = True) -> list[tuple[float, bool]]:
    """For each request: (sum of log P(continuation | context), whether greedy decoding would
    produce the continuation). ``share_context=False`` forces the batched path for every request
    (the reference the shared-context path is tested against); models built with sequence
    parallel always take it (the KV cache cannot be split over the sequence)."""
    _check(requests, max_length)
    results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    groups = (_shared_context_groups(requests, max_length)
              if share_context and not model.config.sequence_parallel else [])
    in_groups = {i for g in groups for i in g}
    bar = distributed.progress(total=len(requests), desc=desc, enabled=desc is not None,
                               leave=False)
    with eval_mode(model), bar:
        if groups:
            longest = max(len(requests[i][0]) + len(requests[i][1]) for i in in_groups)
            cache = new_cache(1, longest)
            for group in groups:
                _score_shared_context(model, requests, group, cache, results)
                bar.update(len(group))
        _score_batched(model, requests, [i for i in range(len(requests)) if i not in in_groups],
                       max_length=max_length, batch_tokens=batch_tokens, results=results, bar=bar)
    return results  # type: ignore[return-value]
