"""Block-to-block distillation (B2B, design.md 1 step 3).

Student: the SPD form of block i, initialised from the dense weights; teacher: the dense block i,
frozen; loss: MSE between their outputs on block i's calibration inputs. Only block i's
parameters are handed to the optimizer (and only they get gradients), so no other block changes.
If training ends with a higher calibration MSE than it started with (measured: lr 1e-3 diverges
on SmolLM2's block 11, whose residual stream carries very large activations), the block keeps its
initial weights and the result says so (``kept_initial``).

Which inputs (``inputs=``) and targets (``targets=``); recover.py runs the blocks in order:
- ``"dense"`` inputs: block i's inputs in the dense model. Each block is distilled independently
  of the others, so a block's result can be reused in every plan that makes it SPD.
- ``"spd"`` inputs (sequential): block i's inputs in the partially-SPD model, i.e. after blocks
  0..i-1 are already in their final (SPD and recovered) form; the student learns on the inputs
  it will see when served.
- ``"block"`` targets: the dense block applied to the same inputs; ``"trajectory"`` targets:
  the dense model's own hidden state after block i, so with ``"spd"`` inputs each block also
  corrects the error the SPD blocks before it left in the residual stream (with dense inputs
  the two are the same).
docs/recipe.md and docs/recovery.md report the measured comparisons and the defaults.

Learning rate: one ``lr``, or ``lr_search`` candidates, each probed for ``probe_steps`` steps from
the block's initial weights; the one with the lowest calibration MSE then runs the whole
schedule (blocks differ by orders of magnitude in activation scale). ``clip_grad`` clips the
block's gradient norm (0 = off).

Runs in the T=1 emulation or at T=G ranks (then the partial gradients of the SPD block's norms and
``b_O`` are summed with ``grads.reduce_tp_partial_grads`` after each backward).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ..core.grads import reduce_tp_partial_grads
from ..options import floats, option
from ..train.optim import OptimConfig, adamw
from . import activations

INPUTS = ("dense", "spd")
TARGETS = ("block", "trajectory")
LOSSES = ("mse", "relative")
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class B2BConfig:
    """B2B's settings; the defaults are the recipe measured best on SmolLM2-135M
    (docs/recovery.md: sequential inputs, trajectory targets, one pass over 32 x 512 tokens);
    docs/recipe.md's table used epochs=2, inputs="dense", targets="block" on 4 x 512."""

    epochs: int = option(1, "passes over the calibration sequences per block")
    lr: float = option(1e-3, "B2B learning rate")
    optimizer: str = option("adamw", "B2B optimizer", choices=OPTIMIZERS)
    micro_batch: int = option(1, "sequences per B2B optimizer step (more, smaller steps on "
                                 "little data)")
    inputs: str = option("spd", "block inputs: the dense model's hidden states, or the "
                                "partially-SPD model's (sequential)", choices=INPUTS)
    targets: str = option("trajectory", "B2B targets: the dense block on the same inputs, or the "
                                        "dense model's own hidden states after the block "
                                        "(the same with dense inputs)", choices=TARGETS)
    lr_search: tuple[float, ...] = option((), "candidate learning rates probed per block "
                                              "(empty: use --lr)", type=floats)
    probe_steps: int = option(4, "steps of each lr-search probe")
    clip_grad: float = option(0.0, "clip the block's gradient norm (0 = off)")
    loss: str = option("mse", "B2B loss: mean squared error, or 'relative' (each token's error "
                              "over its target's mean square)", choices=LOSSES)

    def __post_init__(self) -> None:
        self.lr_search = tuple(self.lr_search)
        if self.inputs not in INPUTS:
            raise ValueError(f"B2B inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"B2B targets must be one of {TARGETS}, got {self.targets!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"B2B optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 0 or self.lr <= 0 or self.micro_batch < 1 or self.clip_grad < 0:
            raise ValueError("B2B needs epochs >= 0, lr > 0, micro_batch >= 1, clip_grad >= 0")
        if any(lr <= 0 for lr in self.lr_search) or self.probe_steps < 1:
            raise ValueError("B2B lr_search candidates must be > 0 and probe_steps >= 1")


@dataclass
class B2BResult:
    block: int
    mse_before: float
    mse_after: float
    steps: int
    seconds: float
    kept_initial: bool = False  # training raised the MSE, so the block kept its initial weights
    mse_trained: float = float("nan")  # MSE after training, before that check
    lr: float = float("nan")           # the learning rate used (chosen by lr_search if given)
    probes: dict[str, float] = field(default_factory=dict)  # lr -> MSE after the probe


def _optimizer(params, cfg: B2BConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return adamw(params, OptimConfig(lr=lr, weight_decay=0.0))
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def block_loss(y: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean squared error, or (``"relative"``) each token's squared error divided by the mean
    square of its target, the scale the next norm divides out."""
    err = (y.float() - target.float()).pow(2)
    if kind == "relative":
        err = err / target.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
    return err.mean()


@torch.no_grad()
def _mse(layer, x_cache: torch.Tensor, y_cache: torch.Tensor, ctx: dict, mb: int,
         kind: str = "mse") -> float:
    total, count = 0.0, 0
    for sl in activations.micro_batches(x_cache.shape[0], mb):
        y = activations.run_layers([layer], activations.to_sbh(x_cache, sl), ctx)
        total += float(block_loss(y, activations.to_sbh(y_cache, sl), kind)) * y.shape[1]
        count += y.shape[1]
    return total / count


def _train(model, layer, params, x_cache, y_cache, ctx, cfg: B2BConfig, lr: float,
           max_steps: int, gen: torch.Generator) -> int:
    """AdamW (or the configured optimizer) on the block's MSE for ``cfg.epochs`` epochs or
    ``max_steps`` steps, whichever comes first; returns the steps taken."""
    opt = _optimizer(params, cfg, lr)
    n, steps = x_cache.shape[0], 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for sl in activations.micro_batches(n, cfg.micro_batch):
            if steps >= max_steps:
                return steps
            idx = perm[sl]
            y = activations.run_layers([layer], activations.to_sbh(x_cache, idx), ctx)
            loss = block_loss(y, activations.to_sbh(y_cache, idx), cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reduce_tp_partial_grads(model)
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            steps += 1
    return steps


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
    before = _mse(layer, x_cache, y_cache, ctx, cfg.micro_batch, cfg.loss)
    initial = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)

    lr, probes, steps = cfg.lr, {}, 0
    try:
        if len(cfg.lr_search) > 1:
            for cand in cfg.lr_search:
                gen = torch.Generator().manual_seed(seed + block)
                steps += _train(model, layer, params, x_cache, y_cache, ctx, cfg, cand,
                                cfg.probe_steps, gen)
                probes[f"{cand:g}"] = _mse(layer, x_cache, y_cache, ctx, cfg.micro_batch, cfg.loss)
                restore()
            lr = float(min(probes, key=lambda k: probes[k]))
        elif cfg.lr_search:
            lr = cfg.lr_search[0]
        gen = torch.Generator().manual_seed(seed + block)
        steps += _train(model, layer, params, x_cache, y_cache, ctx, cfg, lr,
                        cfg.epochs * x_cache.shape[0], gen)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
            p.grad = None
        model.train(was_training)
    after = _mse(layer, x_cache, y_cache, ctx, cfg.micro_batch, cfg.loss)
    kept_initial = after > before  # a diverged run (too high lr for this block) is undone
    if kept_initial:
        restore()
    return B2BResult(block, before, min(before, after), steps, time.time() - t0,
                     kept_initial=kept_initial, mse_trained=after, lr=lr, probes=probes)


@torch.no_grad()
def apply_layer(layer, x_cache: torch.Tensor, ctx: dict, mb: int) -> torch.Tensor:
    """``layer`` applied to every sequence of an ``[n, s, h]`` cache (same layout out)."""
    out = torch.empty_like(x_cache)
    for sl in activations.micro_batches(x_cache.shape[0], mb):
        out[sl] = activations.to_bsh(activations.run_layers([layer], activations.to_sbh(x_cache, sl), ctx))
    return out


def describe(results: list[B2BResult], cfg: Optional[B2BConfig] = None) -> Optional[dict[str, Any]]:
    """Compact record for the plan file."""
    if not results:
        return None
    d: dict[str, Any] = {"blocks": {str(r.block): {k: v for k, v in asdict(r).items() if k != "block"}
                                    for r in results}}
    if cfg is not None:
        d["config"] = asdict(cfg)
    return d
