"""megatron-core ``dist_checkpointing`` tensors -> the full (TP=1) state dict, without a model.

A dist checkpoint stores each tensor globally under its *sharded* key: layers stacked on a
leading dimension (``decoder.layers.self_attention.linear_qkv.weight`` is [L, ...]) and the
norms under Transformer Engine names (``...linear_qkv.layer_norm_weight`` is the input norm).
Reading the global tensors and undoing those two renamings gives the full state dict, so a
checkpoint can be exported (e.g. to Hugging Face) or inspected at any TP without building a model.
Only the model's tensors are read: a Megatron-LM checkpoint's optimizer state stays on disk.
Parameters only some layers have (SPD compensation, compensation.py) are stored per layer
(``decoder.layers.<i>.<name>``) and read back as they are; ``extra_shapes`` says which to expect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from ..core.config import FullStateDict, ModelConfig
from .hf import ConversionError
from .safe_load import UnsafePickleError

# sharded-key suffix (under decoder.layers.) -> per-layer state-dict suffix
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
_TE_NAMES = {plain: te for te, plain in _TE_NORMS.items()}
_STACKED = "decoder.layers."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the full state dict of ``cfg`` (docs/dev-api.md)."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hd
    fc1 = (2 if cfg.gated else 1) * f
    ln = cfg.normalization == "LayerNorm"
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    if cfg.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = (cfg.max_seq_length, h)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
                 "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * hd),
                 "pre_mlp_layernorm.weight": (h,), "mlp.linear_fc1.weight": (fc1, h),
                 "mlp.linear_fc2.weight": (h, f)}
        if ln:
            layer.update({"input_layernorm.bias": (h,), "pre_mlp_layernorm.bias": (h,)})
        if cfg.qk_layernorm:
            for n in ("q_layernorm", "k_layernorm"):
                layer[f"self_attention.{n}.weight"] = (hd,)
                if ln:
                    layer[f"self_attention.{n}.bias"] = (hd,)
        if cfg.qkv_bias:
            layer["self_attention.linear_qkv.bias"] = (qkv,)
        if cfg.add_bias_linear:
            layer.update({"self_attention.linear_proj.bias": (h,),
                          "mlp.linear_fc1.bias": (fc1,), "mlp.linear_fc2.bias": (h,)})
        out.update({p + k: v for k, v in layer.items()})
    out["decoder.final_layernorm.weight"] = (h,)
    if ln:
        out["decoder.final_layernorm.bias"] = (h,)
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = (cfg.vocab_size, h)
    return out


def check_full(full: FullStateDict, cfg: ModelConfig, source: str,
               extra_shapes: Optional[dict[str, tuple[int, ...]]] = None) -> None:
    """Raise ConversionError unless ``full`` has exactly the names and shapes ``cfg`` implies
    (plus ``extra_shapes``, e.g. the plan's compensation)."""
    want = {**expected_shapes(cfg), **(extra_shapes or {})}
    missing, extra = sorted(set(want) - set(full)), sorted(set(full) - set(want))
    if missing or extra:
        raise ConversionError(f"{source}: the weights do not match the model config: missing "
                              f"{missing[:3]}, unexpected {extra[:3]} (num_layers? tied "
                              "embeddings?)")
    for k, shape in want.items():
        if tuple(full[k].shape) != shape:
            raise ConversionError(f"{source}: {k} has shape {tuple(full[k].shape)} but the model "
                                  f"config implies {shape}; the config does not match the weights")


def sharded_key(full_key: str) -> str:
    """The dist_checkpointing key a full-state-dict entry is stored under (layers stacked)."""
    if not full_key.startswith(_STACKED):
        return full_key
    suffix = full_key[len(_STACKED):].split(".", 1)[1]
    return _STACKED + _TE_NAMES.get(suffix, suffix)


def read_global_tensors(weights_dir: str | Path,
                        keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Tensors of a dist_checkpointing (torch_dist) directory at their global shape (all, or
    ``keys``), read with torch.distributed.checkpoint's single-process path: no process group,
    nothing collective, so one rank of a running job may call it alone."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(weights_dir))
    try:
        meta = reader.read_metadata()
        stored = {k: v for k, v in meta.state_dict_metadata.items()
                  if isinstance(v, TensorStorageMetadata)}
        wanted = stored if keys is None else {k: None for k in keys}
        missing = sorted(set(wanted) - set(stored))
        if missing:
            raise ConversionError(f"{weights_dir} lacks the tensors {missing[:3]}"
                                  f"{'...' if len(missing) > 3 else ''}; the weights do not "
                                  "match the model config (num_layers? tied embeddings?)")
        plain = {k: torch.empty(stored[k].size, dtype=stored[k].properties.dtype)
                 for k in wanted}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no_dist|.*single process")  # intended
            dcp.load(plain, storage_reader=reader, no_dist=True)
    except (ConversionError, UnsafePickleError):
        raise
    except (Exception, CheckpointException) as e:
        raise ConversionError(f"{weights_dir} could not be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); a weight file is corrupt or missing") from e
    return plain


def mcore_plain_to_full(weights_dir: str | Path, cfg: ModelConfig,
                        extra_shapes: Optional[dict[str, tuple[int, ...]]] = None) -> FullStateDict:
    """The full state dict of ``cfg`` (and the per-layer ``extra_shapes`` entries) stored in a
    dist_checkpointing directory, checked against them; other tensors there (a Megatron-LM
    checkpoint's optimizer state) are not read."""
    keys = {sharded_key(k) for k in expected_shapes(cfg)} | set(extra_shapes or {})
    plain = read_global_tensors(weights_dir, sorted(keys))
    full: FullStateDict = {}
    for key in list(plain):
        t = plain.pop(key)  # free each stacked tensor once it is split
        if key.startswith(_STACKED) and not key[len(_STACKED)].isdigit():  # else per layer
            suffix = key[len(_STACKED):]
            suffix = _TE_NORMS.get(suffix, suffix)
            for i in range(t.shape[0]):
                full[f"{_STACKED}{i}.{suffix}"] = t[i].float().clone()
        else:
            full[key] = t.float()
    check_full(full, cfg, str(weights_dir), extra_shapes)
    return full
