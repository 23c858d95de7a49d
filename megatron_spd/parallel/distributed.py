"""Process-group set-up for torchrun (one node or many) and for tests' spawned workers.

``init`` reads the standard torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), picks NCCL on GPU and gloo on CPU, creates megatron-core's TP/DP groups through
``parallel_state`` and seeds (compat.apply). A single process without torchrun gets a world of
one. The collective timeout bounds how long survivors wait for a dead rank: they fail with
torch.distributed's timeout error instead of hanging.

Also the questions every rank asks about its place in the world, answered once here: ``rank``,
``is_rank0`` (who prints and writes), ``tp_size``, ``dp_rank_size``, and ``progress`` (a bar
shown by rank 0 only).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..errors import InputError
from . import compat

DEFAULT_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(tp: Optional[int] = None, *, seed: int = 1234, timeout_s: float = DEFAULT_TIMEOUT_S,
         backend: Optional[str] = None) -> None:
    """Initialise torch.distributed and megatron's parallel state: TP = ``tp`` (default: world
    size), data parallel = world size / TP. Safe to call again with the same ``tp``.
    ``backend``: default NCCL on GPU, gloo on CPU; gloo on a GPU lets several ranks share one
    device (each local rank uses device ``LOCAL_RANK % device count``; NCCL refuses that itself)."""
    if not dist.is_initialized():
        if compat.on_gpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = backend or compat.backend()
        if "RANK" in os.environ:  # torchrun (or run_ranks) environment
            dist.init_process_group(backend, timeout=timeout)
        else:  # a plain single process: a world of one, with an in-memory store (no port)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
    world = dist.get_world_size()
    tp = world if tp is None else tp
    if tp < 1:
        raise InputError(f"--tp must be a positive integer, got {tp}")
    if world % tp:
        raise InputError(f"TP={tp} does not divide the world size {world}; launch "
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


@contextlib.contextmanager
def running(tp: Optional[int] = None, **kw) -> Iterator[None]:
    """``init(tp, **kw)`` for the duration of the block, then ``shutdown()`` (also on error):
    the frame of every tool's body."""
    init(tp, **kw)
    try:
        yield
    finally:
        shutdown()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def rank() -> int:
    """This process's global rank: torch.distributed's once initialised, before that torchrun's
    ``RANK`` (0 for a plain process), so code that runs before ``init`` (or without it, e.g.
    ``convert_checkpoint --to hf``) asks the same question the same way."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_rank0() -> bool:
    """Global rank 0: the one rank that prints, shows progress and writes reports."""
    return rank() == 0


def dp_rank_size() -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of this process; (0, 1) without parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def progress(iterable=None, *, total: Optional[int] = None, desc: Optional[str] = None,
             enabled: bool = True, **kw):
    """A tqdm bar on global rank 0 only (every rank runs the same loop; one bar is enough), and
    only when ``enabled``; ``kw`` goes to tqdm (e.g. ``leave=False`` for an inner loop)."""
    from tqdm import tqdm

    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=not (enabled and is_rank0()), **kw)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
