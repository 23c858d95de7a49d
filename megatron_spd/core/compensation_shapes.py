"""Shapes of a block's rank-local compensation parameters (compensation.py), without torch or
megatron-core: the vLLM plugin (integrations/vllm) sizes its own parameters from them in vLLM's
processes, which need not import megatron-core."""
from __future__ import annotations


def input_size(hidden: int, inputs: str) -> int:
    return hidden * (2 if inputs == "ln1+partial" else 1)


def param_shapes(groups: int, hidden: int, rank: int, inputs: str) -> dict[str, tuple[int, ...]]:
    """Shapes of one block's compensation parameters for ``groups`` groups (all G in a full
    state dict, a rank's G/T in the module)."""
    shapes = {"bias": (groups, hidden)}
    if rank > 0:
        shapes.update(weight_in=(groups, rank, input_size(hidden, inputs)),
                      weight_out=(groups, hidden, rank))
    return shapes
