"""Converters between checkpoint formats and the full (TP=1) megatron-core state dict.

``hf``: Hugging Face LLaMA safetensors directories, both directions. ``gguf``: llama.cpp GGUF
files (dequantised), one direction. Sharding to a TP degree is model.py's job, not theirs.
"""
from .gguf import load_gguf, model_config_from_gguf
from .hf import ConversionError, full_to_hf, hf_to_full, load_hf, model_config_from_hf, save_hf

__all__ = ["ConversionError", "full_to_hf", "hf_to_full", "load_hf", "model_config_from_hf",
           "save_hf", "load_gguf", "model_config_from_gguf"]
