"""Optimizer, gradient clipping and learning-rate schedule for fine-tuning a DDP-wrapped model.

On GPU this is megatron-core's own optimizer (``get_megatron_optimizer``: it reads ``main_grad``,
computes the TP-aware gradient norm, clips and steps). It hard-codes CUDA (optimizer/optimizer.py:907,
clip_grads.py:90), so on CPU we use ``adamw`` (torch AdamW, whose per-rank state is TP-sharded
exactly like the parameters) and do the same three things by hand:
``p.grad = p.main_grad``; the global gradient norm, where TP-sharded parameters contribute their
shard and replicated ones are counted once (megatron's ``param_is_not_tensor_parallel_duplicate``),
summed over the model-parallel group (gradients are already DP-averaged by DDP); clip; step.
The schedule is megatron-core's ``OptimizerParamScheduler`` in both cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from ..options import option
from ..parallel import compat

DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (megatron's ``OptimizerParamScheduler``)."""

    lr: float = option(3e-5, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    warmup_steps: int = option(0, "linear warm-up steps")
    decay_style: str = option("cosine", "learning-rate decay after warm-up",
                              choices=DECAY_STYLES, flag="--lr-decay-style")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2")
    clip_grad: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"lr decay style {self.decay_style!r} is not one of {DECAY_STYLES}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")


def adamw(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW with ``cfg``'s lr, weight decay and betas (no schedule, no clipping): the CPU
    optimizer of fine-tuning, and B2B's default optimizer on any device."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=(cfg.adam_beta1, cfg.adam_beta2))


class Optimizer:
    """One interface over megatron's optimizer (GPU) and torch AdamW (CPU) for a DDP model."""

    def __init__(self, ddp_model, cfg: OptimConfig, total_steps: int):
        if cfg.warmup_steps >= total_steps:
            raise ValueError(f"warmup ({cfg.warmup_steps} steps) must be shorter than the run "
                             f"({total_steps} steps)")
        self.cfg = cfg
        self.ddp = ddp_model
        self.params = [p for p in ddp_model.parameters() if p.requires_grad]
        if compat.on_gpu():
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            mcfg = ddp_model.config
            self.opt = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
                bf16=mcfg.bf16, fp16=mcfg.fp16, params_dtype=mcfg.params_dtype,
                use_distributed_optimizer=False), [ddp_model])
        else:
            self.opt = adamw(self.params, cfg)
        self.scheduler = OptimizerParamScheduler(
            self.opt, init_lr=0.0 if cfg.warmup_steps else cfg.lr, max_lr=cfg.lr,
            min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=total_steps,
            lr_decay_style=cfg.decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=total_steps, wd_incr_style="constant")

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()

    def step(self) -> float:
        """Clip and apply the (finalised) gradients, advance the schedule; returns the norm."""
        if compat.on_gpu():
            ok, norm, _ = self.opt.step()
            if not ok:
                raise FloatingPointError("megatron optimizer skipped the step (inf/nan gradients)")
        else:
            for p in self.params:
                p.grad = p.main_grad if hasattr(p, "main_grad") else p.grad
            norm = grad_norm(self.params)
            if self.cfg.clip_grad > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.clip_grad,
                                                     torch.tensor(norm))
            self.opt.step()
            for p in self.params:  # DDP's hook would add a stale .grad into main_grad again
                p.grad = None
        self.scheduler.step(1)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the full gradient: shards of TP-split parameters plus one copy of each
    replicated parameter, summed over the model-parallel group."""
    sq = torch.zeros((), dtype=torch.float64, device=compat.device())
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.detach().double().pow(2).sum()
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(sq, group=group)
    return float(sq.sqrt())
