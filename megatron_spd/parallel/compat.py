"""The one place that knows about running megatron-core on CPU with gloo.

megatron-core (0.16.1 to 0.19.x) is written for CUDA. ``apply(seed)`` makes it run on CPU with a
handful of explicit, documented shims and does nothing but the stock seeding when CUDA is
available, so GPU code paths stay the stock ones. Every line below names the megatron-core call site (0.16.1
unless it says otherwise, under ``megatron/core/``) that needs it; API differences between
releases are in mcore_versions.py; docs/megatron-core-on-cpu.md has the measurements.
``apply_dynamic_inference()`` (opt-in, megatron-core 0.19's DynamicInferenceEngine; called by
integrations/megatron_dynamic.py) adds the shims that engine needs, scoped to its modules, and a
pure-torch stand-in for flash-attn's paged kernels; docs/megatron-lm.md says what runs with it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from typing import Any, Optional

import torch

_applied = False
_dynamic_applied = False


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on: its local CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def backend() -> str:
    """torch.distributed backend: NCCL on GPU, gloo on CPU."""
    return "nccl" if on_gpu() else "gloo"


def importable(module: str) -> bool:
    """Whether ``module`` (an optional kernel package such as triton or apex's softmax) exists."""
    return importlib.util.find_spec(module) is not None


# TransformerConfig settings the CPU needs and a GPU does not (config.device_flags applies them
# when no CUDA device is present). Every fused kernel is CUDA-only or torch.compile'd;
# megatron-core's dataclass already defaults them to False, this states it:
# - bias_activation_fusion / bias_dropout_fusion: jit_fuser = torch.compile (megatron/core/jit.py),
#   which on CPU needs a C++ toolchain and compiles per shape;
# - masked_softmax_fusion: the apex/megatron CUDA softmax kernels (fusions/fused_softmax.py:31);
# - apply_rope_fusion: Transformer Engine (transformer_config.py:1550 refuses it otherwise);
# - persist_layer_norm: apex's FusedLayerNorm (torch_norm.py:30 refuses it);
# - gradient_accumulation_fusion: apex's fused_weight_gradient_mlp_cuda (layers.py:925).
# use_cpu_initialization builds the full master weight on CPU and slices it, so every TP degree
# gets the same random weights for one seed (the exactness tests rely on it).
CPU_CONFIG = dict(bias_activation_fusion=False, bias_dropout_fusion=False,
                  masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
                  gradient_accumulation_fusion=False, use_cpu_initialization=True)


def apply(seed: int = 1234) -> None:
    """Seed megatron-core's RNG tracker; on CPU, also install the CPU shims. Idempotent."""
    global _applied
    from megatron.core import tensor_parallel

    if on_gpu():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    if not _applied:
        # ~47 call sites allocate on torch.cuda.current_device() (rotary_pos_embedding.py:162
        # inv_freq, utils.py:631 GlobalMemoryBuffer used by attention and SP gathers,
        # attention.py:430 KV cache, mappings.py:91/141/181 gathers); "cpu" is a valid device.
        torch.cuda.current_device = lambda: "cpu"
        # The static inference path and checkpointing synchronise streams; nothing to wait for.
        torch.cuda.synchronize = lambda *a, **k: None
        # 0.19.0+ distributed/param_and_grad_buffer.py:632 start_grad_sync reads
        # torch.cuda.current_stream() before every DDP grad all-reduce (to wait on CUDA-graph
        # events CPU runs never record); 0.16.1-0.18.x do not reach it on CPU.
        torch.cuda.current_stream = lambda *a, **k: _NO_STREAM
        # transformer/utils.py:35 get_default_causal_mask hard-codes device="cuda"; it is used by
        # fused_softmax.py:327 when no mask is passed (our forwards pass explicit masks, but the
        # KV-cache prefill path of megatron's inference code may not).
        from megatron.core.fusions import fused_softmax

        fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
        # tensor_parallel/random.py:55 _get/_set_cuda_rng_state inside CheckpointFunction
        # (activation recompute); the CPU RNG is the only generator here.
        from megatron.core.tensor_parallel import random as mc_random

        mc_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mc_random._set_cuda_rng_state = lambda *a, **k: None
        _applied = True
    # random.py:423 model_parallel_cuda_manual_seed calls torch.cuda.get_rng_state(); the
    # inference-mode tracker makes add()/fork() no-ops (dot_product_attention.py:217 forks on
    # every forward). Consequence: no per-TP-rank dropout stream, so keep dropout 0 on CPU.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    torch.manual_seed(seed)


class _NoStream:
    """What ``torch.cuda.current_stream()`` (and, for dynamic inference, ``torch.cuda.Stream``)
    gives on CPU: every operation is already complete when issued, nothing to wait for."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def wait_event(self, *_: Any) -> None:
        pass

    def wait_stream(self, *_: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NO_STREAM = _NoStream()


def _cpu_default_causal_mask(sq: int, sk: int | None = None) -> torch.Tensor:
    sk = sq if sk is None else sk
    return torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1)


class TorchNorm:
    """RMSNorm/LayerNorm from torch.nn that works with sequence parallelism.

    megatron's ``WrappedTorchNorm`` (used when apex/TE are absent) asserts on sequence parallel
    (transformer/torch_norm.py:32). Norms are per token, so the plain torch norm is correct on a
    sequence shard; its weight gradient is then partial per rank, which we mark with
    ``sequence_parallel`` exactly like megatron's fused norms so the TP gradient sum finds it.
    Used in specs only when sequence parallel is on and no apex/TE norm is available.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


# ----- megatron-core 0.19's dynamic inference (DynamicInferenceEngine) on CPU ------------------
# Call sites are megatron-core 0.19.2's, under megatron/core/; docs/megatron-lm.md says what runs.

def apply_dynamic_inference() -> None:
    """Let megatron-core's dynamic inference (``DynamicInferenceContext``,
    ``TextGenerationController``, ``DynamicInferenceEngine``) run on CPU; call after ``apply()``.
    Opt-in (megatron_spd.integrations.megatron_dynamic calls it), idempotent, and nothing on CUDA.

    The host-side shims are scoped: the three megatron modules that call CUDA-only host APIs see
    ``_HOST_TORCH`` as their ``torch`` (their module global); every other module keeps torch's own.
    """
    global _dynamic_applied
    if on_gpu() or _dynamic_applied:
        return
    if not importable("einops"):
        # transformer/attention.py:59-62 imports einops optionally; rearrange at :1587 is the
        # dynamic path's only use, and fails with "'NoneType' object is not callable" without it
        raise ImportError("megatron-core's dynamic inference needs einops: "
                          "pip install 'megatron-spd[megatron-server]' (or pip install einops)")
    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.engines import dynamic_engine
    from megatron.core.inference.text_generation_controllers import text_generation_controller
    from megatron.core.transformer import attention

    # pinned host buffers (dynamic_context.py:975-1026, :1124; text_generation_controller.py:
    # 329-332, :408-417, :2447-2450), torch.cuda.Event (dynamic_context.py:1301;
    # dynamic_engine.py:364-365; text_generation_controller.py:337-340, :419-420),
    # torch.cuda.Stream (text_generation_controller.py:341), torch.cuda.stream (:2090, :2136,
    # :2472) and torch.cuda.current_stream (:2208-2408; dynamic_context.py:2578)
    for module in (dynamic_context, dynamic_engine, text_generation_controller):
        module.torch = _HOST_TORCH
    # text_generation_controller.py:15 binds torch.cuda.nvtx's range_push/range_pop at import
    # and calls them on every step (:747); they raise "NVTX functions not installed" on CPU
    text_generation_controller.range_push = _no_op
    text_generation_controller.range_pop = _no_op
    # dynamic_context.py:57-60 picks the triton KV-append kernel whenever triton imports, and it
    # asserts CUDA tensors (fused_kv_append_kernel.py:120); None selects the torch indexing
    # fallback (dynamic_context.py:1624-1649)
    dynamic_context.triton_append_key_value_cache = None
    # attention.py:1328-1331 asserts flash-attn >= 2.7.3 for dynamic batching; the dynamic
    # kernel flash_decode_and_prefill (:1022) calls flash-attn's paged kernels
    # flash_attn_varlen_func (prefill, :1129) and flash_attn_with_kvcache (decode, :1259)
    attention.is_fa_min_version = lambda *_a, **_k: True
    attention.flash_attn_varlen_func = paged_attention_varlen
    attention.flash_attn_with_kvcache = paged_attention_with_kvcache
    _dynamic_applied = True


def _no_op(*_: Any, **__: Any) -> None:
    pass


def _unpinned(fn):
    """``fn`` without its ``pin_memory`` keyword: page-locked host memory needs CUDA."""
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)
    return call


class _HostEvent:
    """``torch.cuda.Event`` on CPU: work is complete when issued; ``elapsed_time`` is the wall
    time between two ``record`` calls, in milliseconds (the engine's step time,
    dynamic_engine.py:2109)."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self._t = time.perf_counter()

    def record(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end._t - self._t) * 1e3

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, *_: Any) -> None:
        pass


class _HostCuda:
    """``torch.cuda`` as the dynamic-inference modules see it on CPU: events, streams and the
    stream context are no-ops; everything else is torch.cuda's own (with apply()'s shims)."""

    Event = _HostEvent
    Stream = _NoStream

    @staticmethod
    def stream(*_: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(*_: Any, **__: Any) -> _NoStream:
        return _NO_STREAM

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _HostTorch:
    """``torch`` as the dynamic-inference modules see it on CPU: allocators ignore
    ``pin_memory``, ``cuda`` is ``_HostCuda``; everything else is torch's own."""

    cuda = _HostCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


for _name in ("empty", "zeros", "ones", "full", "tensor", "empty_like", "zeros_like", "arange"):
    setattr(_HostTorch, _name, staticmethod(_unpinned(getattr(torch, _name))))
_HOST_TORCH = _HostTorch()


def paged_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple = (-1, -1), block_table: Optional[torch.Tensor] = None,
                           return_attn_probs: bool = False, **_: Any) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` on a paged KV cache, in plain torch (the prefill
    and mixed steps of attention.py:1129). A re-implementation because flash-attn is CUDA-only
    and megatron-core's dynamic batching has no other kernel. ``q``: [tokens, heads, dim], of
    which the first ``cu_seqlens_q[-1]`` are live; the rest (padding to the engine's token
    budget) come back as zeros, keeping q's row count as flash-attn does."""
    starts, kv_lens = cu_seqlens_q[:-1], cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return _paged_attention(q, k, v, starts, cu_seqlens_q[1:] - starts, kv_lens, block_table,
                            softmax_scale, causal, window_size, return_attn_probs)


def paged_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 cache_seqlens: torch.Tensor, *,
                                 softmax_scale: Optional[float] = None, causal: bool = False,
                                 window_size: tuple = (-1, -1),
                                 block_table: Optional[torch.Tensor] = None,
                                 return_softmax_lse: bool = False, **_: Any) -> torch.Tensor:
    """flash-attn's ``flash_attn_with_kvcache`` on a paged KV cache, in plain torch (the
    decode-only steps of attention.py:1259; CUDA-only in flash-attn, as above). ``q``:
    [requests, tokens per request, heads, dim]; ``cache_seqlens`` includes the new tokens."""
    b, s = q.shape[:2]
    out = _paged_attention(q.flatten(0, 1), k_cache, v_cache, torch.arange(b) * s,
                           torch.full((b,), s), cache_seqlens, block_table, softmax_scale,
                           causal, window_size, return_softmax_lse)
    return out.view(q.shape)


def _paged_attention(q, k_cache, v_cache, q_starts, q_lens, kv_lens, block_table, scale, causal,
                     window, want_lse) -> torch.Tensor:
    """Per request r: its q_lens[r] queries are the last positions of its kv_lens[r] keys,
    gathered from the cache blocks ``block_table[r]`` ([blocks, block size, KV heads, dim]);
    grouped-query heads share their KV head; fp32 softmax; sliding window (left, -1)."""
    if block_table is None or not causal or want_lse:
        raise NotImplementedError("the CPU paged attention covers causal attention on a paged "
                                  "KV cache without attention sinks (softmax_offset)")
    out = torch.zeros_like(q)
    block = k_cache.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for r in range(block_table.shape[0]):
        start, nq, nk = int(q_starts[r]), int(q_lens[r]), int(kv_lens[r])
        if nq == 0 or nk == 0:
            continue
        blocks = block_table[r, :math.ceil(nk / block)].long()
        k, v = (c[blocks].flatten(0, 1)[:nk].float() for c in (k_cache, v_cache))
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[start:start + nq].float(), k) * scale
        qpos, kpos = torch.arange(nk - nq, nk)[:, None], torch.arange(nk)[None, :]
        allowed = kpos <= qpos
        if window[0] >= 0:
            allowed &= qpos - kpos <= window[0]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start:start + nq] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
