"""KV-cache text generation on megatron-core GPTModels with dense and SPD blocks (engine.py),
next-token sampling (sampling.py), and what tools/generate.py runs (run.py: prompt files,
data-parallel replicas, the listing)."""
from .engine import (
                     GenerationConfig,
                     GenerationError,
                     GenerationResult,
                     KVCache,
                     decode_step,
                     extend,
                     generate,
                     generate_ids,
                     new_cache,
                     prefill,
                     rewind,
)
from .sampling import SamplingParams, filter_logits, sample

__all__ = ["GenerationConfig", "GenerationError", "GenerationResult", "KVCache", "decode_step",
           "extend", "generate", "generate_ids", "new_cache", "prefill", "rewind", "SamplingParams",
           "filter_logits", "sample"]
