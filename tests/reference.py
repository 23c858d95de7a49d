"""An independent plain-torch implementation of the model and of the SPD block (design.md 1).

Written from the formulas and the documented full-state-dict layout only (no megatron code), so
that agreement with the megatron-core model checks both the layouts and the SPD semantics.
Covers the families' features: head_dim independent of hidden/heads, q/k/v bias without output
bias (Qwen2), per-head RMSNorm of q and k before RoPE (Qwen3), Llama-3.x RoPE frequency scaling
(the Llama 3.1 formula with low/high frequency factors 1 and 4 and original context 8192).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import SPDPlan


def random_full_state_dict(cfg: ModelConfig, seed: int = 0, scale: float = 0.08) -> dict:
    """Random weights in the full (TP=1) layout; norm weights/biases perturbed away from 1/0."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, center=0.0, s=scale):
        return center + s * torch.randn(*shape, generator=g)

    h, hd, np_, ng, f, V = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                            cfg.num_query_groups, cfg.ffn_hidden_size, cfg.vocab_size)
    ln = cfg.normalization == "LayerNorm"
    sd = {"embedding.word_embeddings.weight": rnd(V, h, s=1.0)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = rnd(h, center=1.0, s=0.2)
        sd[p + "self_attention.linear_qkv.weight"] = rnd((np_ + 2 * ng) * hd, h)
        sd[p + "self_attention.linear_proj.weight"] = rnd(h, np_ * hd)
        sd[p + "pre_mlp_layernorm.weight"] = rnd(h, center=1.0, s=0.2)
        sd[p + "mlp.linear_fc1.weight"] = rnd((2 if cfg.gated else 1) * f, h)
        sd[p + "mlp.linear_fc2.weight"] = rnd(h, f)
        if ln:
            sd[p + "input_layernorm.bias"] = rnd(h, s=0.2)
            sd[p + "pre_mlp_layernorm.bias"] = rnd(h, s=0.2)
        if cfg.qkv_bias:
            sd[p + "self_attention.linear_qkv.bias"] = rnd((np_ + 2 * ng) * hd, s=0.2)
        if cfg.qk_layernorm:
            sd[p + "self_attention.q_layernorm.weight"] = rnd(hd, center=1.0, s=0.2)
            sd[p + "self_attention.k_layernorm.weight"] = rnd(hd, center=1.0, s=0.2)
        if cfg.add_bias_linear:
            sd[p + "self_attention.linear_proj.bias"] = rnd(h, s=0.2)
            sd[p + "mlp.linear_fc1.bias"] = rnd((2 if cfg.gated else 1) * f, s=0.2)
            sd[p + "mlp.linear_fc2.bias"] = rnd(h, s=0.2)
    sd["decoder.final_layernorm.weight"] = rnd(h, center=1.0, s=0.2)
    if ln:
        sd["decoder.final_layernorm.bias"] = rnd(h, s=0.2)
    if not cfg.tie_word_embeddings:
        sd["output_layer.weight"] = rnd(V, h)
    return sd


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _norm(cfg, sd, key, x):
    if cfg.normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], cfg.norm_eps)
    return _rms(x, sd[key + ".weight"], cfg.norm_eps)


def _llama3_scaled(inv, factor, low=1.0, high=4.0, old_ctx=8192):
    """Llama 3.1 RoPE scaling: long wavelengths divided by ``factor``, short ones kept, a linear
    blend (in 1/frequency) in between."""
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen < old_ctx / high, inv,
                       torch.where(wavelen > old_ctx / low, inv / factor, blended))


def _rope(x, cfg):  # x [b, heads, s, d]; non-interleaved (rotate-half) RoPE
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if cfg.rope_scaling:
        inv = _llama3_scaled(inv, cfg.rope_scaling_factor)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _heads_context(cfg, sd, p, x):
    """Per-head attention context [b, s, np, hd] of normalised input x [b, s, h]."""
    b, s, _ = x.shape
    np_, ng, hd = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    qkv = x @ sd[p + "self_attention.linear_qkv.weight"].T
    if cfg.qkv_bias:
        qkv = qkv + sd[p + "self_attention.linear_qkv.bias"]
    qkv = qkv.view(b, s, ng, np_ // ng + 2, hd)
    q = qkv[:, :, :, : np_ // ng].reshape(b, s, np_, hd).transpose(1, 2)
    k = qkv[:, :, :, np_ // ng].transpose(1, 2).repeat_interleave(np_ // ng, dim=1)
    v = qkv[:, :, :, np_ // ng + 1].transpose(1, 2).repeat_interleave(np_ // ng, dim=1)
    if cfg.qk_layernorm:  # RMSNorm of each head's q and k over head_dim
        q = _rms(q, sd[p + "self_attention.q_layernorm.weight"], cfg.norm_eps)
        k = _rms(k, sd[p + "self_attention.k_layernorm.weight"], cfg.norm_eps)
    q, k = _rope(q, cfg), _rope(k, cfg)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    return (att.softmax(-1) @ v).transpose(1, 2)  # [b, s, np, hd]


def _mlp(cfg, sd, p, x, rows=None):
    """MLP (or the MLP shard whose hidden units are ``rows``) without the fc2 bias."""
    f = cfg.ffn_hidden_size
    rows = torch.arange(f) if rows is None else rows
    w1 = sd[p + "mlp.linear_fc1.weight"]
    b1 = sd.get(p + "mlp.linear_fc1.bias")
    if cfg.gated:
        gate, up = x @ w1[rows].T, x @ w1[f + rows].T
        if b1 is not None:
            gate, up = gate + b1[rows], up + b1[f + rows]
        a = F.silu(gate) * up
    else:
        a = x @ w1[rows].T
        if b1 is not None:
            a = a + b1[rows]
        a = F.gelu(a)
    return a @ sd[p + "mlp.linear_fc2.weight"][:, rows].T


def reference_logits(cfg: ModelConfig, sd: dict, tokens: torch.Tensor,
                     plan: SPDPlan | None = None) -> torch.Tensor:
    """Logits [b, s, V]; blocks marked SPD in ``plan`` use the G-group SPD formula."""
    x = sd["embedding.word_embeddings.weight"][tokens]
    b, s, h = x.shape
    np_, hd, f = cfg.num_attention_heads, cfg.head_dim, cfg.ffn_hidden_size
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        ctx = _heads_context(cfg, sd, p, _norm(cfg, sd, p + "input_layernorm", x))
        wo = sd[p + "self_attention.linear_proj.weight"]
        b_o = sd.get(p + "self_attention.linear_proj.bias", torch.zeros(h))
        b_2 = sd.get(p + "mlp.linear_fc2.bias", torch.zeros(h))
        if plan is None or not plan.is_spd(i):
            hmid = x + ctx.reshape(b, s, np_ * hd) @ wo.T + b_o
            x = hmid + _mlp(cfg, sd, p, _norm(cfg, sd, p + "pre_mlp_layernorm", hmid)) + b_2
            continue
        G = plan.groups
        total = torch.zeros_like(x)
        for g in range(G):
            heads = slice(g * np_ // G, (g + 1) * np_ // G)
            cols = slice(heads.start * hd, heads.stop * hd)
            a_g = ctx[:, :, heads].reshape(b, s, -1) @ wo[:, cols].T
            h_g = x + a_g + b_o
            rows = torch.arange(g * f // G, (g + 1) * f // G)
            z_g = _mlp(cfg, sd, p, _norm(cfg, sd, p + "pre_mlp_layernorm", h_g), rows)
            total = total + a_g + z_g
        x = x + total + b_o + b_2
    x = _norm(cfg, sd, "decoder.final_layernorm", x)
    w_out = sd["embedding.word_embeddings.weight"] if cfg.tie_word_embeddings else sd["output_layer.weight"]
    return x @ w_out.T
