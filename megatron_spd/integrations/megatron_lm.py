"""Glue for Megatron-LM's own scripts (``pretrain_gpt.py``, the text generation server),
called by the patch in patches/.

- ``add_arguments``: ``--spd-plan PLAN.json`` and the inline form ``--spd-plan-json`` that
  checkpoints carry (both scripts' ``extra_args_provider``).
- ``resolve_plan``: the run's plan, from ``--spd-plan`` or restored from the checkpoint being
  loaded (``--load``, ``--pretrained-checkpoint``, or ``--use-checkpoint-args``); a checkpoint with
  SPD blocks and another plan is refused. The plan is put inline in ``args.spd_plan_json``, so
  every checkpoint Megatron-LM saves carries it. Settings SPD blocks cannot honour are refused.
- ``layer_spec``: the per-block layer specs of the plan (gpt_builders.py).
- ``configure_model``: the same plus the gradient hook on the ``GPTModelConfig`` that
  Megatron-LM core_v0.19+ ``pretrain_gpt.py`` builds its model from.
- ``check_checkpoint_plan``: part of Megatron-LM's ``check_checkpoint_args``.
- ``restore_checkpoint_args``: the end of Megatron-LM's ``load_args_from_checkpoint``
  (``--use-checkpoint-args``): the plan and the model arguments it does not restore itself
  (``RESTORED_ARGS``), and the tokenizer path relative to the checkpoint.
- ``check_architecture`` (called by ``resolve_plan``): every model field the spec builds, from
  the checkpoint being loaded against this run's arguments; a difference is refused naming the
  flag, before any weight is read (Megatron-LM would otherwise build another model and either
  load the weights into it silently or fail deep in torch.distributed.checkpoint).
- ``wrap_finalize``: megatron's ``finalize_model_grads`` followed by the TP sum of the gradients
  SPD blocks leave partial per rank (training.py; design.md 3). Without it the replicated norm
  weights of SPD blocks drift apart across TP ranks (with --sequence-parallel megatron's own
  finalize already covers them and the extra reduction finds nothing to do).
Nothing here imports Megatron-LM's ``megatron.training``: it receives ``args`` objects.

What ``resolve_plan`` has to say it logs as WARNING, on global rank 0 only: these hooks run
inside Megatron-LM's processes, where the command line of this package (which sets up logging
with its rank-0 filter) never runs; an unconfigured process still shows warnings on stderr
(logging's last-resort handler).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Optional

from ..checkpoint.args import DENSE_SOURCE_ARG, MODEL_FIELDS, PLAN_ARG, plan_from_args, plan_json
from ..checkpoint.layout import CheckpointError
from ..checkpoint.read import read_args, tokenizer_path
from ..core.grads import reduce_tp_partial_grads
from ..core.plan import PlanError, SPDPlan
from ..core.spec import block_spec
from ..loading.open_model import unrecovered_note
from ..loading.sources import dense_origin
from ..parallel.distributed import is_rank0

log = logging.getLogger(__name__)

# what makes two plans build different models (the rest is provenance)
_STRUCTURAL_KEYS = ("groups", "strategies", "compensation")

#: Model arguments that Megatron-LM's ``load_args_from_checkpoint`` does not restore (checked at
#: core_v0.16.1, core_v0.17.1, core_v0.19.0 and main d98e8a64) although megatron-core builds the
#: model from them: without these a --use-checkpoint-args run builds another model.
RESTORED_ARGS = (PLAN_ARG, DENSE_SOURCE_ARG, "qk_layernorm", "layernorm_epsilon",
                 "use_rope_scaling", "rope_scaling_factor", "spd_sliding_window")

# ModelConfig field -> the Megatron-LM flag that sets it (check_architecture's messages)
_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--group-query-attention --num-query-groups",
    "ffn_hidden_size": "--ffn-hidden-size",
    "vocab_size": "the tokenizer / --make-vocab-size-divisible-by (padded vocabulary)",
    "max_seq_length": "--max-position-embeddings", "rope_theta": "--rotary-base",
    "norm_eps": "--norm-epsilon", "normalization": "--normalization", "activation": "--swiglu",
    "add_bias_linear": "--disable-bias-linear", "add_qkv_bias": "--add-qkv-bias",
    "kv_channels": "--kv-channels", "qk_layernorm": "--qk-layernorm",
    "rope_scaling": "--use-rope-scaling", "rope_scaling_factor": "--rope-scaling-factor",
    "sliding_window": "--use-checkpoint-args (spd_sliding_window has no flag)",
    "tie_word_embeddings": "--untie-embeddings-and-output-weights",
    "position_embedding_type": "--position-embedding-type",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="megatron-spd")
    group.add_argument("--spd-plan", type=str, default=None,
                       help="megatron-spd plan JSON: blocks it marks SPD drop their attention "
                            "all-reduce (needs --transformer-impl local). Without it, the plan "
                            "stored in the --load checkpoint is used")
    group.add_argument("--spd-plan-json", dest=PLAN_ARG, type=str, default=None,
                       help="the plan inline (JSON), as checkpoints store it; normally set from "
                            "--spd-plan or the checkpoint, not by hand")
    return parser


def _structure(plan: Optional[SPDPlan]) -> Optional[dict]:
    if plan is None or not plan.spd_blocks:
        return None  # no SPD block: the stock dense model
    d = plan.to_dict()
    return {k: d.get(k) for k in _STRUCTURAL_KEYS}


def _unsupported(args: Any) -> list[str]:
    """Settings under which SPD blocks would be dropped or built wrong; each names its fix."""
    checks = (
        (getattr(args, "use_legacy_models", False), "drop --use-legacy-models (SPD blocks are "
         "megatron-core layers)"),
        (getattr(args, "transformer_impl", "local") != "local",
         ("pass --transformer-impl local: SPD layers subclass megatron-core's local linears "
          "(SPD blocks on Transformer Engine linears are not built yet); a dense checkpoint "
          "trained with --transformer-impl transformer_engine loads under it as it is (both "
          "store the same sharded keys)")),
        (getattr(args, "spec", None) is not None, "drop --spec: the plan chooses the layer specs"),
        (getattr(args, "pipeline_model_parallel_size", 1) != 1,
         "pipeline parallelism is not supported: use --pipeline-model-parallel-size 1"),
        (getattr(args, "context_parallel_size", 1) != 1,
         "context parallelism is not supported: use --context-parallel-size 1"),
        (getattr(args, "num_experts", None), "MoE models are not supported (drop --num-experts)"),
        (getattr(args, "mtp_num_layers", None),
         "multi-token prediction is not supported (drop --mtp-num-layers)"),
        (getattr(args, "multi_latent_attention", False),
         "multi-latent attention is not supported (drop --multi-latent-attention)"),
        (getattr(args, "experimental_attention_variant", None) is not None,
         "experimental attention variants are not supported (drop "
         "--experimental-attention-variant)"),
        (getattr(args, "heterogeneous_layers_config_path", None) is not None
         or getattr(args, "heterogeneous_layers_config_encoded_json", None) is not None,
         "heterogeneous layer configs are not supported (drop "
         "--heterogeneous-layers-config-path)"),
    )
    return [fix for bad, fix in checks if bad]


def restore_checkpoint_args(args: Any, checkpoint_args: Any, load_dir: Optional[str]) -> None:
    """``--use-checkpoint-args``, completed: ``RESTORED_ARGS`` from the checkpoint, and a
    ``tokenizer_model`` stored relative to the checkpoint (our saves) made absolute."""
    for name in RESTORED_ARGS:
        if hasattr(checkpoint_args, name):
            setattr(args, name, getattr(checkpoint_args, name))
    if not hasattr(checkpoint_args, "layernorm_epsilon") and \
            hasattr(checkpoint_args, "norm_epsilon"):  # saved by Megatron-LM <= core_v0.15
        args.layernorm_epsilon = checkpoint_args.norm_epsilon
    if load_dir and getattr(args, "tokenizer_model", None):
        args.tokenizer_model = tokenizer_path(args, load_dir)


def check_architecture(checkpoint_args: Any, args: Any, where: str) -> None:
    """Refuse a run whose model arguments differ from those of the checkpoint it loads, naming
    each differing flag (one line). Fields a run may change are skipped: the position limit of
    RoPE models, the RoPE scaling factor while scaling is off, an unset vocabulary."""
    stored, run = {}, {}
    for name, (_, read) in MODEL_FIELDS.items():
        try:
            stored[name], run[name] = read(checkpoint_args), read(args)
        except (KeyError, AttributeError, TypeError):
            continue  # an argument this run or checkpoint lacks: Megatron-LM checks the shape
    skip = {"vocab_size"} if getattr(args, "padded_vocab_size", None) is None else set()
    if stored.get("position_embedding_type") == "rope":
        skip.add("max_seq_length")
    if not stored.get("rope_scaling") and not run.get("rope_scaling"):
        skip.add("rope_scaling_factor")
    diff = [f"{_FLAGS[k]} (checkpoint {stored[k]!r}, this run {run[k]!r})"
            for k in stored if k not in skip and stored[k] != run[k]]
    if diff:
        raise CheckpointError(f"{where} holds another model than these arguments build: "
                              + "; ".join(diff) + ". Pass --use-checkpoint-args, or set those "
                              "flags as the checkpoint has them")


def _checkpoint_plan(args: Any) -> tuple[Optional[SPDPlan], Optional[str], Optional[str]]:
    """The plan stored with the model this run starts from, where it was found, and that
    checkpoint's path; the checkpoint's model arguments are checked against the run's
    (``check_architecture``). Checkpoints megatron-spd cannot read (legacy 'torch' format)
    carry no plan: Megatron-LM loads them as before."""
    paths = [(flag, getattr(args, flag, None)) for flag in ("load", "pretrained_checkpoint")]
    for flag, path in paths:
        try:
            ckpt_args = read_args(path) if path else None
        except CheckpointError:
            ckpt_args = None
        if ckpt_args is not None:
            check_architecture(ckpt_args, args, f"--{flag.replace('_', '-')} {path}")
            if getattr(args, PLAN_ARG, None):  # restored by --use-checkpoint-args
                return plan_from_args(args, "--use-checkpoint-args"), "the checkpoint args", path
            return plan_from_args(ckpt_args, str(path)), f"--{flag.replace('_', '-')} {path}", \
                path
    if getattr(args, PLAN_ARG, None):
        return plan_from_args(args, "args"), "the checkpoint args", None
    return None, None, None


def resolve_plan(args: Any) -> Optional[SPDPlan]:
    """The plan this run builds (None: stock dense model), stored inline in ``args`` so that
    Megatron-LM's saves carry it. Raises PlanError for a plan that contradicts the checkpoint's
    or for settings SPD blocks cannot honour."""
    flag_plan = SPDPlan.load(args.spd_plan) if getattr(args, "spd_plan", None) else None
    stored, where, path = _checkpoint_plan(args)
    if flag_plan is not None and _structure(stored) not in (None, _structure(flag_plan)):
        raise PlanError(f"--spd-plan {args.spd_plan} differs from the plan stored in {where} "
                        f"(groups/strategies {_structure(stored)}); its weights were made for "
                        "that plan: drop --spd-plan to use it, or convert the checkpoint to "
                        "the new plan first (tools/convert_checkpoint.py --plan)")
    plan = flag_plan or stored
    if plan is not None and plan.spd_blocks:
        problems = _unsupported(args)
        if problems:
            raise PlanError("megatron-spd plan: " + "; ".join(problems))
        note = unrecovered_note(plan, stored, where or "random initialisation (nothing to load)")
        if is_rank0() and flag_plan is None:
            log.warning(f"[megatron-spd] SPD plan restored from {where}: SPD blocks "
                        f"{plan.spd_blocks}, G={plan.groups}")
        if is_rank0() and note:
            log.warning(f"[megatron-spd] {note}")
        if path is not None:  # saves of this run record it: the fine-tuning teacher
            setattr(args, DENSE_SOURCE_ARG, dense_origin(path))
    setattr(args, PLAN_ARG, None if plan is None else plan_json(plan))
    return plan


def layer_spec(args: Any, config) -> Any:
    """TransformerBlockSubmodules for the run's plan (set inline by ``resolve_plan``), checked
    against the model and TP degree."""
    plan = plan_from_args(args, "args")
    if plan is None:
        raise PlanError("layer_spec needs the run's plan: call resolve_plan(args) first")
    heads = config.num_attention_heads
    plan.validate_for(config.num_layers, heads, config.num_query_groups or heads,
                      config.ffn_hidden_size, config.tensor_model_parallel_size)
    return block_spec(config, plan)


def check_checkpoint_plan(checkpoint_args: Any, args: Any) -> None:
    """Refuse loading a checkpoint with SPD blocks into a model built with another (or no) plan
    (Megatron-LM's check_checkpoint_args)."""
    stored = plan_from_args(checkpoint_args, "the checkpoint")
    run = plan_from_args(args, "this run")
    if _structure(stored) not in (None, _structure(run)):
        raise PlanError(f"the checkpoint was saved with SPD plan {_structure(stored)} but this "
                        f"model was built with {_structure(run) or 'no SPD blocks'}; drop "
                        "--spd-plan (the checkpoint's plan is then used) or pass that plan")


def configure_model(args: Any, model_config: Any) -> Optional[SPDPlan]:
    """Megatron-LM core_v0.19+ ``pretrain_gpt.py``, which builds the model from a
    ``GPTModelConfig`` (megatron/training/models/gpt.py) instead of gpt_builders.py: with a plan
    that has SPD blocks, its ``transformer_layer_spec`` becomes the plan's per-block specs (the
    builder calls a callable spec with the model config) and its TransformerConfig carries the
    SPD gradient hook (training.py keeps a ``finalize_model_grads_func`` the builder set)."""
    from megatron.core.distributed import finalize_model_grads

    plan = resolve_plan(args)
    if plan is not None and plan.spd_blocks:
        model_config.transformer_layer_spec = lambda cfg, vp_stage=None: \
            layer_spec(args, cfg.transformer)
        model_config.transformer.finalize_model_grads_func = wrap_finalize(finalize_model_grads)
    return plan


def wrap_finalize(finalize: Callable) -> Callable:
    """``finalize`` (megatron's finalize_model_grads), then the SPD TP-partial gradient sum."""

    def finalize_with_spd(model, *args: Any, **kwargs: Any):
        out = finalize(model, *args, **kwargs)
        for chunk in model:
            reduce_tp_partial_grads(chunk, include_megatron_reduced=False)
        return out

    return finalize_with_spd
