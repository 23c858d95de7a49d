"""The one place that knows about running megatron-core on CPU with gloo.

megatron-core (0.16.1 to 0.19.x) is written for CUDA. ``apply(seed)`` makes it run on CPU with a
handful of explicit, documented shims and does nothing but the stock seeding when CUDA is
available, so GPU code paths stay the stock ones. Every line below names the megatron-core call site (0.16.1
unless it says otherwise, under ``megatron/core/``) that needs it; API differences between
releases are in mcore_versions.py; docs/megatron-core-on-cpu.md has the measurements.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

_applied = False


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
    """What ``torch.cuda.current_stream()`` returns on CPU: nothing to wait for."""

    def wait_event(self, *_: Any) -> None:
        pass

    def wait_stream(self, *_: Any) -> None:
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
