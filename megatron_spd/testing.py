"""Run a function on N spawned ranks over gloo and collect what each returns (tests, examples).

``run_ranks(fn, world, *args, tp=...)`` runs ``fn(*args, **kwargs)`` on ``world`` processes with
the torchrun environment, each with megatron's parallel state initialised (``distributed.init``)
for the call and torn down after it, and returns the per-rank results in rank order. A failing
rank's traceback is re-raised in the caller; a hung group is killed after ``timeout``. ``fn`` must
be importable (a module-level function).

Results must be plain data: tensors, numbers, strings, bytes, None, and dicts, lists and tuples
of them. A rank writes its result with ``torch.save`` and the caller reads it back with
``torch.load(weights_only=True)``, so no path in the package runs a full unpickler, not even on
files our own ranks wrote (the project's rule: never unpickle bytes that could run code); nothing
of ours is allow-listed (that reader also admits torch's own types, dtypes and sizes, and the
enums and configs megatron-core registers at import). A rank function with a package object to
return (a dataclass, a plan) returns its fields instead (``dataclasses.asdict``, ``to_dict()``)
and the test rebuilds it; anything else is refused with an error naming the rank and the class.

Why a pool: a spawned rank spends seconds importing torch and megatron-core before it computes
anything, and the test suite runs about thirty rank groups. The ranks of one world size are
therefore kept alive between calls and reused (one import per rank per session). A call still sees
what a fresh rank sees: a new process group on a new port, the parallel state built for its TP
degree and destroyed after (and ``sys.excepthook``, which init wraps, put back),
``distributed.init``'s seeding (``compat.apply``), the thread count asked for, the caller's
``sys.path``, and the environment restored. A rank that fails, hangs or exits ends its whole
group, so a broken call never leaks into the next one; ``fresh=True`` uses a group of new
processes for that call only (a test that kills or patches a rank).
"""
from __future__ import annotations

import atexit
import os
import pickle
import re
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from .parallel import distributed


def _call(rank: int, world: int, port: int, tp: int | None, threads: int, fn: Callable,
          args: tuple, kwargs: dict, out_dir: str) -> None:
    """One call on one rank: the torchrun environment, init, ``fn``, the result file, shutdown.
    A failure leaves its traceback in ``rank<N>.err`` and propagates (the rank then exits)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # init_process_group wraps sys.excepthook to prefix "[rankN]: "; a pooled rank would stack
    # one more prefix per call on every line of its final traceback
    excepthook = sys.excepthook
    try:
        distributed.init(tp, timeout_s=kwargs.pop("_timeout_s", 120),
                         backend=kwargs.pop("_backend", None))
        result = fn(*args, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        distributed.shutdown()
        sys.excepthook = excepthook


def _serve(rank: int, world: int, conn) -> None:
    """A pooled rank: run each call received on ``conn`` and answer when it is done; exit when
    the parent closes the pipe."""
    # deprecation chatter from megatron/torch internals drowns real output in every rank
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    while True:
        try:
            # the caller's import path first (as a fresh spawn would get it), then the call,
            # whose function may live in a directory the caller added since this rank started
            sys.path[:] = conn.recv()
            job = conn.recv()
        except EOFError:
            return
        env = dict(os.environ)
        _call(rank, world, *job)
        os.environ.clear()
        os.environ.update(env)
        conn.send(True)


class _Group:
    """``world`` spawned ranks waiting for calls."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(r, world, child), daemon=False)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, job: tuple, timeout: float) -> tuple[list[int], list[int]]:
        """Send ``job`` to every rank and wait until each has answered or exited, or until
        ``timeout``. Returns (ranks still busy, ranks that exited)."""
        for conn in self.conns:
            conn.send(list(sys.path))
            conn.send(job)
        deadline = time.monotonic() + timeout
        busy, exited = set(range(len(self.procs))), []
        while busy and (left := deadline - time.monotonic()) > 0:
            ready = wait([self.conns[r] for r in busy] + [self.procs[r].sentinel for r in busy],
                         left)
            for r in list(busy):
                if self.conns[r] in ready:
                    try:
                        self.conns[r].recv()
                        busy.discard(r)
                        continue
                    except EOFError:  # its end of the pipe closed: the rank is exiting
                        self.procs[r].join(max(0.0, deadline - time.monotonic()))
                if not self.procs[r].is_alive():
                    busy.discard(r)
                    exited.append(r)
        return sorted(busy), sorted(exited)

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()  # an idle rank reads EOF and returns
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_POOL: dict[int, _Group] = {}


@atexit.register
def _close_pool() -> None:
    while _POOL:
        _POOL.popitem()[1].close()


def run_ranks(fn: Callable, world: int, *args: Any, tp: int | None = None,
              timeout: float = 600, threads: int | None = None, fresh: bool = False,
              **kwargs: Any) -> list[Any]:
    """``fn(*args, **kwargs)`` on ``world`` ranks (TP = ``tp``, default ``world``), the pooled
    ones unless ``fresh``. ``_timeout_s`` and ``_backend`` in kwargs go to ``distributed.init``."""
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    group = None if fresh else _POOL.pop(world, None)
    if group is None or not group.alive():
        if group is not None:
            group.close()
        group = _Group(world)
    with tempfile.TemporaryDirectory(prefix="spd-ranks-") as out_dir:
        job = (distributed.free_port(), tp, threads, fn, args, dict(kwargs), out_dir)
        try:
            hung, exited = group.call(job, timeout)
        except BaseException:
            group.close()
            raise
        if hung or exited or fresh:
            for r in hung:
                group.procs[r].kill()
            group.close()
        else:
            _POOL[world] = group
        errors = sorted(Path(out_dir).glob("rank*.err"))
        if errors:
            raise RuntimeError(f"{len(errors)} rank(s) failed; first:\n{errors[0].read_text()}")
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        if exited:
            raise RuntimeError(f"ranks {exited} exited with codes "
                               f"{[group.procs[r].exitcode for r in exited]}")
        return [_load_result(Path(out_dir), r, fn) for r in range(world)]


def _load_result(out_dir: Path, rank: int, fn: Callable) -> Any:
    """Rank ``rank``'s result, read with the restricted unpickler (module docstring); a result
    that is not plain data is refused naming the rank, the function and the class it met."""
    try:
        return torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests allow-listing the class; the fix here is to return plain data
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use |$)", str(e), re.M)
        what = found.group(1) if found else str(e).strip().splitlines()[0]
        raise TypeError(
            f"rank {rank}'s result of {getattr(fn, '__qualname__', fn)} is not plain data "
            f"({what}): run_ranks results must be plain tensors, numbers, strings, None and "
            "dicts/lists/tuples of them; return dataclasses.asdict(x) or the tensors needed "
            "instead") from None


def logits_and_grads(cfg, plan, full_state_dict: dict, tokens: torch.Tensor,
                     loss_weights: torch.Tensor, *, sequence_parallel: bool = False,
                     prepare: Callable | None = None,
                     **config_overrides: Any) -> tuple[torch.Tensor, dict]:
    """Logits [b, s, V] (CPU) and full gradients of ``sum(logits * loss_weights)`` for ``cfg``
    with ``plan`` and the given full weights at the current TP degree: the quantities every
    exactness comparison (TP=N vs T=1, megatron vs tests/reference.py) is made on.
    ``prepare(model)`` runs after the model is built (e.g. to register hooks)."""
    from .core.grads import reduce_tp_partial_grads
    from .core.sharding import forward_logits, gather_full_state_dict, load_full_state_dict
    from .core.spec import build_model

    model = build_model(cfg, plan, sequence_parallel=sequence_parallel, **config_overrides)
    load_full_state_dict(model, full_state_dict)
    if prepare is not None:
        prepare(model)
    logits = forward_logits(model, tokens)
    (logits * loss_weights.to(logits.device)).sum().backward()
    reduce_tp_partial_grads(model)
    return logits.detach().cpu(), gather_full_state_dict(model, grads=True)
