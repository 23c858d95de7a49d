"""GGUF (llama.cpp) LLaMA-family files -> Hugging Face tensors -> the full megatron state dict.

The ``gguf`` package dequantises every quant type it supports to fp32 (this is the slow part,
about 10 s for SmolLM2-135M). llama.cpp's converter permutes the q/k rows of each head so its
interleaved RoPE can be used; megatron's RoPE is non-interleaved (HF layout), so the permutation
is undone here exactly as HF transformers' GGUF loader does (notes/model-and-data.md: the wrong
layout still generates fluent text but has ~17x the perplexity, so tests check perplexity).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..config import ModelConfig
from .hf import ConversionError, FullStateDict, hf_to_full

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def read_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` (memory-mapped; metadata parsed), or a clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/... on bad bytes
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              "it may be truncated: re-download it") from None


def _field(reader, key: str, default: Any = None) -> Any:
    return reader.fields[key].contents() if key in reader.fields else default


def model_config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; only 'llama' "
                              "(LLaMA, Mistral, SmolLM, TinyLlama ...)")

    def a(key: str, default: Any = None) -> Any:
        v = _field(reader, f"llama.{key}", default)
        if v is None:
            raise ConversionError(f"GGUF metadata llama.{key} is missing; the file is incomplete")
        return v

    if _field(reader, "llama.rope.scaling.type", "none") not in ("none", None):
        raise ConversionError("GGUF file uses RoPE scaling, which is not supported")
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    if int(a("rope.dimension_count", hidden // heads)) != hidden // heads:
        raise ConversionError("GGUF rope.dimension_count != head dim: partial RoPE unsupported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens) if tokens else 0)) or None
    if vocab is None:
        raise ConversionError("GGUF file has neither llama.vocab_size nor a tokenizer vocabulary")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        num_layers=int(a("block_count")), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(a("attention.head_count_kv", heads)),
        ffn_hidden_size=int(a("feed_forward_length")), vocab_size=vocab,
        max_seq_length=int(a("context_length", 2048)),
        rope_theta=_f32_to_decimal(a("rope.freq_base", 10000.0)),
        norm_eps=_f32_to_decimal(a("attention.layer_norm_rms_epsilon", 1e-5)),
        add_bias_linear=any(t.name.endswith("attn_output.bias") for t in reader.tensors),
        tie_word_embeddings=not has_output)


def _f32_to_decimal(x: float) -> float:
    """GGUF stores float32 (1e-5 reads back as 9.99999974e-06): the shortest decimal that
    rounds to the same float32, as the source config.json had it."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head q/k row permutation (weights [out, in] or biases [out])."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK_RE.match(name)
    if not m or m.group(2) not in _BLOCK:
        if name == "rope_freqs.weight":
            raise ConversionError("GGUF file has rope_freqs (LLaMA-3.1 RoPE scaling): unsupported")
        raise ConversionError(f"GGUF tensor {name!r} is not part of a LLaMA model")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def gguf_to_hf(reader, cfg: ModelConfig,
               progress: Optional[Callable[[int], None]] = None) -> dict[str, torch.Tensor]:
    """Dequantised fp32 tensors under HF names and layouts (q/k rows un-permuted)."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(f"GGUF tensor {t.name}: quant type {t.tensor_type.name} cannot "
                                  "be dequantised by the installed gguf package; upgrade gguf or"
                                  " re-quantise the file") from None
        w = np.array(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = unpermute_rope_rows(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = unpermute_rope_rows(w, cfg.num_query_groups)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
        if progress is not None:
            progress(1)
    return out


def load_gguf(path_or_reader, progress: Optional[Callable[[int], None]] = None
              ) -> tuple[ModelConfig, FullStateDict]:
    """ModelConfig and full megatron state dict (fp32, dequantised) from a GGUF file."""
    reader = path_or_reader if hasattr(path_or_reader, "tensors") else read_gguf(path_or_reader)
    cfg = model_config_from_gguf(reader)
    source = getattr(reader.data, "filename", "GGUF file")
    return cfg, hf_to_full(gguf_to_hf(reader, cfg, progress), cfg, source=str(source))
