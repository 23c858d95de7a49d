"""Fine-tuning losses: LM cross-entropy and logit distillation on vocab-parallel logits, and
distillation of the final hidden states.

The logits of a TP model are split over the vocabulary (each rank holds V/T columns). Gathering
them costs T x the memory of the largest tensor in the step, so both losses work on the shards:
cross-entropy through megatron-core's ``vocab_parallel_cross_entropy``, and the distillation KL
written the same way (per-token log-sum-exp over TP with one all-reduce). Every term that follows
a TP reduction is identical on all ranks, so megatron's identity-backward reduction hands each
rank exactly the gradient of its own shard; the test compares TP=2 with TP=1. The hidden-state
loss (``hidden_mse``) works on the decoder's output, whole on every rank or, with sequence
parallel, split over the sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``logits`` [b, s, V/T] (this rank's shard), ``labels`` [b, s].

    megatron's kernel subtracts the per-token max from fp32 logits in place: use them for
    nothing else afterwards."""
    return vocab_parallel_cross_entropy(logits.float(), labels).mean()


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return t


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/tau) || softmax(student/tau)) * tau^2.

    Both arguments are this rank's vocabulary shards [b, s, V/T]; the teacher gets no gradient.
    Written as  sum p_t log p_t  -  sum p_t s  +  logsumexp(s): the two sums are reduced over TP
    before the log-sum-exp is added, so the gradient reaching each shard is p_s - p_t exactly.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    s = student.float() / temperature
    with torch.no_grad():
        t = teacher.float() / temperature
        t_max = _all_reduce(t.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX)
        t_sum = _all_reduce((t - t_max).exp().sum(dim=-1, keepdim=True))
        log_pt = t - t_max - t_sum.log()
        p_t = log_pt.exp()
        neg_entropy = _all_reduce((p_t * log_pt).sum(dim=-1))
        s_max = _all_reduce(s.detach().max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX)
    sum_exp = reduce_from_tensor_model_parallel_region((s - s_max).exp().sum(dim=-1).contiguous())
    lse_s = s_max.squeeze(-1) + sum_exp.log()
    cross = reduce_from_tensor_model_parallel_region((p_t * s).sum(dim=-1).contiguous())
    return (neg_entropy - cross + lse_s).mean() * temperature ** 2


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor,
               sequence_parallel: bool) -> torch.Tensor:
    """Mean squared error between the student's and the teacher's final hidden states (the
    decoder's output, after its last norm), over every token and hidden unit.

    Without sequence parallel both are whole [s, b, h] on every TP rank and every rank computes
    the same loss (megatron's convention for replicated activations). With sequence parallel
    each rank holds [s/T, b, h]: the squared errors are summed over TP with megatron's
    forward-all-reduce (identity backward), so each shard gets the gradient of its own tokens."""
    diff = student.float() - teacher.detach().float()
    if not sequence_parallel:
        return diff.pow(2).mean()
    total = reduce_from_tensor_model_parallel_region(diff.pow(2).sum().reshape(1))
    count = diff.numel() * parallel_state.get_tensor_model_parallel_world_size()
    return total[0] / count
