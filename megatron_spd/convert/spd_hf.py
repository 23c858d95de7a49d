"""The SPD form of a Hugging Face model directory: the plan in config.json, for serving.

A Hugging Face directory of an SPD model must not pass for the dense model: transformers picks its
class from ``model_type``, so a ``"llama"`` directory whose weights were recovered for SPD (B2B,
head grouping, compensation) would load and run densely without a word. An export with SPD
blocks therefore names its own model type and architecture:

    "model_type": "spd_llama",  "architectures": ["SPDLlamaForCausalLM"],
    "spd_plan": {<the whole plan file, format megatron-spd-plan/1>}

- transformers refuses the directory (it knows no ``spd_llama``), so it never runs it densely;
- vLLM with megatron-spd installed serves it: the plugin (integrations/vllm) registers the
  ``spd_*`` config classes and the ``SPD*ForCausalLM`` models, which read ``spd_plan``;
- ``load_hf`` (convert/hf.py) reads it back, plan included (``plan_of``).
Every other key is the dense family's, unchanged. Rank-local compensation tensors are stored under
``model.layers.<i>.spd_compensation.<name>``, all G groups stacked along dim 0, exactly as in the
full megatron state dict (``decoder.layers.<i>.spd_compensation.<name>``).

A plan without SPD blocks exports as the plain dense family: that directory is the dense model.
"""
from __future__ import annotations

from typing import Any, Optional

from ..core.plan import PlanError, SPDPlan

PREFIX = "spd_"
PLAN_KEY = "spd_plan"
COMPENSATION = ".spd_compensation."


def is_spd_model_type(model_type: Optional[str]) -> bool:
    return bool(model_type) and str(model_type).startswith(PREFIX)


def base_model_type(model_type: str) -> str:
    """``spd_llama`` -> ``llama``; a dense model type is returned as it is."""
    return model_type[len(PREFIX):] if is_spd_model_type(model_type) else model_type


def spd_architecture(architecture: str) -> str:
    """``LlamaForCausalLM`` -> ``SPDLlamaForCausalLM`` (the vLLM plugin registers these)."""
    return "SPD" + architecture


def with_plan(hf: dict[str, Any], plan: SPDPlan) -> dict[str, Any]:
    """A dense family's config.json dict in its SPD form for ``plan`` (unchanged without SPD
    blocks)."""
    if not plan.spd_blocks:
        return dict(hf)
    return {**hf, "architectures": [spd_architecture(a) for a in hf["architectures"]],
            "model_type": PREFIX + hf["model_type"], PLAN_KEY: plan.to_dict()}


def plan_of(hf: dict[str, Any], source: str = "config.json") -> Optional[SPDPlan]:
    """The plan a config.json dict carries (None for a dense directory); a clear error for an
    ``spd_*`` model type without one (it would otherwise be served densely)."""
    if not is_spd_model_type(hf.get("model_type")):
        return None
    if PLAN_KEY not in hf:
        raise PlanError(f"{source}: model_type {hf['model_type']!r} but no {PLAN_KEY!r}; the "
                        "directory is incomplete: export it again (tools/convert_checkpoint.py "
                        "--to hf)")
    return SPDPlan.from_dict(hf[PLAN_KEY], source=f"{source} {PLAN_KEY}")


def to_hf_name(full_name: str) -> str:
    """``decoder.layers.<i>.spd_compensation.<p>`` -> ``model.layers.<i>.spd_compensation.<p>``."""
    return "model." + full_name.removeprefix("decoder.")


def to_full_name(hf_name: str) -> str:
    return "decoder." + hf_name.removeprefix("model.")
