"""Block-to-block distillation (B2B, design.md 1 step 3).

Student: the SPD form of block i, initialised from the dense weights; teacher: the dense block i,
frozen; loss: MSE between their outputs on block i's calibration inputs. Only block i's
parameters are handed to the optimizer (and only they get gradients), so no other block changes.
If training ends with a higher calibration MSE than it started with (measured: lr 1e-3 diverges
on SmolLM2's block 11, whose residual stream carries very large activations), the block keeps its
initial weights and the result says so (``kept_initial``).

Which inputs (``inputs=``):
- ``"dense"``: block i's inputs in the dense model. Each block is distilled independently of the
  others, so a block's result can be reused in every plan that makes it SPD.
- ``"spd"``: block i's inputs in the partially-SPD model, i.e. after blocks 0..i-1 are already in
  their final (SPD and distilled) form; the student learns on the inputs it will see when served.
The teacher is the dense block applied to the same inputs in both cases. docs/recipe.md reports
the measured comparison and the default.

Runs in the T=1 emulation or at T=G ranks (then the partial gradients of the SPD block's norms and
``b_O`` are summed with ``grads.reduce_tp_partial_grads`` after each backward).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .. import distributed
from ..cli import option
from ..grads import reduce_tp_partial_grads
from ..train.optim import OptimConfig, adamw
from . import activations

INPUTS = ("dense", "spd")
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class B2BConfig:
    """B2B's settings; the defaults are the ones measured on SmolLM2-135M and used for every
    published number (docs/recipe.md)."""

    epochs: int = option(2, "passes over the calibration sequences per block")
    lr: float = option(1e-3, "B2B learning rate")
    optimizer: str = option("adamw", "B2B optimizer", choices=OPTIMIZERS)
    micro_batch: int = option(1, "sequences per B2B optimizer step (more, smaller steps on "
                                 "little data)")
    inputs: str = option("dense", "block inputs: the dense model's hidden states, or the "
                                  "partially-SPD model's", choices=INPUTS)

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"B2B inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"B2B optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 0 or self.lr <= 0 or self.micro_batch < 1:
            raise ValueError("B2B needs epochs >= 0, lr > 0 and micro_batch >= 1")


@dataclass
class B2BResult:
    block: int
    mse_before: float
    mse_after: float
    steps: int
    seconds: float
    kept_initial: bool = False  # training raised the MSE, so the block kept its initial weights
    mse_trained: float = float("nan")  # MSE after training, before that check


def _optimizer(params, cfg: B2BConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return adamw(params, OptimConfig(lr=cfg.lr, weight_decay=0.0))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


@torch.no_grad()
def _mse(layer, x_cache: torch.Tensor, y_cache: torch.Tensor, ctx: dict, mb: int) -> float:
    total, count = 0.0, 0
    for sl in activations.micro_batches(x_cache.shape[0], mb):
        y = activations.run_layers([layer], activations.to_sbh(x_cache, sl), ctx)
        total += float((y.float() - activations.to_sbh(y_cache, sl).float()).pow(2).sum())
        count += y.numel()
    return total / count


def distill_block(model, block: int, x_cache: torch.Tensor, y_cache: torch.Tensor,
                  cfg: B2BConfig, *, seed: int = 0) -> B2BResult:
    """Train ``model.decoder.layers[block]`` so that it maps ``x_cache`` to ``y_cache``
    (both ``[n, s, h]``, the teacher's outputs) with MSE. Changes only that block."""
    activations.check_model(model)
    t0 = time.time()
    layer = model.decoder.layers[block]
    ctx = activations.context(model, x_cache.shape[1])
    params = list(layer.parameters())
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.train()
    before = _mse(layer, x_cache, y_cache, ctx, cfg.micro_batch)
    initial = [p.detach().clone() for p in params]
    opt = _optimizer(params, cfg)
    gen = torch.Generator().manual_seed(seed + block)
    n, steps = x_cache.shape[0], 0
    try:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for sl in activations.micro_batches(n, cfg.micro_batch):
                idx = perm[sl]
                y = activations.run_layers([layer], activations.to_sbh(x_cache, idx), ctx)
                loss = torch.nn.functional.mse_loss(y.float(), activations.to_sbh(y_cache, idx).float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                reduce_tp_partial_grads(model)
                opt.step()
                steps += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        model.train(was_training)
    after = _mse(layer, x_cache, y_cache, ctx, cfg.micro_batch)
    kept_initial = after > before  # a diverged run (too high lr for this block) is undone
    if kept_initial:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
    return B2BResult(block, before, min(before, after), steps, time.time() - t0,
                     kept_initial=kept_initial, mse_trained=after)


@torch.no_grad()
def _apply(layer, x_cache: torch.Tensor, ctx: dict, mb: int) -> torch.Tensor:
    out = torch.empty_like(x_cache)
    for sl in activations.micro_batches(x_cache.shape[0], mb):
        out[sl] = activations.to_bsh(activations.run_layers([layer], activations.to_sbh(x_cache, sl), ctx))
    return out


def distill(model, teacher, tokens: torch.Tensor, block_list: list[int], cfg: B2BConfig, *,
            progress: bool = True) -> list[B2BResult]:
    """B2B for every block in ``block_list`` of ``model`` (SPD blocks where its plan says so),
    teacher = the dense ``teacher`` model with the same starting weights, on ``tokens``
    ``[n, s]``. Blocks are visited in order, carrying the hidden states forward, so the
    ``"spd"`` inputs of block i come from the already-distilled blocks before it."""
    activations.check_model(model)
    todo = sorted(set(block_list))
    if not todo:
        return []
    mb = cfg.micro_batch
    ctx = activations.context(model, tokens.shape[1])
    with torch.no_grad():
        x_dense = torch.cat([activations.to_bsh(activations.embed(teacher, tokens[sl]))
                             for sl in activations.micro_batches(tokens.shape[0], mb)])
    x_spd = x_dense.clone() if cfg.inputs == "spd" else None
    results = []
    bar = distributed.progress(range(todo[-1] + 1), desc=f"B2B ({cfg.inputs} inputs)",
                               enabled=progress)
    for i in bar:
        t_layer, s_layer = teacher.decoder.layers[i], model.decoder.layers[i]
        x_in = x_dense if cfg.inputs == "dense" else x_spd
        y_teacher = None
        if i in todo:
            y_teacher = _apply(t_layer, x_in, ctx, mb)
            r = distill_block(model, i, x_in, y_teacher, cfg)
            results.append(r)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(block=i, mse=f"{r.mse_before:.3g}->{r.mse_after:.3g}")
        if i < todo[-1]:
            if cfg.inputs == "spd":
                x_spd = _apply(s_layer, x_spd, ctx, mb)
            else:
                x_dense = y_teacher if y_teacher is not None else _apply(t_layer, x_dense, ctx, mb)
    return results


def describe(results: list[B2BResult], cfg: Optional[B2BConfig] = None) -> Optional[dict[str, Any]]:
    """Compact record for the plan file."""
    if not results:
        return None
    d: dict[str, Any] = {"blocks": {str(r.block): {k: v for k, v in asdict(r).items() if k != "block"}
                                    for r in results}}
    if cfg is not None:
        d["config"] = asdict(cfg)
    return d
