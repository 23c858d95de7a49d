"""The ``args`` of a Megatron-LM checkpoint: ModelConfig and SPDPlan to and from them.

Megatron-LM stores its parsed command line (an ``argparse.Namespace``) in every checkpoint's
``common.pt``; ``load_args_from_checkpoint`` (``--use-checkpoint-args``) and
``check_checkpoint_args`` read the model shape back from it (megatron/training/checkpointing.py
at core_v0.16.1). Our checkpoints carry the same namespace, so Megatron-LM reads them as its
own, and we read Megatron-LM's with the inverse mapping. The SPD plan travels inline as JSON
(``spd_plan_json``), the way Megatron-LM stores ``heterogeneous_layers_config_encoded_json``.

``MODEL_FIELDS`` is the whole mapping: one line per ModelConfig field (a test fails when a field has
none). Arguments the SPD model cannot express are refused by ``_UNSUPPORTED`` when reading.
``transformer_impl`` is not one of them: a ``transformer_engine`` run stores its weights under
the same sharded keys as the local spec (tests/test_te_checkpoint.py), so its checkpoint reads
as any other; ours always say ``local``, which SPD blocks need in Megatron-LM.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any, Callable, Optional

import torch

from ..core.config import ModelConfig
from ..core.plan import SPDPlan

#: The argument holding the plan inline (JSON); ``--spd-plan`` (a path) sets it in Megatron-LM.
PLAN_ARG = "spd_plan_json"
#: Where Megatron-LM runs record the dense origin of SPD weights (megatron_lm.resolve_plan), so
#: their saves keep it (our own checkpoints keep it in spd_checkpoint.json).
DENSE_SOURCE_ARG = "spd_dense_source"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version

# Megatron-LM's defaults (arguments.py) for arguments an older checkpoint may lack.
_DEFAULTS: dict[str, Any] = {
    "group_query_attention": False, "num_query_groups": None, "ffn_hidden_size": None,
    "kv_channels": None, "normalization": "LayerNorm", "norm_epsilon": 1e-5, "swiglu": False,
    "squared_relu": False, "add_bias_linear": True, "add_qkv_bias": False,
    "untie_embeddings_and_output_weights": False, "position_embedding_type": "learned_absolute",
    "rotary_base": 10000, "rotary_percent": 1.0, "rotary_interleaved": False,
    "apply_layernorm_1p": False, "qk_layernorm": False, "num_experts": None,
    "multi_latent_attention": False, "use_rope_scaling": False, "rope_scaling_factor": 8.0,
    "spd_sliding_window": None, "window_size": None, "mtp_num_layers": None,
    "softmax_type": "vanilla", "qk_l2_norm": False, "attention_output_gate": False,
    "no_rope_freq": None, "apply_residual_connection_post_layernorm": False,
    "use_mup": False,
    "heterogeneous_layers_config_encoded_json": None, "is_hybrid_model": False,
    "experimental_attention_variant": None, "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1, PLAN_ARG: None,
}


def _arg(args: argparse.Namespace, name: str) -> Any:
    if hasattr(args, name):
        return getattr(args, name)
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    raise KeyError(name)


def _same(arg: str, field: Optional[str] = None) -> tuple[Callable, Callable]:
    """A field stored under one argument unchanged (``field`` defaults to ``arg``)."""
    return (lambda c: {arg: getattr(c, field or arg)}, lambda a: _arg(a, arg))


def _kv_channels(args: argparse.Namespace) -> Optional[int]:
    """ModelConfig.kv_channels: None when it is hidden/heads (Megatron-LM's default too)."""
    kv = _arg(args, "kv_channels")
    return None if kv is None or kv * args.num_attention_heads == args.hidden_size else int(kv)


# ModelConfig field -> (config -> {argument: value}, args -> field value)
MODEL_FIELDS: dict[str, tuple[Callable, Callable]] = {
    "num_layers": _same("num_layers"),
    "hidden_size": _same("hidden_size"),
    "num_attention_heads": _same("num_attention_heads"),
    "num_query_groups": (
        lambda c: {"num_query_groups": c.num_query_groups,
                   "group_query_attention": c.num_query_groups != c.num_attention_heads},
        lambda a: _arg(a, "num_query_groups") if _arg(a, "group_query_attention")
        else a.num_attention_heads),
    "ffn_hidden_size": (lambda c: {"ffn_hidden_size": c.ffn_hidden_size},
                        lambda a: _arg(a, "ffn_hidden_size") or 4 * a.hidden_size),
    "vocab_size": _same("padded_vocab_size", "vocab_size"),
    "max_seq_length": _same("max_position_embeddings", "max_seq_length"),
    "rope_theta": (lambda c: {"rotary_base": c.rope_theta},
                   lambda a: float(_arg(a, "rotary_base"))),
    # --norm-epsilon's dest: layernorm_epsilon from Megatron-LM core_v0.16.0 on (the
    # TransformerConfig field, transformer_config.py), norm_epsilon up to core_v0.15.x
    # (arguments.py); both are written, the newer name is read first
    "norm_eps": (lambda c: {"layernorm_epsilon": c.norm_eps, "norm_epsilon": c.norm_eps},
                 lambda a: float(getattr(a, "layernorm_epsilon", None)
                                 or _arg(a, "norm_epsilon"))),
    "normalization": _same("normalization"),
    "activation": (lambda c: {"swiglu": c.activation == "swiglu"},
                   lambda a: "swiglu" if _arg(a, "swiglu") else "gelu"),
    "add_bias_linear": _same("add_bias_linear"),
    # Megatron-LM sets add_qkv_bias whenever add_bias_linear (arguments.py); ours means q/k/v only
    "add_qkv_bias": (lambda c: {"add_qkv_bias": c.qkv_bias},
                     lambda a: bool(_arg(a, "add_qkv_bias")) and not _arg(a, "add_bias_linear")),
    "kv_channels": (lambda c: {"kv_channels": c.head_dim}, lambda a: _kv_channels(a)),
    "qk_layernorm": _same("qk_layernorm"),
    "rope_scaling": _same("use_rope_scaling", "rope_scaling"),
    "rope_scaling_factor": _same("rope_scaling_factor"),
    # no Megatron-LM equivalent for local attention (--window-size is TE's): ours, like the plan
    "sliding_window": _same("spd_sliding_window", "sliding_window"),
    "tie_word_embeddings": (
        lambda c: {"untie_embeddings_and_output_weights": not c.tie_word_embeddings},
        lambda a: not _arg(a, "untie_embeddings_and_output_weights")),
    "position_embedding_type": (
        lambda c: {"position_embedding_type": c.position_embedding_type,
                   "use_rotary_position_embeddings": c.position_embedding_type == "rope"},
        lambda a: _arg(a, "position_embedding_type")),
}

# (argument, is it acceptable?, what to say): settings an SPD model built from ModelConfig
# cannot reproduce; reading such a checkpoint is refused rather than converted wrongly.
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("num_experts", lambda v: not v, "MoE models are not supported"),
    ("multi_latent_attention", lambda v: not v, "multi-latent attention is not supported"),
    ("squared_relu", lambda v: not v, "squared-ReLU MLPs are not supported"),
    ("apply_layernorm_1p", lambda v: not v, "--apply-layernorm-1p is not supported"),
    ("rotary_percent", lambda v: v == 1.0, "partial rotary embeddings are not supported"),
    ("rotary_interleaved", lambda v: not v, "interleaved rotary embeddings are not supported"),
    ("mtp_num_layers", lambda v: not v, "multi-token prediction is not supported"),
    ("is_hybrid_model", lambda v: not v, "hybrid (Mamba) models are not supported"),
    ("heterogeneous_layers_config_encoded_json", lambda v: not v,
     "heterogeneous layer configs are not supported"),
    ("experimental_attention_variant", lambda v: not v,
     "experimental attention variants are not supported"),
    # --window-size: sliding-window attention of a (Transformer Engine) run; our sliding window
    # is spd_sliding_window only, so reading it as full attention would change the model
    ("window_size", lambda v: v is None,
     "--window-size sliding-window attention is not supported"),
    # TransformerConfig fields Megatron-LM 0.19 turns into arguments (its args groups are built
    # from the dataclass; training.py reads args.attention_output_gate): each changes the model
    ("softmax_type", lambda v: v == "vanilla",
     "only the vanilla softmax is supported (--softmax-type)"),
    ("qk_l2_norm", lambda v: not v, "--qk-l2-norm is not supported"),
    ("attention_output_gate", lambda v: not v, "--attention-output-gate is not supported"),
    ("no_rope_freq", lambda v: not v, "--no-rope-freq (NoPE layers) is not supported"),
    ("apply_residual_connection_post_layernorm", lambda v: not v,
     "--apply-residual-connection-post-layernorm is not supported"),
    ("use_mup", lambda v: not v, "muP scaling (--use-mup) is not supported"),
    ("position_embedding_type", lambda v: v in ("rope", "learned_absolute"),
     "only rope and learned_absolute position embeddings are supported"),
)


def args_from_config(cfg: ModelConfig, plan: Optional[SPDPlan], *, tp: int,
                     tokenizer_type: Optional[str] = None,
                     tokenizer_model: Optional[str] = None) -> argparse.Namespace:
    """The args namespace Megatron-LM would have saved for this model at TP degree ``tp``,
    with the plan inline. Model-only checkpoint: no optimizer or RNG state (``no_save_*``)."""
    out: dict[str, Any] = {}
    for write, _ in MODEL_FIELDS.values():
        out.update(write(cfg))
    out.update(
        seq_length=cfg.max_seq_length, add_position_embedding=True,
        rotary_percent=1.0, rotary_interleaved=False, squared_relu=False,
        apply_layernorm_1p=False, make_vocab_size_divisible_by=128, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        world_size=tp, data_parallel_size=1, data_parallel_random_init=False,
        ckpt_format="torch_dist", use_dist_ckpt=True, transformer_impl="local",
        no_save_optim=True, no_save_rng=True, consumed_train_samples=0,
        consumed_valid_samples=0, iteration=0, tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model, spd_plan=None,
        **{PLAN_ARG: None if plan is None else plan_json(plan)})
    return argparse.Namespace(**out)


class SPDPlanJSON(str):
    """The inline plan of a model with SPD blocks: a str to everything that reads it, but a class
    of its own in the checkpoint's pickle, so that Megatron-LM without megatron-spd's patch
    refuses the checkpoint instead of loading it as a dense model (its weights have the stock
    names, so they would load, and every SPD block would silently regain its all-reduce).

    megatron-core reads the common state (``common.pt`` or 0.19's embedded one) with
    ``torch.load(weights_only=True)`` (dist_checkpointing/strategies/common.py ``load_common``,
    serialization.py ``load_common_state_dict``), which refuses every class not registered as a
    safe global: unpatched Megatron-LM never imports this package and stops at its first read of
    the checkpoint (``--use-checkpoint-args``, ``--load``, ``--finetune``, the server alike) with
    "Unsupported global: GLOBAL megatron_spd.checkpoint.args.SPDPlanJSON". Importing this module
    registers it: our tools and the patched Megatron-LM (whose argument parsing imports
    megatron_spd.integrations.megatron_lm before any checkpoint is read) load it. A plan without SPD blocks
    stays a plain str: the dense model it describes loads anywhere."""


torch.serialization.add_safe_globals([SPDPlanJSON])


def plan_json(plan: SPDPlan) -> str:
    """The inline form of a plan (compact JSON; the same plan always gives the same text),
    an ``SPDPlanJSON`` when the plan has SPD blocks."""
    text = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return SPDPlanJSON(text) if plan.spd_blocks else text


def config_from_args(args: argparse.Namespace, source: str) -> ModelConfig:
    """ModelConfig of a checkpoint's args; ValueError naming any setting it cannot express."""
    problems = [f"{msg} ({name}={_arg(args, name)!r})" for name, ok, msg in _UNSUPPORTED
                if not ok(_arg(args, name))]
    try:
        values = {name: read(args) for name, (_, read) in MODEL_FIELDS.items()}
    except (KeyError, AttributeError) as e:
        raise ValueError(f"{source}: the checkpoint args lack {e}; it is not a complete "
                         "Megatron-LM GPT checkpoint") from None
    if problems:
        raise ValueError(f"{source}: megatron-spd cannot open this model: " + "; ".join(problems))
    return ModelConfig(**values)


def plan_from_args(args: argparse.Namespace, source: str) -> Optional[SPDPlan]:
    """The inline plan, or None when the checkpoint carries none (a dense Megatron-LM model)."""
    text = _arg(args, PLAN_ARG)
    if not text:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: args.{PLAN_ARG} is not valid JSON ({e})") from None
    return SPDPlan.from_dict(d, source=f"{source} (args.{PLAN_ARG})")


def unmapped_config_fields() -> list[str]:
    """ModelConfig fields without an args mapping (must be empty: tests check it)."""
    return [f.name for f in fields(ModelConfig) if f.name not in MODEL_FIELDS]
