"""Process-group set-up for torchrun (one node or many) and for tests' spawned workers.

``init`` reads the standard torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), picks NCCL on GPU and gloo on CPU, creates megatron-core's TP/DP groups through
``parallel_state`` and seeds (compat.apply). A single process without torchrun gets a world of
one. The collective timeout bounds how long survivors wait for a dead rank: they fail with
torch.distributed's timeout error instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from . import compat

DEFAULT_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(tp: Optional[int] = None, *, seed: int = 1234,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed and megatron's parallel state: TP = ``tp`` (default: world
    size), data parallel = world size / TP. Safe to call again with the same ``tp``."""
    if not dist.is_initialized():
        if compat.on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun (or run_ranks) environment
            dist.init_process_group(compat.backend(), timeout=timeout)
        else:  # a plain single process: a world of one, with an in-memory store (no port)
            dist.init_process_group(compat.backend(), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
    world = dist.get_world_size()
    tp = world if tp is None else tp
    if tp < 1 or world % tp:
        raise ValueError(f"TP={tp} does not divide the world size {world}; launch "
                         f"torchrun --nproc-per-node with a multiple of {tp}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError("parallel state already initialised with another TP degree")
    else:
        # megatron's TP/DP groups get their own timeout (default 30 min), not the world's
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 distributed_timeout_minutes=timeout_s / 60)
    compat.apply(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
