"""transformers config classes for the SPD model types (``spd_llama``, ...; convert/spd_hf.py).

Each is the dense family's config class under another ``model_type``: every field parses as the
family's, and the plan (``spd_plan``) is kept as an extra attribute, which is how vLLM's model
reads it (``hf_config.spd_plan``). They exist so that vLLM, which builds configs through
AutoConfig, parses a directory that transformers alone refuses. Module-level classes, because
vLLM pickles the config into its worker processes.
"""
from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class SPDLlamaConfig(LlamaConfig):
    model_type = "spd_llama"


class SPDMistralConfig(MistralConfig):
    model_type = "spd_mistral"


class SPDQwen2Config(Qwen2Config):
    model_type = "spd_qwen2"


class SPDQwen3Config(Qwen3Config):
    model_type = "spd_qwen3"


CONFIGS = {c.model_type: c for c in (SPDLlamaConfig, SPDMistralConfig, SPDQwen2Config,
                                     SPDQwen3Config)}
