"""Glue for Megatron-LM's own launch script (``pretrain_gpt.py``), used by patches/.

Megatron-LM trains with its own loop; three hooks make it train an SPD model (patches/README.md):
- ``add_arguments``: ``--spd-plan PLAN.json`` (pretrain_gpt.py's ``extra_args_provider``);
- ``layer_spec``: the per-block layer specs of the plan (gpt_builders.py, in place of the stock
  local spec), after checking that the run's settings are ones SPD blocks support;
- ``wrap_finalize``: megatron's ``finalize_model_grads`` followed by the TP sum of the gradients
  SPD blocks leave partial per rank (training.py; design.md 3). Without it the replicated norm
  weights of SPD blocks drift apart across TP ranks (with --sequence-parallel megatron's own
  finalize already covers them and the extra reduction finds nothing to do).
Nothing here imports Megatron-LM's ``megatron.training``: it receives ``args`` objects.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from .grads import reduce_tp_partial_grads
from .plan import PlanError, SPDPlan
from .spec import block_spec


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="megatron-spd")
    group.add_argument("--spd-plan", type=str, default=None,
                       help="megatron-spd plan JSON: blocks it marks SPD drop their attention "
                            "all-reduce (needs --transformer-impl local)")
    return parser


def layer_spec(args: Any, config) -> Any:
    """TransformerBlockSubmodules for ``args.spd_plan``; a clear error for settings SPD blocks
    do not support."""
    problems = []
    if getattr(args, "transformer_impl", "local") != "local":
        problems.append("pass --transformer-impl local (SPD layers subclass the local linears)")
    if getattr(args, "pipeline_model_parallel_size", 1) != 1:
        problems.append("pipeline parallelism is not supported: use "
                        "--pipeline-model-parallel-size 1")
    if getattr(args, "num_experts", None):
        problems.append("MoE models are not supported (drop --num-experts)")
    if getattr(args, "mtp_num_layers", None):
        problems.append("multi-token prediction is not supported (drop --mtp-num-layers)")
    if getattr(args, "context_parallel_size", 1) != 1:
        problems.append("context parallelism is not supported: use --context-parallel-size 1")
    if problems:
        raise PlanError(f"--spd-plan {args.spd_plan}: " + "; ".join(problems))
    plan = SPDPlan.load(args.spd_plan)
    heads = config.num_attention_heads
    plan.validate_for(config.num_layers, heads, config.num_query_groups or heads,
                      config.ffn_hidden_size, config.tensor_model_parallel_size)
    return block_spec(config, plan)


def wrap_finalize(finalize: Callable) -> Callable:
    """``finalize`` (megatron's finalize_model_grads), then the SPD TP-partial gradient sum."""

    def finalize_with_spd(model, *args: Any, **kwargs: Any):
        out = finalize(model, *args, **kwargs)
        for chunk in model:
            reduce_tp_partial_grads(chunk, include_sequence_parallel=False)
        return out

    return finalize_with_spd
