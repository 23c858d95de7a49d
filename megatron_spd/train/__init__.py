"""Fine-tuning SPD models through megatron-core's training machinery (DDP, optimizer, schedule).

``loop.finetune`` is the entry point (tools/finetune.py); ``trainer.Trainer`` is one TP x DP
step; ``losses`` the vocab-parallel LM and distillation losses; ``batches`` the resumable data
order; ``optim`` the optimizer (megatron's on GPU, torch AdamW on CPU); ``state`` the resumable
training checkpoints; ``plots`` the loss-curve plot.
"""
from .loop import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
