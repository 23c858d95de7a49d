"""Hugging Face checkpoints (Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3) <-> the full (TP=1)
megatron-core state dict.

Hugging Face keeps q/k/v and gate/up as separate matrices; megatron-core fuses them: QKV rows
(and the q/k/v biases, Qwen2) grouped per KV group ``[q heads of group g | k_g | v_g]`` and SwiGLU
fc1 as ``[gate; up]`` (docs/dev-api.md); Qwen3's per-head q/k norms are megatron's q/k_layernorm.
Both directions are pure re-layouts (concatenation and slicing, no arithmetic), so a round trip
is bit-exact in any dtype. Only what megatron-core's GPTModel can express is accepted: plain and
Llama-3 RoPE (its fixed constants), any head_dim (``kv_channels``), biases on all linears or on
q/k/v only, QK-norm; a sliding window only with the context capped to the window (config.py).
Anything else is refused with a message naming the config field, never converted wrongly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..core.config import FullStateDict, ModelConfig
from ..errors import SPDError
from ..files import atomic_write_json, read_json_object
from . import spd_hf


L = "decoder.layers.{i}."
HF = "model.layers.{i}."


class ConversionError(SPDError, ValueError):
    """The source cannot be converted as given; the message names the problem and the fix."""


# ----- config.json <-> ModelConfig ------------------------------------------------------------

#: HF ``model_type`` values accepted, and what they cover.
FAMILIES = {"llama": "Llama 1-3.x, SmolLM, TinyLlama", "mistral": "Mistral",
            "qwen2": "Qwen2, Qwen2.5", "qwen3": "Qwen3 (dense)"}
#: The Llama-3.x RoPE scaling constants megatron-core's RotaryEmbedding hard-codes
#: (rotary_pos_embedding.py ``_apply_scaling``); only the factor is a GPTModel argument.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


def _rope(hf: dict[str, Any]) -> tuple[float, bool, float]:
    """(rope_theta, rope_scaling, rope_scaling_factor) from ``rope_parameters`` (transformers 5)
    or the older ``rope_scaling`` + ``rope_theta``; refuses what megatron-core cannot compute."""
    theta = float((hf.get("rope_parameters") or {}).get("rope_theta",
                                                         hf.get("rope_theta", 10000.0)))
    scaled = [(key, hf[key]) for key in ("rope_parameters", "rope_scaling") if hf.get(key)
              and hf[key].get("rope_type", hf[key].get("type", "default")) != "default"]
    if not scaled:
        return theta, False, 8.0
    key, params = scaled[0]
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type != "llama3":
        raise ConversionError(
            f"{key}.rope_type {rope_type!r} is not supported: megatron-core's GPTModel implements "
            "plain RoPE and Llama-3.x ('llama3') scaling only; use a model without it (or one "
            "fine-tuned to plain RoPE)")
    for field, want in LLAMA3_ROPE_CONSTANTS.items():
        if field in params and float(params[field]) != want:
            raise ConversionError(
                f"{key}.{field} is {params[field]} but megatron-core's Llama-3 RoPE scaling "
                f"hard-codes {want} (low_freq_factor 1, high_freq_factor 4, "
                "original_max_position_embeddings 8192, as every Llama 3.1-3.3 release); "
                "this model's scaling cannot be reproduced")
    if "factor" not in params:
        raise ConversionError(f"{key} has rope_type 'llama3' but no 'factor'; config.json is "
                              "incomplete")
    return theta, True, float(params["factor"])


def _sliding_window(hf: dict[str, Any]) -> Optional[int]:
    """The attention window some layers use, or None when all attention is full."""
    window = hf.get("sliding_window")
    if not window:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if hf.get("model_type") in ("qwen2", "qwen3"):  # transformers' rule without layer_types
        used = hf.get("use_sliding_window", False) and \
            hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]
        return int(window) if used else None
    return int(window)  # mistral: every layer


def _biases(hf: dict[str, Any], family: str) -> tuple[bool, bool]:
    """(add_bias_linear, add_qkv_bias); refuses bias patterns megatron-core cannot express."""
    if family == "qwen2":
        return False, True  # q/k/v always biased, o_proj and MLP never
    attn = bool(hf.get("attention_bias", False))
    mlp = bool(hf.get("mlp_bias", False)) if family == "llama" else False
    if attn != mlp:
        raise ConversionError(
            f"attention_bias={attn} but {'mlp_bias' if family == 'llama' else 'the MLP'} has "
            f"{'a bias' if mlp else 'none'}: megatron-core puts biases on all linears "
            "(add_bias_linear) or on q/k/v only (add_qkv_bias), not on the attention output "
            "projection alone; such a model cannot be converted exactly")
    return attn, False


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a ``config.json`` dict of a supported family (``FAMILIES``)."""
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    family = spd_hf.base_model_type(hf.get("model_type", "llama"))  # SPD exports: spd_hf.py
    if family not in FAMILIES:
        raise ConversionError(
            f"model_type {family!r} ({arch}) is not supported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items()))
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {hf['hidden_act']!r} is not supported; these "
                              "families use silu (SwiGLU)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    theta, scaling, factor = _rope(hf)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"partial_rotary_factor {hf['partial_rotary_factor']} is not "
                              "supported (RoPE on every head dimension only)")
    add_bias_linear, add_qkv_bias = _biases(hf, family)
    window = _sliding_window(hf)
    max_len = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_length=min(max_len, window) if window else max_len, rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), normalization="RMSNorm",
        activation="swiglu", add_bias_linear=add_bias_linear,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        add_qkv_bias=add_qkv_bias, qk_layernorm=family == "qwen3",
        rope_scaling=scaling, rope_scaling_factor=factor, sliding_window=window)


_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_family(cfg: ModelConfig) -> str:
    """The HF ``model_type`` that expresses ``cfg`` exactly (a clear error if none does)."""
    if cfg.normalization != "RMSNorm" or cfg.activation != "swiglu" \
            or cfg.position_embedding_type != "rope":
        raise ConversionError("only LLaMA-style models (RMSNorm, SwiGLU, RoPE) export to Hugging "
                              f"Face format; this one has {cfg.normalization}, {cfg.activation}, "
                              f"{cfg.position_embedding_type}")
    if cfg.qk_layernorm:
        family, ok = "qwen3", not cfg.qkv_bias
    elif cfg.add_qkv_bias and not cfg.add_bias_linear:
        family, ok = "qwen2", True
    elif cfg.sliding_window is not None:
        family, ok = "mistral", not cfg.qkv_bias
    else:
        family, ok = "llama", True
    if not ok:
        raise ConversionError(
            f"no Hugging Face architecture has this combination (qk_layernorm={cfg.qk_layernorm},"
            f" add_bias_linear={cfg.add_bias_linear}, add_qkv_bias={cfg.add_qkv_bias}, "
            f"sliding_window={cfg.sliding_window}); export to a megatron-spd checkpoint instead")
    return family


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: str = "float32",
                                bos_id: Optional[int] = None,
                                eos_id: Optional[int] = None) -> dict[str, Any]:
    """A config.json dict for ``cfg`` in the family ``hf_family`` picks (readable by HF
    transformers 4.x and 5.x: RoPE scaling in the ``rope_scaling`` form both accept)."""
    family = hf_family(cfg)
    out: dict[str, Any] = {
        "architectures": [_HF_CLASSES[family]], "model_type": family,
        "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_length, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings, "torch_dtype": dtype,
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    if family == "llama":
        out.update(attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
    if family == "qwen3":
        out["attention_bias"] = False
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=0)
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                               **LLAMA3_ROPE_CONSTANTS}
    return out


# ----- tensors ----------------------------------------------------------------------------------

def _take(sd: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"{source}: tensor {key!r} is missing; the weights do not match "
                              "config.json (wrong config, or a truncated/partial checkpoint)")
    return sd.pop(key)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(t.shape) != shape:
        raise ConversionError(f"{source}: {name} has shape {tuple(t.shape)} but config.json "
                              f"implies {shape}; the config does not match the weights")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> megatron rows [q_g | k_g | v_g] per group."""
    ng, hd = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    qs = q.reshape(ng, per * hd, *q.shape[1:])
    ks = k.reshape(ng, hd, *k.shape[1:])
    vs = v.reshape(ng, hd, *v.shape[1:])
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of ``fuse_qkv``."""
    ng, hd = cfg.num_query_groups, cfg.head_dim
    per = cfg.num_attention_heads // ng
    g = qkv.reshape(ng, (per + 2) * hd, *qkv.shape[1:])
    q, k, v = g.split([per * hd, hd, hd], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]),
            v.reshape(-1, *qkv.shape[1:]))


def _layer_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(megatron suffix, HF suffix) pairs that are copied one to one within a layer."""
    pairs = [("input_layernorm.weight", "input_layernorm.weight"),
             ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
             ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
             ("mlp.linear_fc2.weight", "mlp.down_proj.weight")]
    if cfg.qk_layernorm:  # per-head norms over head_dim, the same tensor in both layouts
        pairs += [("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
                  ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight")]
    if cfg.add_bias_linear:
        pairs += [("self_attention.linear_proj.bias", "self_attn.o_proj.bias"),
                  ("mlp.linear_fc2.bias", "mlp.down_proj.bias")]
    return pairs


def _suffixes(bias: bool) -> list[str]:
    return ["weight", "bias"] if bias else ["weight"]


def hf_to_full(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, *,
               source: str = "checkpoint") -> FullStateDict:
    """HF tensors -> full megatron state dict (fp32). Every HF tensor must be used."""
    sd = dict(hf_sd)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # some exporters store the tied copy too
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        sd.pop(k)  # a buffer older checkpoints carry; megatron recomputes it from rope_theta
    h, hd = cfg.hidden_size, cfg.head_dim
    out: FullStateDict = {spd_hf.to_full_name(k): sd.pop(k)  # SPD exports' compensation
                          for k in [k for k in sd if spd_hf.COMPENSATION in k]}
    out["embedding.word_embeddings.weight"] = _take(sd, "model.embed_tokens.weight", source)
    _check_shape("model.embed_tokens.weight", out["embedding.word_embeddings.weight"],
                 (cfg.vocab_size, h), source)
    for i in range(cfg.num_layers):
        m, p = L.format(i=i), HF.format(i=i)
        for ms, hs in _layer_map(cfg):
            out[m + ms] = _take(sd, p + hs, source)
        for s in _suffixes(cfg.qkv_bias):
            q, k, v = (_take(sd, f"{p}self_attn.{x}_proj.{s}", source) for x in "qkv")
            _check_shape(f"{p}self_attn.q_proj.{s}", q,
                         (cfg.num_attention_heads * hd,) + ((h,) if s == "weight" else ()), source)
            for x, t in (("k", k), ("v", v)):
                _check_shape(f"{p}self_attn.{x}_proj.{s}", t,
                             (cfg.num_query_groups * hd,) + ((h,) if s == "weight" else ()), source)
            out[f"{m}self_attention.linear_qkv.{s}"] = fuse_qkv(q, k, v, cfg)
        for s in _suffixes(cfg.add_bias_linear):
            gate, up = (_take(sd, f"{p}mlp.{x}_proj.{s}", source) for x in ("gate", "up"))
            for x, t in (("gate", gate), ("up", up)):
                _check_shape(f"{p}mlp.{x}_proj.{s}", t,
                             (cfg.ffn_hidden_size,) + ((h,) if s == "weight" else ()), source)
            out[f"{m}mlp.linear_fc1.{s}"] = torch.cat([gate, up], 0)
    out["decoder.final_layernorm.weight"] = _take(sd, "model.norm.weight", source)
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _take(sd, "lm_head.weight", source)
    if sd:
        extra = sorted(sd)
        raise ConversionError(f"{source}: {len(extra)} tensors not used by a {cfg.num_layers}-layer "
                              f"model of this config, e.g. {extra[:4]}; config.json does not "
                              "match the weights (num_hidden_layers? tie_word_embeddings?)")
    return {k: v.float().contiguous() for k, v in out.items()}


def full_to_hf(full: FullStateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``hf_to_full`` (tied models get no lm_head.weight, as HF saves them)."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight":
                                    full["embedding.word_embeddings.weight"]}
    out.update({spd_hf.to_hf_name(k): v for k, v in full.items() if spd_hf.COMPENSATION in k})
    for i in range(cfg.num_layers):
        m, p = L.format(i=i), HF.format(i=i)
        for ms, hs in _layer_map(cfg):
            out[p + hs] = full[m + ms]
        for s in _suffixes(cfg.qkv_bias):
            q, k, v = split_qkv(full[f"{m}self_attention.linear_qkv.{s}"], cfg)
            out[f"{p}self_attn.q_proj.{s}"], out[f"{p}self_attn.k_proj.{s}"], \
                out[f"{p}self_attn.v_proj.{s}"] = q, k, v
        for s in _suffixes(cfg.add_bias_linear):
            gate, up = full[f"{m}mlp.linear_fc1.{s}"].chunk(2, 0)
            out[f"{p}mlp.gate_proj.{s}"], out[f"{p}mlp.up_proj.{s}"] = gate, up
    out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = full["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ----- directories ------------------------------------------------------------------------------

def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or the shards listed in its index."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a safetensors shard index", ConversionError
                                      ).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index} has no 'weight_map'; re-download the model")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{directory}: no *.safetensors files; a Hugging Face model "
                              "directory needs model.safetensors (convert .bin files first)")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ConversionError(f"{path} is listed in the shard index but missing; the download"
                                  " is incomplete")
        try:
            sd.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path} is corrupt or truncated ({e}); re-download or "
                                  "re-convert it") from None
    return sd


def load_hf(directory: str | Path) -> tuple[ModelConfig, FullStateDict]:
    """ModelConfig and full megatron state dict from a Hugging Face model directory (an SPD
    export's plan: ``hf_plan``)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{directory} has no config.json; pass a Hugging Face model "
                              "directory (config.json + *.safetensors + tokenizer)")
    hf = read_json_object(cfg_path, "a Hugging Face model config (re-download or re-convert "
                                    "the model)", ConversionError)
    try:
        cfg = model_config_from_hf(hf)
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_path} is incomplete or malformed ({type(e).__name__}: "
                              f"{e}); re-download or re-convert the model") from None
    return cfg, hf_to_full(read_safetensors_dir(directory), cfg, source=str(directory))


def hf_plan(directory: str | Path):
    """The SPD plan an exported directory's config.json carries (spd_hf.py), or None."""
    path = Path(directory) / "config.json"
    return spd_hf.plan_of(read_json_object(path, "a Hugging Face model config", ConversionError),
                          str(path))


def save_hf(directory: str | Path, cfg: ModelConfig, full: FullStateDict, tokenizer=None, *,
            dtype: torch.dtype = torch.float32, plan=None) -> None:
    """Write config.json, model.safetensors and the tokenizer files into ``directory`` (which
    the caller makes atomic by writing to a temporary directory first). A ``plan`` with SPD
    blocks makes it an SPD directory (spd_hf.py: transformers refuses it, vLLM serves it)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_sd = {k: v.to(dtype).contiguous() for k, v in full_to_hf(full, cfg).items()}
    save_file(hf_sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    bos = eos = None
    if tokenizer is not None:
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        tokenizer.save(directory)
        atomic_write_json(directory / "tokenizer_config.json", _tokenizer_config(tokenizer))
    hf = hf_config_from_model_config(cfg, dtype=str(dtype).removeprefix("torch."), bos_id=bos,
                                     eos_id=eos)
    atomic_write_json(directory / "config.json", hf if plan is None else spd_hf.with_plan(hf, plan))


def _tokenizer_config(tok) -> dict[str, Any]:
    def content(i: Optional[int]) -> Optional[str]:
        if i is None:
            return None
        return tok.tok.id_to_token(i) if hasattr(tok, "tok") else tok.sp.id_to_piece(i)
    return {"add_bos_token": tok.add_bos, "add_eos_token": False,
            "bos_token": content(tok.bos_id), "eos_token": content(tok.eos_id)}
