"""KV-cache text generation on megatron-core GPTModels with dense and SPD blocks, split the way
megatron-core splits its inference: the cache (cache.py: ``KVCache``, ``new_cache``), the
prefill/decode steps (steps.py, with graph.py: a decode step captured in a CUDA graph), the
generation loop and its config (generation.py: batching, sampling, stopping, timings),
streaming (streaming.py), next-token sampling (sampling.py), and what tools/generate.py runs
(run.py: prompt files, data-parallel replicas, the listing)."""
from .cache import KVCache, new_cache
from .generation import GenerationConfig, GenerationResult, generate, generate_ids
from .sampling import SamplingParams, filter_logits, sample
from .steps import GenerationError, decode_step, extend, prefill, rewind

__all__ = ["GenerationConfig", "GenerationError", "GenerationResult", "KVCache", "decode_step",
           "extend", "generate", "generate_ids", "new_cache", "prefill", "rewind", "SamplingParams",
           "filter_logits", "sample"]
