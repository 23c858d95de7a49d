"""KV-cache generation on a megatron-core GPTModel (dense or SPD blocks), on every TP rank.

megatron-core's ``StaticInferenceEngine`` needs CUDA-only calls (docs/megatron-core-on-cpu.md,
item 19), so this is a thin engine over ``GPTModel.forward`` with a megatron static inference
context as its KV cache. Two paths, chosen per batch at prefill:
- tensorised (models from ``megatron_spd.core.spec``, whose attention is ``CachedSelfAttention``):
  cache length, padding and masks in device tensors, K/V written in place, fused attention
  (kv_cache.py); each decode step is one ``DecodeStep``, captured in a CUDA graph on GPU
  (graph.py; eager on CPU, with ``cuda_graph=False``, or if capture fails, with a warning);
- megatron's own static path (any other GPTModel, e.g. the benchmark's stock model, or
  ``tensor_path=False``): ``StaticInferenceContext`` with explicit masks, as megatron does it.
Both give the same logits (tests/test_decode_path.py); SPDTransformerLayer hands the context to
the attention like a dense layer does, so SPD blocks cache exactly like dense ones.

Two levels:
- low level (what the latency benchmark times): ``new_cache(max_batch, max_seq_len, ...)``,
  ``prefill(model, cache, tokens, prompt_lengths) -> [b, V]`` and
  ``decode_step(model, cache, next_tokens) -> [b, V]``; full-vocabulary logits of the last
  position, identical on every TP rank.
- high level: ``generate(model, tokenizer, prompts, GenerationConfig, stream=...)`` and its
  token-level core ``generate_ids``: batching, sampling, stop on EOS / max tokens / context end,
  streaming on rank 0, time to first token and time per output token.

Prompts of different lengths share a batch by left padding: pad keys are masked in prefill and in
every decode step, and each row's position ids count from its first real token. megatron slices
RoPE by cache slot, not by position id, so a padded row's rotary angles are shifted by its pad
length; attention scores depend only on relative positions, so the result equals the row run
alone up to float rounding (and exactly for learned absolute positions).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.cached_attention import CacheContext, uses_cached_attention
from ..core.sharding import causal_mask
from ..errors import SPDError
from ..options import option
from ..parallel import compat
from ..parallel.distributed import is_rank0
from ..parallel.mcore_versions import logits_flag_holder
from .graph import DecodeStep
from .sampling import SamplingParams, make_generator, sample


class GenerationError(SPDError, RuntimeError):
    """Generation stopped because of bad input or because a peer rank failed."""


# ----- low level: cache, prefill, decode ---------------------------------------------------------
class KVCache:
    """The inference context (kv_cache.CacheContext) plus each row's left-pad length, and the
    decode steps (graphs) made for it.

    One cache holds one batch from prefill to the end of its decode; ``reset()`` reuses the
    allocated buffers (and captured decode graphs) for the next batch of the same or smaller
    size. ``tensor_path``: use the tensorised path where the model supports it; ``cuda_graph``:
    capture its decode step on GPU (``graph_error`` says why a capture failed, if one did).
    """

    def __init__(self, max_batch: int, max_seq_len: int, *, tensor_path: bool = True,
                 cuda_graph: bool = True) -> None:
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"KV cache needs max_batch >= 1 and max_seq_len >= 1, "
                             f"got {max_batch} and {max_seq_len}")
        self.context = CacheContext(max_batch, max_seq_len, compat.device())
        self.pad: Optional[torch.Tensor] = None  # [b] left-pad lengths; None = no padding
        self.batch = 0
        self.tensor_path, self.cuda_graph = tensor_path, cuda_graph
        self.graph_error: Optional[str] = None
        self._steps: dict[tuple[int, int], DecodeStep] = {}
        self._pool = None

    @property
    def max_batch(self) -> int:
        return self.context.max_batch_size

    @property
    def max_seq_len(self) -> int:
        return self.context.max_sequence_length

    @property
    def length(self) -> int:
        """Cache slots filled so far (padded prompt length + decoded tokens)."""
        return self.context.sequence_len_offset

    def reset(self) -> None:
        self.context.reset()
        self.pad = None
        self.batch = 0

    def decode_step_for(self, model) -> DecodeStep:
        """The (captured, where possible) tensorised decode step of ``model`` for this batch."""
        key = (id(model), self.batch)
        step = self._steps.get(key)
        if step is not None and step.model is model:
            return step
        capture = self.cuda_graph and compat.on_gpu() and self.graph_error is None
        if capture and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            step = DecodeStep(model, self.context, self.batch, capture=capture, pool=self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure: decode eagerly, say why
            self.graph_error = f"{type(exc).__name__}: {exc}"
            warnings.warn("CUDA graph capture of the decode step failed, decoding eagerly "
                          f"instead: {self.graph_error}")
            step = DecodeStep(model, self.context, self.batch, capture=False)
        self._steps[key] = step
        return step


def new_cache(max_batch: int, max_seq_len: int, *, tensor_path: bool = True,
              cuda_graph: bool = True) -> KVCache:
    """An empty KV cache for up to ``max_batch`` rows of ``max_seq_len`` tokens (padding
    included). ``tensor_path=False`` forces megatron's own static path; ``cuda_graph=False``
    decodes eagerly on GPU too."""
    return KVCache(max_batch, max_seq_len, tensor_path=tensor_path, cuda_graph=cuda_graph)


def _check_model(model) -> None:
    if model.training:
        raise GenerationError("the model is in training mode; call model.eval() before generating "
                              "(megatron only uses the KV cache in eval mode)")
    if model.config.sequence_parallel:
        raise GenerationError("generation needs a model built without sequence parallel (a "
                              "one-token decode step cannot be split over the sequence); load it "
                              "with sequence_parallel=False")


def _last_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :]


@torch.no_grad()
def prefill(model, cache: KVCache, tokens: torch.Tensor,
            prompt_lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Run the prompts ``tokens`` [b, s] into the empty ``cache``; logits of the last position [b, V].

    ``prompt_lengths`` (optional): each row's real length; rows are left-padded to ``s`` (the pad
    token values do not matter). Call on every TP rank with the same arguments.
    """
    _check_model(model)
    if cache.length:
        raise GenerationError("the KV cache already holds a batch; call cache.reset() first")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise GenerationError(f"prefill needs tokens of shape [batch, seq] with seq >= 1, "
                              f"got {tuple(tokens.shape)}")
    b, s = tokens.shape
    if b > cache.max_batch or s > cache.max_seq_len:
        raise GenerationError(f"batch [{b}, {s}] does not fit a KV cache of "
                              f"[{cache.max_batch}, {cache.max_seq_len}]; make a larger cache")
    dev = compat.device()
    tokens = tokens.to(dev)
    mask = causal_mask(s, dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    pad = None
    if prompt_lengths is not None:
        lengths = torch.as_tensor(list(prompt_lengths), dtype=torch.long, device=dev)
        if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > s:
            raise GenerationError(f"prompt_lengths must be {b} values in [1, {s}], "
                                  f"got {lengths.tolist()}")
        if int(lengths.min()) < s:
            pad = s - lengths
            key_is_pad = torch.arange(s, device=dev).unsqueeze(0) < pad.unsqueeze(1)  # [b, s]
            mask = mask | key_is_pad[:, None, None, :]
            pos = (pos - pad.unsqueeze(1)).clamp_min(0)
    ctx = cache.context
    ctx.tensor_path = cache.tensor_path and uses_cached_attention(model)
    if ctx.tensor_path:
        ctx.pad[:b].copy_(pad if pad is not None else torch.zeros(b, dtype=torch.long))
    logits = _forward(model, ctx, tokens, pos, mask)
    cache.pad, cache.batch = pad, b
    ctx.enable_decode_mode()
    return _last_logits(logits)


def _forward(model, ctx: CacheContext, tokens: torch.Tensor, pos: torch.Tensor,
             mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``tokens`` [b, k] through ``model`` into the cache. ``pos``/``mask`` are megatron's
    (ignored on the tensorised path, which makes its own on the device)."""
    b, k = tokens.shape
    if ctx.tensor_path:
        pos, mask = ctx.begin_step(b, k), None
    logits = model(tokens, pos, mask, inference_context=ctx, runtime_gather_output=True)
    if ctx.tensor_path:
        ctx.end_step(k)
    ctx.increment_sequence_len_offset(k)
    return logits


@torch.no_grad()
def decode_step(model, cache: KVCache, next_tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row (``next_tokens`` [b]) to the cache; logits of that position [b, V]."""
    _check_model(model)
    if not cache.length:
        raise GenerationError("decode_step before prefill: the KV cache is empty")
    if cache.length >= cache.max_seq_len:
        raise GenerationError(f"the KV cache is full ({cache.max_seq_len} tokens); make a larger "
                              "cache or generate fewer tokens")
    b = cache.batch
    if next_tokens.shape != (b,):
        raise GenerationError(f"decode_step needs one token per row, shape ({b},), "
                              f"got {tuple(next_tokens.shape)}")
    dev = compat.device()
    ctx = cache.context
    if ctx.tensor_path:
        logits = cache.decode_step_for(model)(next_tokens.to(dev))
        ctx.increment_sequence_len_offset(1)
        return logits
    n = cache.length
    pos = torch.full((b, 1), n, dtype=torch.long, device=dev)
    mask = None  # no padding: every cached key is visible (megatron's decode default)
    if cache.pad is not None:
        pos = pos - cache.pad.unsqueeze(1)
        mask = (torch.arange(n + 1, device=dev).unsqueeze(0) < cache.pad.unsqueeze(1))
        mask = mask[:, None, None, :]
    return _last_logits(_forward(model, ctx, next_tokens.to(dev).unsqueeze(1), pos, mask))


@torch.no_grad()
def extend(model, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append ``tokens`` [b, k] to a prefilled ``cache`` (a chunked prefill); logits of every new
    position [b, k, V].

    Scoring several continuations of one context uses it with ``rewind``: prefill the context
    once, then extend by each continuation from the same cache length.
    """
    _check_model(model)
    if not cache.length:
        raise GenerationError("extend before prefill: the KV cache is empty")
    b, k = tokens.shape if tokens.dim() == 2 else (0, 0)
    if b != cache.batch or k < 1:
        raise GenerationError(f"extend needs tokens of shape [{cache.batch}, k >= 1], "
                              f"got {tuple(tokens.shape)}")
    n = cache.length
    if n + k > cache.max_seq_len:
        raise GenerationError(f"{n} cached + {k} new tokens exceed the KV cache's "
                              f"{cache.max_seq_len}; make a larger cache")
    dev = compat.device()
    keys = torch.arange(n + k, device=dev)
    mask = keys[None, :] > (n + torch.arange(k, device=dev))[:, None]  # [k, n+k] future keys
    mask = mask[None, None].expand(b, 1, k, n + k)
    pos = (n + torch.arange(k, device=dev)).unsqueeze(0).expand(b, k)
    if cache.pad is not None:
        mask = mask | (keys.unsqueeze(0) < cache.pad.unsqueeze(1))[:, None, None, :]
        pos = pos - cache.pad.unsqueeze(1)
    context = cache.context
    flag = logits_flag_holder(context)
    only_last = flag.materialize_only_last_token_logits
    flag.materialize_only_last_token_logits = False  # every new position's logits
    try:
        return _forward(model, context, tokens.to(dev), pos, mask)
    finally:
        flag.materialize_only_last_token_logits = only_last


def rewind(cache: KVCache, length: int) -> None:
    """Forget every cached position from ``length`` on (later steps overwrite those slots)."""
    if not 1 <= length <= cache.length:
        raise GenerationError(f"can only rewind the KV cache to a length in [1, {cache.length}], "
                              f"got {length}")
    cache.context.set_length(length)


# ----- high level: generate ----------------------------------------------------------------------
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
    ``eos``, ``length`` (max_new_tokens) or ``context`` (the model's context is full).
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
StreamCallback = Callable[[int, str], None]  # (prompt index, new text), rank 0 only


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


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], config: GenerationConfig, *,
                 eos_id: Optional[int] = None, on_token: Optional[TokenCallback] = None,
                 indices: Optional[Sequence[int]] = None) -> list[GenerationResult]:
    """Generate after each token-id prompt; returns one GenerationResult per prompt (in order).

    Call on every TP rank with the same arguments; all ranks return the same results.
    ``on_token(prompt_index, token_id)`` is called on every rank as tokens are produced.
    ``indices``: the prompts' indices in a larger job (default 0..n-1); they name the prompts in
    callbacks and seed their samplers, so a prompt's output does not depend on how a job is split.
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
    longest = max(len(ids) for ids in prompt_ids)
    cache = new_cache(min(size, len(prompt_ids)), longest + config.max_new_tokens,
                      cuda_graph=config.cuda_graph)
    try:
        for start in range(0, len(prompt_ids), size):
            cache.reset()
            _generate_batch(model, cache, results[start:start + size],
                            indices[start:start + size], config,
                            eos_id if config.stop_on_eos else None, context_len, on_token)
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
                    on_token: Optional[TokenCallback]) -> None:
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
            if len(r.tokens) < budgets[row]:
                still.append(row)
            else:
                r.finish_reason = "length" if budgets[row] == config.max_new_tokens else "context"
        active = still
        if not active:
            return
        logits = decode_step(model, cache, torch.tensor(chosen, dtype=torch.long))


class _TextStream:
    """Turns a prompt's growing token list into new text pieces, holding back an incomplete
    multi-byte character (the tokenizer decodes it as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, callback: StreamCallback) -> None:
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: dict[int, list[int]] = {}
        self.sent: dict[int, int] = {}

    def __call__(self, index: int, token: int) -> None:
        ids = self.ids.setdefault(index, [])
        ids.append(token)
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            return
        done = self.sent.get(index, 0)
        if len(text) > done:
            self.callback(index, text[done:])
            self.sent[index] = len(text)


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
    on_token = _TextStream(tokenizer, stream) if stream is not None and is_rank0() else None
    results = generate_ids(model, prompt_ids, config, eos_id=tokenizer.eos_id, on_token=on_token,
                           indices=indices)
    for p, r in zip(prompts, results):
        r.prompt, r.text = p, tokenizer.decode(r.tokens)
    return results
