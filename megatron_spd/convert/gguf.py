"""GGUF (llama.cpp) files of the ``llama``, ``qwen2`` and ``qwen3`` architectures -> Hugging
Face tensors -> the full megatron state dict.

The ``gguf`` package dequantises every quant type it supports to fp32 (this is the slow part,
about 10 s for SmolLM2-135M). For the ``llama`` architecture (Llama 1-3.x, Mistral, SmolLM)
llama.cpp's converter permutes the q/k rows (and biases) of each head so its interleaved RoPE
can be used; megatron's RoPE is non-interleaved (HF layout), so the permutation is undone here
exactly as HF transformers' GGUF loader does (docs/model-and-data.md: the wrong layout still
generates fluent text but has ~17x the perplexity, so tests check perplexity). ``qwen2``/``qwen3``
use NEOX (non-interleaved) RoPE in llama.cpp and are stored unpermuted.

Llama-3.1+ files carry their RoPE scaling only as a ``rope_freqs`` tensor (per-frequency divisors
llama.cpp's converter computes); it is accepted when it equals what megatron-core's Llama-3
scaling computes for some factor (its constants are fixed), otherwise refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..core.config import FullStateDict, ModelConfig
from .hf import LLAMA3_ROPE_CONSTANTS, ConversionError, hf_to_full

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"
#: llama.cpp architectures accepted; only ``llama`` stores q/k rows permuted.
ARCHITECTURES = ("llama", "qwen2", "qwen3")


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
    if arch not in ARCHITECTURES:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; supported: "
                              "'llama' (Llama 1-3.x, Mistral, SmolLM), 'qwen2' (Qwen2, Qwen2.5), "
                              "'qwen3' (Qwen3 dense)")

    def a(key: str, default: Any = None) -> Any:
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise ConversionError(f"GGUF metadata {arch}.{key} is missing; the file is incomplete")
        return v

    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ConversionError(f"GGUF metadata {arch}.rope.scaling.type is {scaling_type!r}: "
                              "megatron-core implements plain RoPE and Llama-3 scaling only")
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    head_dim = int(a("attention.key_length", hidden // heads))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise ConversionError(f"GGUF {arch}.attention.value_length != key_length: different q/k "
                              "and v head dimensions are not supported")
    if int(a("rope.dimension_count", head_dim)) != head_dim:
        raise ConversionError(f"GGUF {arch}.rope.dimension_count != head dim {head_dim}: partial "
                              "RoPE is unsupported")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ConversionError("GGUF file has no token_embd.weight; the file is incomplete")
    vocab = int(_field(reader, f"{arch}.vocab_size", int(embd.shape[-1])))
    theta = _f32_to_decimal(a("rope.freq_base", 10000.0))
    scaling_factor = _llama3_factor(reader, theta, head_dim)
    window = int(_field(reader, f"{arch}.attention.sliding_window", 0) or 0) or None
    context = int(a("context_length", 2048))
    add_bias_linear, add_qkv_bias = _gguf_biases(names)
    return ModelConfig(
        num_layers=int(a("block_count")), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(a("attention.head_count_kv", heads)),
        ffn_hidden_size=int(a("feed_forward_length")), vocab_size=vocab,
        max_seq_length=min(context, window) if window else context, rope_theta=theta,
        norm_eps=_f32_to_decimal(a("attention.layer_norm_rms_epsilon", 1e-5)),
        add_bias_linear=add_bias_linear, tie_word_embeddings="output.weight" not in names,
        kv_channels=None if head_dim * heads == hidden else head_dim, add_qkv_bias=add_qkv_bias,
        qk_layernorm=any(n.endswith("attn_q_norm.weight") for n in names),
        rope_scaling=scaling_factor is not None, rope_scaling_factor=scaling_factor or 8.0,
        sliding_window=window)


def _gguf_biases(names: set[str]) -> tuple[bool, bool]:
    """(add_bias_linear, add_qkv_bias) from which bias tensors the file has."""
    qkv = any(n.endswith("attn_q.bias") for n in names)
    rest = any(n.endswith(("attn_output.bias", "ffn_down.bias", "ffn_up.bias")) for n in names)
    if rest and not qkv:
        raise ConversionError("GGUF file has output/MLP biases but no q/k/v biases: megatron-core "
                              "puts biases on all linears or on q/k/v only")
    return rest, qkv and not rest


def llama3_rope_divisors(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """What llama.cpp's converter writes as ``rope_freqs`` for Llama-3 scaling with megatron-core's
    constants (low_freq_factor 1, high_freq_factor 4, original context 8192): each RoPE
    frequency is divided by its entry. Written from the Llama 3.1 formula; tests compare it with
    transformers' llama3 inverse frequencies."""
    low, high, ctx = (LLAMA3_ROPE_CONSTANTS[k] for k in (
        "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < ctx / high, 1.0, np.where(wavelen > ctx / low, factor, mid)
                    ).astype(np.float32)


def _llama3_factor(reader, theta: float, head_dim: int) -> Optional[float]:
    """The Llama-3 scaling factor encoded by a ``rope_freqs`` tensor (None: no tensor, or all 1)."""
    from gguf.quants import dequantize

    t = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if t is None:
        return None
    divisors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
    if np.all(divisors == 1.0):
        return None
    factor = float(divisors.max())
    want = llama3_rope_divisors(theta, head_dim, factor)
    if divisors.shape != want.shape or not np.allclose(divisors, want, rtol=1e-5, atol=0):
        raise ConversionError(
            f"GGUF tensor {ROPE_FREQS} is not Llama-3 RoPE scaling with megatron-core's fixed "
            "constants (low_freq_factor 1, high_freq_factor 4, original context 8192); this "
            "model's RoPE cannot be reproduced: convert from the Hugging Face directory to see "
            "which rope_scaling field differs")
    return _f32_to_decimal(factor)


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
        raise ConversionError(f"GGUF tensor {name!r} is not part of a model of the supported "
                              f"architectures {ARCHITECTURES}")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def gguf_to_hf(reader, cfg: ModelConfig,
               progress: Optional[Callable[[int], None]] = None) -> dict[str, torch.Tensor]:
    """Dequantised fp32 tensors under HF names and layouts (llama arch: q/k rows un-permuted).
    ``rope_freqs`` is not a weight: model_config_from_gguf turned it into ``rope_scaling``."""
    from gguf.quants import dequantize

    permuted = _field(reader, "general.architecture") == "llama"
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            if progress is not None:
                progress(1)
            continue
        name = _hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(f"GGUF tensor {t.name}: quant type {t.tensor_type.name} cannot "
                                  "be dequantised by the installed gguf package; upgrade gguf or"
                                  " re-quantise the file") from None
        w = np.array(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, cfg.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
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
