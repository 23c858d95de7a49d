"""What a rank does with a built GPTModel: load or gather full weights, and run it on tokens.

The interchange format between converters, recipes and checkpoints is the *full state dict*: the
TP=1 megatron-core names and layouts (fused QKV grouped per KV group [q_g | k_g | v_g]; SwiGLU
fc1 as [gate; up]), fp32, no ``_extra_state`` entries. ``shard_for_rank``/``load_full_state_dict``
cut it for one TP rank using the TP attributes megatron sets on each parameter;
``gather_full_state_dict`` is the inverse.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..errors import ContextError
from ..parallel import compat
from .config import FullStateDict


def _tp_attrs(param: torch.Tensor) -> tuple[bool, int]:
    """(whether megatron splits ``param`` over TP ranks, the dimension it splits)."""
    return (bool(getattr(param, "tensor_model_parallel", False)),
            int(getattr(param, "partition_dim", -1)))


def _is_gated_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias") \
        if model.config.gated_linear_unit else False


def model_params(model) -> dict[str, torch.Tensor]:
    """Named parameters and persistent buffers, without megatron's ``_extra_state`` entries."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state")}


def shard_for_rank(name: str, full: torch.Tensor, param: torch.Tensor, model,
                   rank: int, world: int) -> torch.Tensor:
    """This rank's slice of one full tensor, laid out like ``param``."""
    is_tp, dim = _tp_attrs(param)
    if not is_tp or world == 1:
        return full
    if _is_gated_fc1(name, model):  # megatron stores [gate_r; up_r] on rank r
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(world, 0)[rank], up.chunk(world, 0)[rank]], dim=0)
    return full.chunk(world, dim=dim)[rank]


def load_full_state_dict(model, full: FullStateDict) -> None:
    """Copy a full state dict into this rank's shards; names and shapes must match exactly."""
    params = model_params(model)
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{'...' if len(unexpected) > 5 else ''}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, p in params.items():
            local = shard_for_rank(name, full[name], p, model, rank, world)
            if local.shape != p.shape:
                raise ValueError(f"{name}: weights have shape {tuple(full[name].shape)} (local "
                                 f"{tuple(local.shape)}) but the model expects {tuple(p.shape)} "
                                 f"at TP={world}; the model config does not match the weights")
            p.copy_(local.to(p.dtype))


def gather_tp(local: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """All-gather one tensor over the TP group; returns the per-rank pieces in rank order."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world == 1:
        return [local]
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return pieces


def gather_full_state_dict(model, *, grads: bool = False, prefix: str = "") -> FullStateDict:
    """The full state dict (or, with ``grads``, the full gradients) on every TP rank, fp32 CPU;
    only the names starting with ``prefix`` (e.g. one block's)."""
    out: FullStateDict = {}
    for name, p in model_params(model).items():
        if not name.startswith(prefix):
            continue
        t = p.grad if grads else p
        if t is None:
            continue
        t = t.detach().float()
        is_tp, dim = _tp_attrs(p)
        if is_tp:
            pieces = gather_tp(t, dim)
            if _is_gated_fc1(name, model):
                halves = [x.chunk(2, 0) for x in pieces]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                t = torch.cat(pieces, dim)
        out[name] = t.cpu()
    return out


def causal_mask(seq_len: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """megatron's mask convention: [1, 1, s, s] bool, True = masked (future positions)."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), 1)


def check_context(model, length: int) -> None:
    """Refuse sequences longer than the model's context (``max_seq_length``): past it a model
    converted from a sliding-window source (config.py) would silently differ from the source."""
    limit = getattr(model, "max_sequence_length", None)
    if limit is not None and length > limit:
        raise ContextError(f"sequences of {length} tokens exceed the model's context of "
                           f"{limit} (max_seq_length; capped to the sliding window for such "
                           "models); use shorter windows")


def forward_logits(model, tokens: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] for ``tokens`` [b, s], identical on every TP rank."""
    dev = compat.device()
    tokens = tokens.to(dev)
    b, s = tokens.shape
    check_context(model, position_offset + s)
    pos = torch.arange(position_offset, position_offset + s, device=dev).unsqueeze(0).expand(b, s)
    return model(tokens, pos, causal_mask(s, dev), runtime_gather_output=True)
