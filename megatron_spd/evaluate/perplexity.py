"""Perplexity and bits per byte of a token stream, in (optionally overlapping) windows.

Windows of ``ctx`` tokens start every ``stride`` tokens (default ``stride = ctx``: non-overlapping,
the reference convention: SmolLM2-135M scores 20.94 on the first 50k tokens of the bundled
Wikipedia paragraphs at ctx 512). Each window scores only the tokens no earlier window scored, so
every token after the first is predicted exactly once, from up to ``ctx - 1`` tokens of context
(with ``stride < ctx`` a token sees at least ``ctx - stride`` tokens of context, the Hugging Face
"sliding window" recipe). The first token of the stream is never scored, and with ``stride = ctx``
neither is the first token of any window. Bits per byte divide the summed NLL (in bits) by the
UTF-8 length of the scored text, decoded per window, which makes models with different
tokenizers comparable.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.sharding import forward_logits
from ..data.texts import token_stream
from ..parallel import distributed
from .loglik import DEFAULT_BATCH_TOKENS, eval_mode


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over ``n`` tokens."""
    if ctx < 2 or not 1 <= stride <= ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= stride <= ctx, got ctx={ctx} stride={stride}")
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + ctx, n)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
        scored_to = end
        if end == n:
            break
    return out


def perplexity(model, tokenizer, texts_or_tokens: Sequence[str] | torch.Tensor, *,
               ctx: int = 512, n_tokens: Optional[int] = None, stride: Optional[int] = None,
               batch_tokens: int = DEFAULT_BATCH_TOKENS, desc: Optional[str] = "perplexity",
               on_window: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
               ) -> dict[str, Any]:
    """``{"ppl", "bpb", "nll", "tokens" (scored), "bytes", "ctx", "stride", "seconds"}`` over the
    first ``n_tokens`` of the text (documents are joined by ``data.token_stream``) or of a 1-D
    token tensor. ``tokenizer`` may be None for a token tensor (then ``bpb`` is None).
    ``on_window(targets [n], fp32 logits [n, V])`` sees each window's scored positions in order
    (closeness.py measures closeness to a dense model in the same forward pass)."""
    t0 = time.perf_counter()
    if isinstance(texts_or_tokens, torch.Tensor):
        tokens = texts_or_tokens.reshape(-1).long()
        if n_tokens is not None:
            if tokens.numel() < n_tokens:
                raise ValueError(f"{n_tokens} tokens asked for but only {tokens.numel()} given")
            tokens = tokens[:n_tokens]
    else:
        if isinstance(texts_or_tokens, str):
            raise TypeError("pass a list of documents (or a token tensor), not one string")
        tokens = token_stream(tokenizer, texts_or_tokens, n_tokens)
    stride = stride or ctx
    spans = windows(tokens.numel(), ctx, stride)
    if not spans:
        raise ValueError(f"{tokens.numel()} tokens are too few to score")
    nll, n_scored, n_bytes = 0.0, 0, 0
    bar = distributed.progress(total=len(spans), desc=desc, enabled=desc is not None,
                               leave=False)
    with eval_mode(model), bar:
        i = 0
        while i < len(spans):  # equal-length windows share a batch
            width = spans[i][1] - spans[i][0]
            batch = [spans[i]]
            while (i + len(batch) < len(spans) and (len(batch) + 1) * width <= batch_tokens
                   and spans[i + len(batch)][1] - spans[i + len(batch)][0] == width):
                batch.append(spans[i + len(batch)])
            i += len(batch)
            logits = forward_logits(model, torch.stack([tokens[b:e] for b, e, _ in batch]))
            for r, (b, e, first) in enumerate(batch):
                target = tokens[first:e].to(logits.device)
                pred = logits[r, first - 1 - b:e - 1 - b].float()
                nll += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
                if on_window is not None:
                    on_window(target, pred)
                n_scored += target.numel()
                if tokenizer is not None:
                    n_bytes += len(tokenizer.decode(tokens[first:e].tolist()).encode("utf-8"))
            bar.update(len(batch))
    return {"ppl": math.exp(nll / n_scored),
            "bpb": nll / math.log(2) / n_bytes if n_bytes else None,
            "nll": nll / n_scored, "tokens": n_scored, "bytes": n_bytes or None,
            "ctx": ctx, "stride": stride, "seconds": round(time.perf_counter() - t0, 2)}
