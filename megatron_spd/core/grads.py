"""Summing the gradients that are partial per TP rank (design.md 3).

Three kinds of replicated parameters get only their rank's share of the gradient:
- in SPD blocks without sequence parallel, the norms and the attention output bias (marked
  ``spd_tp_partial`` by block.py);
- with sequence parallel, every parameter megatron marks ``sequence_parallel`` (norms, row-parallel
  biases), in dense and SPD blocks alike;
- with ``qk_layernorm``, the q/k norm weights (each rank normalises only its own heads), in dense
  and SPD blocks alike.
Megatron's ``finalize_model_grads`` sums the second and third kinds for DDP-wrapped models (the
third by parameter name, as here); it knows nothing of the first. Call
``reduce_tp_partial_grads(model)`` after backward (and after ``finalize_model_grads``, with
``include_megatron_reduced=False``, when using megatron DDP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _megatron_reduced(name: str, p: torch.nn.Parameter, config) -> bool:
    """The TP-partial parameters megatron's finalize_model_grads sums itself (same rule)."""
    return (bool(getattr(config, "sequence_parallel", False))
            and bool(getattr(p, "sequence_parallel", False))) or (
        bool(getattr(config, "qk_layernorm", False))
        and ("q_layernorm" in name or "k_layernorm" in name))


def tp_partial_params(model, include_megatron_reduced: bool = True) -> list[torch.nn.Parameter]:
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "spd_tp_partial", False) or (
                include_megatron_reduced and _megatron_reduced(name, p, model.config)):
            out.append(p)
    return out


def reduce_tp_partial_grads(model, include_megatron_reduced: bool = True) -> int:
    """All-reduce (sum) over TP the grads of TP-partial parameters, coalesced into one
    collective. Uses ``main_grad`` where megatron DDP keeps it. Returns the number reduced."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0
    params = tp_partial_params(model, include_megatron_reduced)
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad for p in params]
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return 0
    flat = _flatten_dense_tensors([g.data for _, g in pairs])
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for (_, g), synced in zip(pairs, _unflatten_dense_tensors(flat, [g.data for _, g in pairs])):
        g.data.copy_(synced)
    return len(pairs)
