"""Activations: running a GPTModel block by block on cached hidden states (every recipe step).

The recipe never needs a whole forward pass per question it asks: in the backward sweep the
blocks before i are dense and unchanged, B2B trains one block on that block's inputs, HG looks at
one block's attention. So the pieces of ``GPTModel.forward`` are exposed here separately
(embedding, one megatron layer at a time, final norm + output layer + megatron's vocab-parallel
cross entropy) and called with the real megatron modules. Hidden states are megatron's
``[s, b, h]`` (no sequence parallel), replicated on every TP rank, so everything here runs in the
T=1 emulation and at T=G ranks alike; caches are kept on the CPU as ``[n, s, h]``.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..core.config import FullStateDict, ModelConfig
from ..core.sharding import causal_mask, gather_full_state_dict, model_params, shard_for_rank
from ..parallel import compat, distributed


def check_model(model) -> None:
    """The recipe runs on replicated hidden states; sequence parallel shards them."""
    if getattr(model.config, "sequence_parallel", False):
        raise ValueError("the SPD recipe runs without sequence parallel; build the model with "
                         "sequence_parallel=False (the plan it makes serves with either)")


def require_full_weights(step: str, result: str) -> None:
    """Recipe steps that gather statistics over every group (HG, the compensation fit) run on
    the full weights: refuse T > 1 (the ``result`` checkpoint then serves at any T)."""
    if distributed.tp_size() != 1:
        raise ValueError(f"{step} gathers statistics on the full weights: run it at T=1 (the "
                         f"G-way emulation); the {result} checkpoint then serves at any T")


def micro_batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def context(model, seq_len: int) -> dict:
    """The keyword arguments every layer call needs: causal mask and rotary embedding."""
    dev = compat.device()
    kw = {"attention_mask": causal_mask(seq_len, dev)}
    if getattr(model, "position_embedding_type", "rope") == "rope":
        kw["rotary_pos_emb"] = model.rotary_pos_emb(seq_len)
    return kw


def embed(model, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding output ``[s, b, h]`` for ``tokens`` ``[b, s]``."""
    dev = compat.device()
    tokens = tokens.to(dev)
    b, s = tokens.shape
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    return model.embedding(input_ids=tokens, position_ids=pos)


def run_layers(layers: Iterable, x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Apply megatron layers in order to ``x`` ``[s, b, h]``."""
    for layer in layers:
        x, _ = layer(hidden_states=x, **ctx)
    return x


def token_nll(model, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods ``[b, s-1]`` from last-block output ``x`` ``[s, b, h]``:
    final norm, output layer and megatron's vocab-parallel cross entropy (exact at any TP)."""
    h = model.decoder.final_layernorm(x)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else None
    logits, _ = model.output_layer(h, weight=weight)
    tokens = tokens.to(logits.device)
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)  # last position is dropped below
    return model.compute_language_model_loss(labels, logits)[:, :-1]


def to_sbh(cache: torch.Tensor, sl: slice) -> torch.Tensor:
    """Micro-batch ``sl`` of an ``[n, s, h]`` cache as a ``[s, b, h]`` tensor on the device."""
    return cache[sl].transpose(0, 1).contiguous().to(compat.device())


def to_bsh(x: torch.Tensor) -> torch.Tensor:
    return x.detach().transpose(0, 1).contiguous().cpu()


@torch.no_grad()
def block_inputs(model, tokens: torch.Tensor, upto: Optional[int] = None,
                 micro_batch: int = 4) -> list[torch.Tensor]:
    """Hidden states at the input of blocks 0..upto (default: all blocks and the final norm),
    each ``[n, s, h]`` on the CPU, computed with ``model``'s own layers."""
    check_model(model)
    n, s = tokens.shape
    layers = list(model.decoder.layers)
    upto = len(layers) if upto is None else upto
    ctx = context(model, s)
    out = [torch.empty(n, s, model.config.hidden_size) for _ in range(upto + 1)]
    for sl in micro_batches(n, micro_batch):
        x = embed(model, tokens[sl])
        out[0][sl] = to_bsh(x)
        for i in range(upto):
            x = run_layers([layers[i]], x, ctx)
            out[i + 1][sl] = to_bsh(x)
    return out


@torch.no_grad()
def perplexity_from(model, x_cache: torch.Tensor, tokens: torch.Tensor, layers: Sequence,
                    micro_batch: int = 4) -> float:
    """Perplexity of ``tokens`` when ``layers`` (the rest of the network) are applied to the
    cached hidden states ``x_cache`` ``[n, s, h]`` and then the model's head."""
    n, s = tokens.shape
    ctx = context(model, s)
    total, count = 0.0, 0
    for sl in micro_batches(n, micro_batch):
        x = run_layers(layers, to_sbh(x_cache, sl), ctx)
        nll = token_nll(model, x, tokens[sl])
        total += float(nll.double().sum())
        count += nll.numel()
    return math.exp(total / count)


def block_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def get_block(model, i: int) -> FullStateDict:
    """Block ``i``'s parameters as full (TP=1) tensors on the CPU, on every rank."""
    return gather_full_state_dict(model, prefix=block_prefix(i))


@torch.no_grad()
def set_block(model, i: int, tensors: FullStateDict) -> None:
    """Copy full tensors (names ``decoder.layers.<i>.*``, any subset of the block's) into this
    rank's shards of block ``i``."""
    from megatron.core import parallel_state

    params = model_params(model)
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    for name, full in tensors.items():
        if not name.startswith(block_prefix(i)) or name not in params:
            raise KeyError(f"{name} is not a parameter of block {i} of this model")
        p = params[name]
        p.copy_(shard_for_rank(name, full, p, model, rank, world).to(p.dtype))


def block_stats(layer, x_cache: torch.Tensor, cfg: ModelConfig, ctx: dict, micro_batch: int,
                 max_tokens: int):
    """Per-KV-group attention partials P_k (without b_O), block inputs X, mean attention map
    per KV group, all on a subsample of tokens."""
    attn = layer.self_attention
    ng, np_, hd = cfg.num_query_groups, cfg.num_attention_heads, cfg.head_dim
    captured: dict[str, torch.Tensor] = {}
    h1 = attn.linear_proj.register_forward_pre_hook(
        lambda m, args: captured.__setitem__("ctx", args[0].detach()))
    h2 = attn.core_attention.scale_mask_softmax.register_forward_hook(
        lambda m, args, out: captured.__setitem__("probs", out.detach()))
    wo = attn.linear_proj.weight.float()
    xs, parts, maps, n_maps = [], [], None, 0
    try:
        for sl in micro_batches(x_cache.shape[0], micro_batch):
            x = to_sbh(x_cache, sl)
            attn(layer.input_layernorm(x), attention_mask=ctx["attention_mask"],
                 rotary_pos_emb=ctx.get("rotary_pos_emb"))
            c = captured["ctx"].float()                                  # [s, b, np*hd]
            per = c.reshape(*c.shape[:2], ng, (np_ // ng) * hd)
            wk = wo.reshape(wo.shape[0], ng, (np_ // ng) * hd)
            p = torch.einsum("sbkd,hkd->sbkh", per, wk)                  # [s, b, ng, h]
            xs.append(x.reshape(-1, x.shape[-1]).float().cpu())
            parts.append(p.reshape(-1, ng, p.shape[-1]).cpu())
            probs = captured["probs"].float()                            # [b, np, sq, sk]
            m = probs.reshape(probs.shape[0], ng, np_ // ng, *probs.shape[2:]).mean(2).sum(0)
            maps = m if maps is None else maps + m
            n_maps += probs.shape[0]
            if sum(t.shape[0] for t in xs) >= max_tokens:
                break
    finally:
        h1.remove()
        h2.remove()
    return torch.cat(xs)[:max_tokens], torch.cat(parts)[:max_tokens], maps / n_maps
