"""Batched continuation log-likelihoods: the one primitive zero-shot scoring is built on.

A request is (context ids, continuation ids). Requests whose model inputs are identical (the
choices of one item that are a single token after a shared context) share one row, as in the
lm-evaluation-harness. Rows are sorted longest first (so a batch wastes little padding), packed
into batches of at most ``batch_tokens`` padded tokens, padded on the right (under a causal mask
padding never affects real positions) and run through ``forward_logits``; only the continuation
positions are scored. Every TP rank runs the same batches and gets the same numbers; only rank 0
shows progress.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from .. import distributed
from ..model import forward_logits

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


def progress(total: int, desc: Optional[str]):
    """tqdm on rank 0 only (every TP rank runs the same loop); no bar when desc is None."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=desc is None or not distributed.is_rank0(),
                leave=False, dynamic_ncols=True)


def loglikelihoods(model, requests: Sequence[Request], *, max_length: int,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, desc: Optional[str] = None
                   ) -> list[tuple[float, bool]]:
    """For each request: (sum of log P(continuation | context), whether greedy decoding would
    produce the continuation). The input is ``(context + continuation)[-(max_length+1):][:-1]``
    (the harness' left truncation)."""
    inputs, n_cont = [], []
    for ctx, cont in requests:
        if len(cont) == 0:
            raise ValueError("a continuation encodes to no tokens; it cannot be scored")
        if len(ctx) == 0:
            raise ValueError("a context encodes to no tokens; give it a prefix token")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's "
                             f"maximum length {max_length}")
        full = list(ctx) + list(cont)
        inputs.append(full[-(max_length + 1):][:-1])
        n_cont.append(len(cont))
    shared: dict[tuple[int, ...], list[int]] = {}  # identical inputs run once (e.g. choices
    for i, inp in enumerate(inputs):               # of one token after a shared context)
        shared.setdefault(tuple(inp), []).append(i)
    order = sorted(shared, key=lambda k: (-len(k), k))
    results: list[Optional[tuple[float, bool]]] = [None] * len(inputs)
    with eval_mode(model), progress(len(inputs), desc) as bar:
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
                    n, length = n_cont[i], len(key)
                    target = torch.tensor(requests[i][1], device=logits.device)
                    logp = torch.log_softmax(logits[r, length - n:length].float(), dim=-1)
                    ll = logp.gather(-1, target[:, None]).sum().item()
                    results[i] = (ll, bool((logp.argmax(-1) == target).all()))
                bar.update(len(shared[key]))
    return results  # type: ignore[return-value]
