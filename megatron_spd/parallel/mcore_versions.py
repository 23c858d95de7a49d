"""Every megatron-core API difference between the releases this package supports, in one place.

Supported: megatron-core 0.16.1 through 0.19.x (setup.py's range; CI runs the suite on 0.16.1 and
0.19.2). Each function below bridges one difference, names the megatron-core call site on each
side and the releases it covers, and decides by what the object in hand offers (feature
detection), never by comparing version strings, so a release in between needs no edit.
The CPU shims for 0.19's new CUDA-only call sites live with the others in ``compat.py``
(``torch.cuda.current_stream``: distributed/param_and_grad_buffer.py:632, new in 0.19.0).

| difference | 0.16.1 (and up to) | newer |
|---|---|---|
| ``mlp_submodules``: the local layer spec's MLP | ``ModuleSpec(MLP, submodules=MLPSubmodules)`` (to 0.17.x) | 0.18.0+: ``functools.partial(MLP.as_mlp_submodule, submodules=...)`` (models/gpt/gpt_layer_specs.py:541, transformer/mlp.py:389 at 0.19.0) |
| ``logits_flag_holder``: ``materialize_only_last_token_logits`` | on the inference context (to 0.16.x) | 0.17.0+: on ``context.config``, an ``InferenceConfig`` (inference/contexts/base_context.py:15-19; read at models/gpt/gpt_model.py:742) |
| ``dynamic_inference``: megatron's ``DynamicInferenceEngine`` built from an ``InferenceConfig`` | not served by this package (0.16.x: ``DynamicInferenceContext`` takes its sizes as arguments, no ``InferenceConfig``; 0.17.x: no inference/utils.py ``InferenceMode``) | 0.18.0+: inference/config.py ``InferenceConfig``, inference/engines/dynamic_engine.py ``EngineState``/``wait_until``, inference/utils.py ``InferenceMode`` (tested on 0.18.2 and 0.19.2) |
| ``read_embedded_common_state``: the non-sharded state (``args``) | ``common.pt`` written by ``save_common`` (to 0.18.x) | 0.19.0+: a ``ShardedObject("common_state")`` inside the torch_dist files (dist_checkpointing/serialization.py:439-445), read by ``load_common_state_dict`` (:206-236), which still prefers a ``common.pt`` |
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: The legacy common-state file; our saves write it on every version (checkpoint.py), so a
#: checkpoint saved under 0.19 still opens with megatron-core 0.16.1-0.18 and their Megatron-LM.
COMMON_FILE = "common.pt"
#: torch.distributed.checkpoint's index file, present in every torch_dist directory.
DCP_METADATA_FILE = ".metadata"


def mlp_submodules(layer_spec: Any) -> Any:
    """The ``MLPSubmodules`` (linear_fc1/linear_fc2) of a layer spec from
    ``get_gpt_layer_local_spec``; editing it edits the spec (the caller deep-copies first).
    0.16.1-0.17.x: ``spec.submodules.mlp`` is a ModuleSpec. 0.18.0+: it is a
    ``functools.partial`` of ``MLP.as_mlp_submodule`` carrying ``submodules=``."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):
        return mlp.keywords["submodules"]
    return mlp.submodules


def logits_flag_holder(context: Any) -> Any:
    """The object whose ``materialize_only_last_token_logits`` GPTModel reads for this
    inference context: the context itself (0.16.x) or its ``InferenceConfig`` (0.17.0+,
    ``self.config``; 0.19.2's ``StaticInferenceContext.__str__`` still reads the old attribute and
    raises, so never ``str()`` a context)."""
    return context if hasattr(context, "materialize_only_last_token_logits") else context.config


def has_common_state(weights: Path) -> bool:
    """Whether a torch_dist directory holds its non-sharded state in either layout."""
    return (weights / COMMON_FILE).is_file() or (weights / DCP_METADATA_FILE).is_file()


def read_embedded_common_state(weights: Path) -> Any:
    """The non-sharded state (a dict with ``args``) that megatron-core 0.19.0+ embeds in the
    torch_dist files instead of writing ``common.pt``, read by megatron-core's
    ``load_common_state_dict``; 0.16.1-0.18.x cannot (their ``load_common_state_dict`` reads
    ``common.pt`` only). ``common.pt`` itself is read by checkpoint/read.py through
    convert/safe_load.py's allow-list; the DCP reads here go through the same allow-list once
    safe_load is imported (it replaces torch's metadata and object readers process-wide)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    return load_common_state_dict(str(weights))


def write_common_file(weights: Path) -> None:
    """Give a torch_dist directory the ``common.pt`` that megatron-core 0.16.1-0.18.x write
    (``save_common``) when this release (0.19.0+) embedded the common state instead, so the
    checkpoint also opens with those releases and their Megatron-LM. Rank 0, after the save."""
    import torch

    if not (weights / COMMON_FILE).is_file():
        torch.save(read_embedded_common_state(weights), weights / COMMON_FILE)


def dynamic_inference() -> SimpleNamespace:
    """megatron-core's dynamic inference classes, as megatron_spd.integrations.megatron_dynamic
    uses them (0.18.x-0.19.x): ``InferenceConfig`` (inference/config.py, 0.17.0+), the
    ``DynamicInferenceContext(model_config, inference_config)`` it sizes, ``GPTInferenceWrapper``,
    ``TextGenerationController``, ``DynamicInferenceEngine`` with ``EngineState``/``wait_until``
    (the coordinator's pause/stop protocol), ``SamplingParams`` and ``InferenceMode``
    (inference/utils.py, 0.18.0+: the engine marks the process as inferring). Tested on 0.18.2
    and 0.19.2 (tests/test_megatron_dynamic.py); an older release that lacks one of them (0.16.x,
    0.17.x) is refused in one line."""
    import megatron.core

    try:
        from megatron.core.inference.config import InferenceConfig
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import (DynamicInferenceEngine,
                                                                    EngineState)
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper)
        from megatron.core.inference.sampling_params import SamplingParams
        from megatron.core.inference.text_generation_controllers.text_generation_controller \
            import TextGenerationController
        from megatron.core.inference.utils import InferenceMode
    except ImportError as e:
        raise ImportError(f"serving through megatron-core's DynamicInferenceEngine needs "
                          f"megatron-core >= 0.18 (tested: 0.18.2, 0.19.2); this is "
                          f"{megatron.core.__version__} ({e})") from None
    return SimpleNamespace(InferenceConfig=InferenceConfig, EngineState=EngineState,
                           DynamicInferenceContext=DynamicInferenceContext,
                           DynamicInferenceEngine=DynamicInferenceEngine,
                           GPTInferenceWrapper=GPTInferenceWrapper, SamplingParams=SamplingParams,
                           TextGenerationController=TextGenerationController,
                           InferenceMode=InferenceMode)
