"""Fitting rank-local compensation (compensation.py) in closed form on calibration activations.

For SPD group g of block i the missing term is ``T_g = sum_{j != g} A_j`` (the other groups'
attention partials, without ``b_O``). With features ``f_g = LN1(X)`` (or ``[LN1(X); A_g]``) on the
block's calibration inputs, ``C_g = c_g + W_out W_in f_g`` is the least-squares estimate of
``T_g``:

1. ridge regression on centred data, ``B = (F'F + lam I)^-1 F'Y`` with ``lam = ridge * tr(F'F)/d``
   (scale-free; keeps the ``d``-dimensional fit stable on a few thousand tokens);
2. reduced-rank regression: project onto the top-r principal directions ``V_r`` of the fitted
   values ``F B`` (the least-squares optimum among rank-r maps given B), ``W_in = (B V_r)'``,
   ``W_out = V_r``; rank 0 keeps only the bias;
3. ``c_g = mean(T_g) - W_out W_in mean(f_g)``.

Each token is weighted by ``1 / rms(H)^2`` of its dense MLP input ``H`` (what LN2 divides by), so
tokens whose residual stream is huge (SmolLM2's position-0 "massive activations") do not dominate
a fit whose error is normalised away by LN2 anyway. The result is exact when ``T_g`` is a linear
function of the features (tests check that it recovers a planted map).

Statistics are gathered at T=1 on the full weights (like head grouping); the fitted tensors go
into the full state dict under the block's ``spd_compensation`` names and serve at any T.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..core.compensation import PARAM_NAMES
from ..core.config import FullStateDict
from ..parallel import compat
from . import activations


@dataclass
class CompensationFit:
    """One block's fitted compensation: full tensors (all G groups) and how well it fits."""

    block: int
    weights: dict[str, torch.Tensor]
    explained: float        # fraction of sum_g ||T_g||^2 (weighted) removed on the fit data

    def summary(self) -> dict[str, Any]:
        return {"explained": self.explained}


def _features(ln1: torch.Tensor, own: torch.Tensor, inputs: str) -> torch.Tensor:
    return ln1 if inputs == "ln1" else torch.cat([ln1, own], dim=-1)


def fit_groups(ln1: torch.Tensor, partials: torch.Tensor, rank: int, inputs: str = "ln1", *,
               ridge: float = 1e-2, weights: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
    """Closed-form compensation for G groups from ``ln1`` [t, h] and the groups' partials
    ``partials`` [t, G, h] (optional per-token ``weights`` [t]); returns ``bias`` [G, h] and, for
    rank > 0, ``weight_in`` [G, r, d] and ``weight_out`` [G, h, r] (float32)."""
    t, groups, h = partials.shape
    w = torch.ones(t, dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()
    total = partials.double().sum(1)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in PARAM_NAMES}
    for g in range(groups):
        y = total - partials[:, g].double()                              # T_g [t, h]
        mu_y = w @ y
        if rank == 0:
            out["bias"].append(mu_y)
            continue
        f = _features(ln1, partials[:, g], inputs).double()
        mu_f = w @ f
        fc, yc = (f - mu_f) * w.sqrt()[:, None], (y - mu_y) * w.sqrt()[:, None]
        gram = fc.t() @ fc
        lam = ridge * float(gram.diagonal().mean())
        coef = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                                  fc.t() @ yc)                          # [d, h]
        fitted = fc @ coef
        _, vecs = torch.linalg.eigh(fitted.t() @ fitted)                 # ascending
        v = vecs[:, -min(rank, h):]                                      # [h, r]
        w_in, w_out = (coef @ v).t(), v                                  # [r, d], [h, r]
        out["bias"].append(mu_y - w_out @ (w_in @ mu_f))
        out["weight_in"].append(w_in)
        out["weight_out"].append(w_out)
    return {k: torch.stack(v).float() for k, v in out.items() if v}


def apply_groups(weights: dict[str, torch.Tensor], ln1: torch.Tensor, partials: torch.Tensor,
                 inputs: str = "ln1") -> torch.Tensor:
    """C_g for every group, [t, G, h] (what SPDCompensation computes, on flat tokens)."""
    out = weights["bias"].unsqueeze(0).expand(ln1.shape[0], -1, -1).clone()
    if "weight_in" in weights:
        for g in range(partials.shape[1]):
            f = _features(ln1, partials[:, g], inputs)
            out[:, g] += f @ weights["weight_in"][g].t() @ weights["weight_out"][g].t()
    return out


@torch.no_grad()
def block_partials(layer, x_cache: torch.Tensor, cfg, groups: int, ctx: dict, *,
                   micro_batch: int = 4, max_tokens: int = 8192):
    """(X [t, h], per-SPD-group partials A_g [t, G, h], b_O or 0) of dense ``layer`` on
    calibration inputs ``x_cache`` [n, s, h]; the KV groups of an SPD group are contiguous."""
    x, parts, _ = activations.block_stats(layer, x_cache, cfg, ctx, micro_batch, max_tokens)
    per = parts.shape[1] // groups
    kv_groups = [list(range(g * per, (g + 1) * per)) for g in range(groups)]
    return x, group_partials(parts, kv_groups), out_bias(layer)


def group_partials(kv_parts: torch.Tensor, kv_groups: list[list[int]]) -> torch.Tensor:
    """Per-KV-group partials [t, ng, h] -> per SPD group [t, G, h] (group g = ``kv_groups[g]``)."""
    return torch.stack([kv_parts[:, kvs].sum(1) for kvs in kv_groups], 1)


def out_bias(layer):
    bias = layer.self_attention.linear_proj.bias
    return 0.0 if bias is None else bias.detach().float().cpu()


def mlp_input_weights(x: torch.Tensor, partials: torch.Tensor, b_o) -> torch.Tensor:
    """Per-token ``1 / rms(H)^2`` of the dense MLP input H = X + sum A + b_O."""
    h = x + partials.sum(1) + b_o
    return 1.0 / h.pow(2).mean(-1).clamp_min(1e-12)


@torch.no_grad()
def fit_stats(layer, x: torch.Tensor, partials: torch.Tensor, b_o, rank: int,
              inputs: str = "ln1", *, ridge: float = 1e-2
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Fit on gathered statistics (``block_partials``; ``partials`` per SPD group in the order
    the plan's weights will have). Returns (weights, C [t, G, h] on these tokens, weighted
    fraction of the missing term's energy removed)."""
    ln1 = layer.input_layernorm(x.to(compat.device())).float().cpu()
    w = mlp_input_weights(x, partials, b_o)
    weights = fit_groups(ln1, partials, rank, inputs, ridge=ridge, weights=w)
    comp = apply_groups(weights, ln1, partials, inputs)
    missing = partials.sum(1, keepdim=True) - partials
    w = (w / w.sum())[:, None]
    explained = 1.0 - float((w * (missing - comp).pow(2).sum(-1)).sum()
                            / (w * missing.pow(2).sum(-1)).sum().clamp_min(1e-30))
    return weights, comp, explained


@torch.no_grad()
def fit_block(model, block: int, x_cache: torch.Tensor, cfg, groups: int, rank: int,
              inputs: str = "ln1", *, ridge: float = 1e-2, micro_batch: int = 4,
              max_tokens: int = 8192) -> CompensationFit:
    """Fit block ``block`` of the dense ``model`` (T=1; its weights as the plan will use them,
    i.e. after any head-grouping permutation) on its calibration inputs ``x_cache``."""
    activations.require_full_weights("the compensation fit", "fitted")
    layer = model.decoder.layers[block]
    ctx = activations.context(model, x_cache.shape[1])
    x, parts, b_o = block_partials(layer, x_cache, cfg, groups, ctx, micro_batch=micro_batch,
                                   max_tokens=max_tokens)
    weights, _, explained = fit_stats(layer, x, parts, b_o, rank, inputs, ridge=ridge)
    return CompensationFit(block, weights, explained)


def state_dict_entries(fits: Sequence[CompensationFit]) -> FullStateDict:
    """Full-state-dict entries of fitted blocks (names as the SPD layer registers them)."""
    return {f"decoder.layers.{f.block}.spd_compensation.{k}": v
            for f in fits for k, v in f.weights.items()}
