"""Text generation on the KV-cache steps (steps.py): ``generate(model, tokenizer, prompts,
GenerationConfig, stream=...)`` and its token-level core ``generate_ids``: batching, sampling,
stop on EOS / a caller's stop rule / max tokens / context end, streaming on rank 0 (streaming.py), time to first token
and time per output token. Call on every TP rank with the same arguments.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..options import option
from ..parallel import compat
from ..parallel.distributed import is_rank0
from .cache import KVCache, new_cache
from .sampling import SamplingParams, make_generator, sample
from .steps import GenerationError, decode_step, prefill
from .streaming import StreamCallback, TextStream


@dataclass
class GenerationConfig:
    """What to generate. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible
    (each prompt draws from its own generator seeded with ``seed + prompt index``, so a prompt's
    output does not depend on which others share its batch)."""

    max_new_tokens: int = option(32, "tokens to generate per prompt at most")
    temperature: float = option(0.0, "sampling temperature (0 = greedy)")
    top_k: int = option(0, "sample from the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this total "
                               "probability (1 = off)")
    seed: int = option(1234, "sampling seed (prompt i draws from seed + i)")
    max_batch_size: int = option(8, "prompts per batch", flag="--batch-size")
    stop_on_eos: bool = option(True, "stop a prompt at its EOS token", flag="--no-eos")
    cuda_graph: bool = option(True, "on GPU, replay each decode step from a CUDA graph",
                              flag="--no-cuda-graph")
    add_bos: Optional[bool] = None  # None: the tokenizer's (source model's) default

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        self.sampling  # validates temperature / top_k / top_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


@dataclass
class GenerationResult:
    """One prompt's output. ``tokens`` excludes the prompt and a final EOS; ``finish_reason`` is
    ``eos``, ``stop`` (the caller's stop rule), ``length`` (max_new_tokens) or ``context`` (the
    model's context is full).
    ``ttft_s``: from the start of its batch's prefill to its first token; ``tpot_s``: mean time
    per later token (None with fewer than two tokens)."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    ttft_s: float = 0.0
    tpot_s: Optional[float] = None
    prompt: Optional[str] = None
    text: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


TokenCallback = Callable[[int, int], None]   # (prompt index, token id), every rank
# (prompt index, tokens generated so far) -> stop this prompt now; every rank, same answer
StopRule = Callable[[int, Sequence[int]], bool]


def _check_prompts(prompt_ids: Sequence[Sequence[int]], context_len: int, vocab: int) -> None:
    if not prompt_ids:
        raise GenerationError("no prompts given; pass at least one prompt")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise GenerationError(f"prompt {i} is empty (0 tokens); give it some text")
        if len(ids) >= context_len:
            raise GenerationError(
                f"prompt {i} has {len(ids)} tokens but the model's context is {context_len} "
                f"tokens, which leaves no room to generate; shorten the prompt to at most "
                f"{context_len - 1} tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary "
                                  f"[0, {vocab}): {bad[:5]}")


def _peer_failure(exc: BaseException) -> bool:
    """A collective error in a multi-rank run: a peer died, hung past the timeout, or the
    connection broke."""
    if isinstance(exc, GenerationError) or not (dist.is_initialized()
                                                and dist.get_world_size() > 1):
        return False
    if isinstance(exc, dist.DistBackendError):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def kv_cache_bytes(model, rows: int, seq_len: int) -> int:
    """Bytes the KV cache of ``rows`` x ``seq_len`` tokens takes on this rank (K and V of every
    layer, this rank's query groups, the parameters' dtype)."""
    cfg = model.config
    groups = (cfg.num_query_groups or cfg.num_attention_heads) // cfg.tensor_model_parallel_size
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.empty((), dtype=cfg.params_dtype).element_size()
    return 2 * cfg.num_layers * rows * groups * seq_len * head_dim * itemsize


def available_memory() -> int:
    """Bytes that can still be allocated on the compute device (the GPU's free memory, else the
    host's MemAvailable)."""
    if compat.device().type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(model, rows: int, seq_len: int) -> None:
    """Raise GenerationError, before anything is allocated, unless the KV cache fits in memory
    (an oversized request is refused with the numbers instead of taking the node down)."""
    need, free = kv_cache_bytes(model, rows, seq_len), available_memory()
    if need > free:
        raise GenerationError(f"the KV cache for {rows} prompt(s) x {seq_len} tokens needs "
                              f"{need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of memory is"
                              " available; ask for fewer --max-new-tokens, a smaller --batch-size"
                              " or shorter prompts")


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], config: GenerationConfig, *,
                 eos_id: Optional[int] = None, on_token: Optional[TokenCallback] = None,
                 indices: Optional[Sequence[int]] = None,
                 stop: Optional[StopRule] = None) -> list[GenerationResult]:
    """Generate after each token-id prompt; returns one GenerationResult per prompt (in order).

    Call on every TP rank with the same arguments; all ranks return the same results.
    ``on_token(prompt_index, token_id)`` is called on every rank as tokens are produced.
    ``indices``: the prompts' indices in a larger job (default 0..n-1); they name the prompts in
    callbacks and seed their samplers, so a prompt's output does not depend on how a job is split.
    ``stop(prompt_index, tokens)`` is asked after each new token (kept) whether the prompt is done
    (finish_reason "stop"), e.g. once its text holds a stop string: a finished row stops decoding
    instead of running to ``max_new_tokens``. It must answer the same on every rank.
    A rank that dies makes the others raise GenerationError (within the torch.distributed
    timeout at worst) instead of hanging.
    """
    model.eval()
    context_len = int(model.max_sequence_length)
    _check_prompts(prompt_ids, context_len, int(model.vocab_size))
    results = [GenerationResult(prompt_tokens=list(ids)) for ids in prompt_ids]
    indices = list(range(len(prompt_ids))) if indices is None else list(indices)
    if len(indices) != len(prompt_ids):
        raise GenerationError(f"{len(indices)} indices for {len(prompt_ids)} prompts")
    size = config.max_batch_size
    lengths = [len(ids) for ids in prompt_ids]
    # rows are left-padded to the longest prompt and no row decodes past the context
    cache_len = max(lengths) + min(config.max_new_tokens, context_len - min(lengths))
    rows = min(size, len(prompt_ids))
    check_cache_fits(model, rows, cache_len)
    cache = new_cache(rows, cache_len, cuda_graph=config.cuda_graph)
    try:
        for start in range(0, len(prompt_ids), size):
            cache.reset()
            _generate_batch(model, cache, results[start:start + size],
                            indices[start:start + size], config,
                            eos_id if config.stop_on_eos else None, context_len, on_token, stop)
    except Exception as exc:
        if _peer_failure(exc):
            cause = (str(exc).strip().splitlines() or [""])[0][:300]  # the message is one line
            raise GenerationError(
                f"generation aborted on rank {dist.get_rank()}: a tensor-parallel collective "
                f"failed, most likely because another rank died or stopped responding (ranks "
                f"wait at most --timeout-s seconds, the torch.distributed timeout). Cause: "
                f"{type(exc).__name__}: {cause}") from exc
        raise
    return results


def _generate_batch(model, cache: KVCache, batch: list[GenerationResult], indices: list[int],
                    config: GenerationConfig, eos_id: Optional[int], context_len: int,
                    on_token: Optional[TokenCallback], stop: Optional[StopRule]) -> None:
    dev = compat.device()
    lengths = [len(r.prompt_tokens) for r in batch]
    width = max(lengths)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    for row, r in enumerate(batch):
        tokens[row, width - len(r.prompt_tokens):] = torch.tensor(r.prompt_tokens)
    budgets = [min(config.max_new_tokens, context_len - n) for n in lengths]
    params = config.sampling
    gens = [None if params.greedy else make_generator(config.seed + i, dev) for i in indices]
    active = list(range(len(batch)))
    start = time.perf_counter()
    logits = prefill(model, cache, tokens, lengths)
    while True:
        chosen = [int(sample(logits[row:row + 1], params, gens[row])) for row in range(len(batch))]
        now = time.perf_counter()
        still = []
        for row in active:
            r, tok = batch[row], chosen[row]
            if tok == eos_id:
                r.finish_reason = "eos"
                continue
            r.tokens.append(tok)
            if len(r.tokens) == 1:
                r.ttft_s = now - start
            else:
                r.tpot_s = (now - start - r.ttft_s) / (len(r.tokens) - 1)
            if on_token is not None:
                on_token(indices[row], tok)
            if stop is not None and stop(indices[row], r.tokens):
                r.finish_reason = "stop"
            elif len(r.tokens) < budgets[row]:
                still.append(row)
            else:
                r.finish_reason = "length" if budgets[row] == config.max_new_tokens else "context"
        active = still
        if not active:
            return
        logits = decode_step(model, cache, torch.tensor(chosen, dtype=torch.long))



def generate(model, tokenizer, prompts: Sequence[str], config: Optional[GenerationConfig] = None,
             stream: Optional[StreamCallback] = None,
             indices: Optional[Sequence[int]] = None) -> list[GenerationResult]:
    """Generate after each text prompt; ``stream(prompt_index, new_text)`` runs on rank 0 only.

    Call on every TP rank with the same arguments. Results carry the decoded ``text``.
    ``indices`` as in ``generate_ids``.
    """
    config = config or GenerationConfig()
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise GenerationError(f"prompt {i} is empty or not a string ({p!r}); give it some text")
    prompt_ids = [tokenizer.encode(p, add_bos=config.add_bos) for p in prompts]
    on_token = TextStream(tokenizer, stream) if stream is not None and is_rank0() else None
    results = generate_ids(model, prompt_ids, config, eos_id=tokenizer.eos_id, on_token=on_token,
                           indices=indices)
    for p, r in zip(prompts, results):
        r.prompt, r.text = p, tokenizer.decode(r.tokens)
    return results
