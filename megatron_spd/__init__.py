"""megatron-spd: Sync-Point Drop (SPD) for tensor-parallel LLMs on NVIDIA megatron-core.

Public API (see README.md for the map of concepts to modules):
- ModelConfig (core/config.py): a model's shape, independent of parallelism.
- SPDPlan, PlanError (core/plan.py): G and the per-block strategy; the plan file format.
- build_model (core/spec.py): a megatron-core GPTModel with a plan's SPD blocks at the current TP.
- SPDTransformerLayer (core/block.py), SPDColumnParallelLinear / SPDRowParallelLinear
  (core/layers.py).
- load_full_state_dict / gather_full_state_dict / forward_logits (core/sharding.py).
- reduce_tp_partial_grads (core/grads.py): sum the per-rank partial grads after backward.
- CollectiveCounter, simulate_link (parallel/collectives.py): collective accounting, link simulator.
- open_model (loading/open_model.py): any source -> model at the current TP with its plan.
- parallel.distributed.init: torchrun / single-process set-up; parallel.compat.apply.
"""
from .core.config import ModelConfig
from .core.plan import PlanError, SPDPlan

__all__ = ["ModelConfig", "SPDPlan", "PlanError", "build_model", "SPDTransformerLayer",
           "SPDColumnParallelLinear", "SPDRowParallelLinear", "load_full_state_dict",
           "gather_full_state_dict", "forward_logits", "reduce_tp_partial_grads",
           "CollectiveCounter", "simulate_link", "open_model"]

_LAZY = {  # megatron-core imports take seconds: load them on first use
    "build_model": "core.spec", "SPDTransformerLayer": "core.block",
    "SPDColumnParallelLinear": "core.layers", "SPDRowParallelLinear": "core.layers",
    "load_full_state_dict": "core.sharding", "gather_full_state_dict": "core.sharding",
    "forward_logits": "core.sharding", "reduce_tp_partial_grads": "core.grads",
    "CollectiveCounter": "parallel.collectives", "simulate_link": "parallel.collectives",
    "open_model": "loading.open_model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'megatron_spd' has no attribute {name!r}")
