"""Run a function on N spawned ranks over gloo and collect what each returns (tests, examples).

``run_ranks(fn, world, *args, tp=...)`` starts ``world`` processes with the torchrun environment,
initialises megatron's parallel state (``distributed.init``), calls ``fn(*args, **kwargs)`` on
every rank and returns the per-rank results (anything ``torch.save`` can pickle) in rank order.
A failing rank's traceback is re-raised in the caller; a hung group is killed after ``timeout``.
``fn`` must be importable (a module-level function).
"""
from __future__ import annotations

import os
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from .parallel import distributed


def _worker(rank: int, world: int, port: int, tp: int | None, threads: int, fn: Callable,
            args: tuple, kwargs: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # deprecation chatter from megatron/torch internals drowns real output in every rank
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
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


def run_ranks(fn: Callable, world: int, *args: Any, tp: int | None = None,
              timeout: float = 600, threads: int | None = None, **kwargs: Any) -> list[Any]:
    """``fn(*args, **kwargs)`` on ``world`` fresh ranks (TP = ``tp``, default ``world``).
    ``_timeout_s`` and ``_backend`` in kwargs go to ``distributed.init``."""
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="spd-ranks-") as out_dir:
        port = distributed.free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, tp, threads, fn, args,
                                                   dict(kwargs), out_dir), daemon=False)
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = sorted(Path(out_dir).glob("rank*.err"))
        if errors:
            raise RuntimeError(f"{len(errors)} rank(s) failed; first:\n{errors[0].read_text()}")
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


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
