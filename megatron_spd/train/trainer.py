"""One fine-tuning step through megatron-core's training machinery, at any TP x DP.

The student is wrapped in megatron-core's ``DistributedDataParallel`` (gradients accumulate in
``main_grad`` buffers); a step is: zero the buffers, forward/backward each micro-batch, then
``finalize_model_grads`` (DP all-reduce; sequence-parallel norm grads over TP), then
``grads.reduce_tp_partial_grads`` for the gradients that SPD blocks leave partial per TP rank
(megatron knows nothing of those; design.md 3), then the optimizer (optim.py) clips and steps.

Loss per micro-batch: ``(1 - distill) * LM + distill * KD`` (losses.py), divided by the number of
micro-batches; DDP averages over DP, so DP=d x micro-batch b gives the update of DP=1 x d*b.
KD is the KL of the next-token distributions (``distill_on="logits"``) or the mean squared error
of the final hidden states (``"hidden"``), read from the decoder's output by a forward hook on
student and teacher (GPTModel returns only logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from ..core.grads import reduce_tp_partial_grads
from ..core.sharding import causal_mask
from ..options import option
from ..parallel import compat
from ..parallel.distributed import dp_rank_size
from .batches import SampleOrder
from .losses import hidden_mse, kd_loss, lm_loss
from .optim import OptimConfig, Optimizer


DISTILL_TARGETS = ("logits", "hidden")


@dataclass
class StepConfig:
    """What one optimizer step consumes and which loss it minimises."""

    micro_batch: int = option(4, "sequences per data-parallel rank per micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    distill: float = option(0.0, "weight of distillation from the dense teacher (0..1; "
                                 "0 = language-model loss only; see --distill-on)")
    temperature: float = option(1.0, "distillation temperature (of the logits' KL)")
    distill_on: str = option("logits", "what distillation matches: 'logits' (KL of the "
                                       "next-token distributions) or 'hidden' (mean squared "
                                       "error of the final hidden states, after the last norm)",
                             choices=DISTILL_TARGETS)

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch and grad_accum must be >= 1")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill weight must be in [0, 1], got {self.distill}")
        if self.distill_on not in DISTILL_TARGETS:
            raise ValueError(f"distill_on must be one of {DISTILL_TARGETS}, "
                             f"got {self.distill_on!r}")


def _dp_mean(values: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
        values /= dist.get_world_size(group)
    return values


class Trainer:
    """Owns the DDP-wrapped student, the frozen teacher (if distilling) and the optimizer."""

    def __init__(self, model, step_cfg: StepConfig, optim_cfg: OptimConfig, total_steps: int,
                 teacher=None):
        if step_cfg.distill > 0 and teacher is None:
            raise ValueError("distill > 0 needs a teacher model (the dense plan of the checkpoint)")
        self.cfg = step_cfg
        self.model = model
        self.ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     overlap_grad_reduce=False,
                                                     use_distributed_optimizer=False),
            module=model)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = Optimizer(self.ddp, optim_cfg, total_steps)
        self.hidden: dict[str, torch.Tensor] = {}
        if step_cfg.distill > 0 and step_cfg.distill_on == "hidden":
            for name, m in (("student", model), ("teacher", teacher)):
                m.decoder.register_forward_hook(self._keep_hidden(name))

    def _keep_hidden(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_tensor(output):
                raise TypeError(f"distill_on='hidden' needs the decoder to return the hidden "
                                f"states as one tensor, got {type(output).__name__}")
            self.hidden[name] = output
        return hook

    def _distill_loss(self, logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.distill_on == "logits":
            return kd_loss(logits, t_logits, self.cfg.temperature)
        return hidden_mse(self.hidden.pop("student"), self.hidden.pop("teacher"),
                          self.model.config.sequence_parallel)

    def _forward(self, module, tokens: torch.Tensor) -> torch.Tensor:
        dev = compat.device()
        b, s = tokens.shape
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
        return module(tokens.to(dev), pos, causal_mask(s, dev))  # [b, s, V/T]

    def train_step(self, order: SampleOrder, step: int) -> dict[str, float]:
        """One optimizer step on the global batch of ``step``; returns DP-averaged metrics."""
        cfg = self.cfg
        dp_rank, dp_size = dp_rank_size()
        self.ddp.train()
        self.optimizer.zero_grad()
        sums = torch.zeros(3, dtype=torch.float64, device=compat.device())  # loss, lm, kd
        for micro in range(cfg.grad_accum):
            tokens, labels = order.micro_batch(step, micro, micro_batch=cfg.micro_batch,
                                               grad_accum=cfg.grad_accum, dp_rank=dp_rank,
                                               dp_size=dp_size)
            logits = self._forward(self.ddp, tokens)
            kd = torch.zeros((), device=logits.device)
            if cfg.distill > 0:  # before lm_loss, which shifts fp32 logits in place
                with torch.no_grad():
                    t_logits = self._forward(self.teacher, tokens)
                kd = self._distill_loss(logits, t_logits)
            lm = lm_loss(logits, labels.to(logits.device))
            loss = (1.0 - cfg.distill) * lm + cfg.distill * kd
            (loss / cfg.grad_accum).backward()
            sums += torch.stack([loss.detach(), lm.detach(), kd.detach()]).double()
        finalize_model_grads([self.ddp])
        reduce_tp_partial_grads(self.ddp.module, include_megatron_reduced=False)
        lr = self.optimizer.lr
        norm = self.optimizer.step()
        loss, lm, kd = (_dp_mean(sums / cfg.grad_accum)).tolist()
        return {"loss": loss, "lm_loss": lm, "kd_loss": kd, "grad_norm": norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, batch: Optional[int] = None) -> float:
        """Mean LM loss (nats/token) on ``samples`` [N, seq_len + 1], split over DP ranks."""
        dp_rank, dp_size = dp_rank_size()
        batch = batch or self.cfg.micro_batch
        self.ddp.eval()
        mine = samples[dp_rank::dp_size]
        total = torch.zeros(2, dtype=torch.float64, device=compat.device())
        for i in range(0, mine.shape[0], batch):
            block = mine[i:i + batch]
            logits = self._forward(self.ddp.module, block[:, :-1])
            total[0] += lm_loss(logits, block[:, 1:].to(logits.device)).double() * block.shape[0]
            total[1] += block.shape[0]
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        return float(total[0] / total[1])
