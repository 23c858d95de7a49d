"""A host clock that is honest on a GPU.

CUDA kernels run asynchronously: reading ``time.perf_counter()`` right after launching work
measures the launches, not the work. ``now()`` first waits for the current device's queued work
(``torch.cuda.synchronize``), then reads the clock. Nothing is waited for on CPU, before CUDA is
initialised, or while a CUDA graph is being captured (waiting is illegal then, and captured work
runs later, at replay, where the caller times the replay).
"""
from __future__ import annotations

import time

import torch


def sync() -> None:
    """Wait for the current CUDA device's queued work, where there is any to wait for."""
    if (torch.cuda.is_available() and torch.cuda.is_initialized()
            and not torch.cuda.is_current_stream_capturing()):
        torch.cuda.synchronize()


def now() -> float:
    """``time.perf_counter()`` after the device's queued work has finished."""
    sync()
    return time.perf_counter()
