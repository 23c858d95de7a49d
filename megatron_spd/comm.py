"""TP collective accounting and the link simulator (design.md 6).

Both hook the same place: the torch.distributed functions megatron-core's mappings and linears
call (``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``; megatron binds the
last two at import as ``dist_all_gather_func``/``dist_reduce_scatter_func``, so those module
attributes are patched too). Only collectives on the tensor-parallel group are seen.

- ``CollectiveCounter``: counts calls and bytes by kind, e.g. to check that an SPD block issues
  one all-reduce where a dense block issues two, and measures the time spent inside them.
- ``LinkSimulator``: makes each TP collective take at least ``alpha + wire_bytes / beta`` for a
  named link profile, so high/low-bandwidth and multi-node settings can be reproduced on CPU.
  Wire bytes follow the ring algorithm: all-reduce 2(T-1)/T x payload, all-gather and
  reduce-scatter (T-1)/T x the full (gathered) tensor.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class LinkProfile:
    """A link: per-collective latency ``alpha_s`` and bandwidth ``beta_Bps`` (bytes/s)."""

    name: str
    alpha_s: float
    beta_Bps: float

    def collective_time(self, kind: str, payload_bytes: int, world: int) -> float:
        return self.alpha_s + wire_bytes(kind, payload_bytes, world) / self.beta_Bps


PROFILES = {
    "nvlink": LinkProfile("nvlink", 5e-6, 300e9),
    "internode": LinkProfile("internode", 20e-6, 50e9),
    "pcie": LinkProfile("pcie", 10e-6, 10e9),
}


def link_profile(spec: str) -> LinkProfile:
    """A named profile, or a custom one as ``alpha_us:GBps`` (e.g. ``15:25``)."""
    if spec in PROFILES:
        return PROFILES[spec]
    try:
        alpha_us, gbps = (float(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"unknown link profile {spec!r}; use one of {sorted(PROFILES)} or "
                         "a custom 'alpha_us:GBps' such as '15:25'") from None
    return LinkProfile(spec, alpha_us * 1e-6, gbps * 1e9)


def wire_bytes(kind: str, payload_bytes: int, world: int) -> float:
    """Bytes each rank sends for a ring collective on ``payload_bytes`` (the full tensor)."""
    if world <= 1:
        return 0.0
    factor = 2 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
    return factor * payload_bytes


# ----- the hook ---------------------------------------------------------------------------------
Callback = Callable[[str, int, float], None]  # (kind, payload bytes, seconds spent) -> None
_callbacks: list[Callback] = []
_delays: list[Callable[[str, int], float]] = []
_originals: dict = {}


def _patch_targets():
    import megatron.core.tensor_parallel.layers as mc_layers
    import megatron.core.tensor_parallel.mappings as mc_mappings
    import megatron.core.utils as mc_utils

    return [(dist, "all_reduce", "all_reduce"),
            (dist, "all_gather_into_tensor", "all_gather"),
            (dist, "reduce_scatter_tensor", "reduce_scatter"),
            *[(mod, "dist_all_gather_func", "all_gather") for mod in (mc_mappings, mc_layers, mc_utils)],
            *[(mod, "dist_reduce_scatter_func", "reduce_scatter") for mod in (mc_mappings, mc_layers, mc_utils)]]


def _wrap(fn, kind: str):
    def wrapped(*args, **kwargs):
        group = kwargs.get("group", args[2] if len(args) > 2 else None)
        tp = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if not _callbacks and not _delays or group is None or group is not tp:
            return fn(*args, **kwargs)
        tensor = args[0]  # all-reduce: the tensor; all-gather: the output; reduce-scatter: the input
        if kind == "reduce_scatter":
            tensor = args[1] if len(args) > 1 else kwargs["input"]
        nbytes = tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if kwargs.get("async_op"):
            result.wait()
        if _delays:
            target = max(d(kind, nbytes) for d in _delays)
            while time.perf_counter() - start < target:  # sleep granularity is too coarse
                pass
        spent = time.perf_counter() - start
        for cb in _callbacks:
            cb(kind, nbytes, spent)
        return result
    wrapped.__wrapped_collective__ = fn
    return wrapped


def _install() -> None:
    if _originals:
        return
    for mod, attr, kind in _patch_targets():
        fn = getattr(mod, attr, None)
        if fn is None:
            continue
        _originals[(mod, attr)] = fn
        setattr(mod, attr, _wrap(fn, kind))


def _uninstall() -> None:
    if _callbacks or _delays:
        return
    for (mod, attr), fn in _originals.items():
        setattr(mod, attr, fn)
    _originals.clear()


@contextlib.contextmanager
def _hooked(callback: Optional[Callback] = None,
            delay: Optional[Callable[[str, int], float]] = None) -> Iterator[None]:
    _install()
    if callback:
        _callbacks.append(callback)
    if delay:
        _delays.append(delay)
    try:
        yield
    finally:
        if callback:
            _callbacks.remove(callback)
        if delay:
            _delays.remove(delay)
        _uninstall()


# ----- public tools -----------------------------------------------------------------------------
@dataclass
class CollectiveCounter:
    """Counts TP collectives (calls, payload bytes, seconds) by kind while active.

    ``with CollectiveCounter() as c: model(...)``; then ``c.calls["all_reduce"]``. Async
    collectives are waited for inside the hook, so ``seconds`` is the blocking time.
    """

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    _ctx: object = None

    def _record(self, kind: str, nbytes: int, spent: float) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += nbytes
        self.seconds[kind] += spent

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def __enter__(self) -> "CollectiveCounter":
        self._ctx = _hooked(callback=self._record)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def summary(self) -> dict:
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k],
                    "seconds": round(self.seconds[k], 6)} for k in KINDS if self.calls[k]}

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@contextlib.contextmanager
def simulate_link(profile: LinkProfile | str) -> Iterator[LinkProfile]:
    """Every TP collective inside takes at least ``profile.collective_time`` (busy-wait)."""
    profile = link_profile(profile) if isinstance(profile, str) else profile
    world = parallel_state.get_tensor_model_parallel_world_size()
    with _hooked(delay=lambda kind, nbytes: profile.collective_time(kind, nbytes, world)):
        yield profile
