"""Serving SPD checkpoints with vLLM: a model plugin (``vllm.general_plugins`` entry point).

vLLM calls ``register`` in every process it starts (engine, workers). It registers, for each
family the converter exports (Llama, Mistral, Qwen2, Qwen3):
- the config class of the SPD model type (``spd_llama``, ...) with transformers' AutoConfig, so
  vLLM parses the config.json that ``tools/convert_checkpoint.py --to hf`` writes for an SPD plan
  (convert/spd_hf.py; transformers alone refuses such a directory);
- the model ``SPD<HF architecture>`` (``SPDLlamaForCausalLM``, ...) with vLLM's ModelRegistry,
  by import path, so nothing of vLLM's model code is imported before a model is built.

The model is vLLM's own class with the plan's SPD blocks converted in place (models.py); see
docs/serving.md for use and what is refused. Only this subpackage imports vLLM.
"""
from __future__ import annotations

from ...convert.spd_hf import PREFIX, spd_architecture

#: HF model_type -> vLLM's class of the dense architecture (its registry name).
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def register() -> None:
    """Register the SPD config classes and models (idempotent; vLLM may call it repeatedly)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configs import CONFIGS

    for family, arch in FAMILIES.items():
        AutoConfig.register(PREFIX + family, CONFIGS[PREFIX + family], exist_ok=True)
        name = spd_architecture(arch)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"{__name__}.models:{name}")
