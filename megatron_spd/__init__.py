"""megatron-spd: Sync-Point Drop (SPD) for tensor-parallel LLMs on NVIDIA megatron-core.

Public API (see README.md for the map of concepts to modules):
- ModelConfig (config.py): a model's shape, independent of parallelism.
- SPDPlan, PlanError (plan.py): G and the per-block strategy; the plan file format.
- build_model (spec.py): a megatron-core GPTModel with a plan's SPD blocks at the current TP.
- SPDTransformerLayer (block.py), SPDColumnParallelLinear / SPDRowParallelLinear (layers.py).
- load_full_state_dict / gather_full_state_dict / forward_logits (model.py).
- reduce_tp_partial_grads (grads.py): sum the per-rank partial grads after backward.
- CollectiveCounter, simulate_link (comm.py): collective accounting and the link simulator.
- distributed.init (distributed.py): torchrun / single-process set-up; compat.apply (compat.py).
"""
from .config import ModelConfig
from .plan import PlanError, SPDPlan

__all__ = ["ModelConfig", "SPDPlan", "PlanError", "build_model", "SPDTransformerLayer",
           "SPDColumnParallelLinear", "SPDRowParallelLinear", "load_full_state_dict",
           "gather_full_state_dict", "forward_logits", "reduce_tp_partial_grads",
           "CollectiveCounter", "simulate_link"]

_LAZY = {  # megatron-core imports take seconds: load them on first use
    "build_model": "spec", "SPDTransformerLayer": "block", "SPDColumnParallelLinear": "layers",
    "SPDRowParallelLinear": "layers", "load_full_state_dict": "model",
    "gather_full_state_dict": "model", "forward_logits": "model",
    "reduce_tp_partial_grads": "grads", "CollectiveCounter": "comm", "simulate_link": "comm",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'megatron_spd' has no attribute {name!r}")
