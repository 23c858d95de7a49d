"""TP collective accounting and the link simulator (design.md 6).

Both hook the same place: the torch.distributed functions megatron-core's mappings and linears
call (``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``; megatron binds the
last two at import as ``dist_all_gather_func``/``dist_reduce_scatter_func``, so those module
attributes are patched too). Only collectives on the tensor-parallel group are seen.

- ``CollectiveCounter``: counts calls and bytes by kind, e.g. to check that an SPD block issues
  one all-reduce where a dense block issues two, and measures the time spent inside them (on a
  GPU the clock is read after synchronising, before and after the collective, so the time is the
  collective's and not its launch's or the queued compute's; clock.py).
- ``simulate_link``: makes each TP collective take at least ``alpha + wire_bytes / beta`` for a
  named link profile, so high/low-bandwidth and multi-node settings can be reproduced on CPU.
  Wire bytes follow the ring algorithm: all-reduce 2(T-1)/T x payload, all-gather and
  reduce-scatter (T-1)/T x the full (gathered) tensor. The clock starts when this rank enters
  the collective, so time spent waiting for a slower rank counts towards the target (a real link
  cannot start before every rank has arrived either; the simulated time is a lower bound). The
  remainder is slept, not spun, except for the last ``_SPIN_S``: on an oversubscribed CPU a
  spinning rank would steal the core a slower rank needs to reach the collective.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from . import clock

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class LinkProfile:
    """A link: per-collective latency ``alpha_s`` and bandwidth ``beta_Bps`` (bytes/s)."""

    name: str
    alpha_s: float
    beta_Bps: float

    def __post_init__(self) -> None:
        if not (self.alpha_s >= 0 and self.beta_Bps > 0):
            raise ValueError(f"link profile {self.name!r}: need alpha >= 0 and bandwidth > 0, "
                             f"got alpha={self.alpha_s} s, beta={self.beta_Bps} B/s")

    def collective_time(self, kind: str, payload_bytes: int, world: int) -> float:
        """Seconds one ring collective on ``payload_bytes`` takes over this link."""
        return self.alpha_s + wire_bytes(kind, payload_bytes, world) / self.beta_Bps

    def scaled(self, factor: float) -> "LinkProfile":
        """The link ``factor`` times slower (alpha x factor, bandwidth / factor).

        Time dilation: a CPU computes ~``factor`` times slower than the accelerator a profile
        describes, so dilating the link by the same factor keeps communication's share of a step
        what it would be on that accelerator.
        """
        if factor <= 0:
            raise ValueError(f"link scale must be > 0, got {factor}")
        if factor == 1:
            return self
        return LinkProfile(f"{self.name}x{factor:g}", self.alpha_s * factor, self.beta_Bps / factor)

    def to_dict(self) -> dict:
        return {"name": self.name, "alpha_us": self.alpha_s * 1e6, "GBps": self.beta_Bps / 1e9}


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
    if alpha_us < 0 or gbps <= 0:
        raise ValueError(f"link profile {spec!r}: alpha_us must be >= 0 and GBps > 0")
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
_SPIN_S = 200e-6  # below this the remaining delay is spun: sleep() may overshoot by ~50-100 us
# Per wrapped function: (position, keyword) of the tensor whose size is the payload (all-reduce:
# the tensor; all-gather: the gathered output; reduce-scatter: the full input) and the position
# of the process group; async_op follows the group.
_ARGS = {"all_reduce": ((0, "tensor"), 2),
         "all_gather": ((0, "output_tensor"), 2),
         "reduce_scatter": ((1, "input"), 3)}


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default=None):
    return kwargs[name] if name in kwargs else args[pos] if len(args) > pos else default


def _patch_targets():
    import megatron.core.tensor_parallel.layers as mc_layers
    import megatron.core.tensor_parallel.mappings as mc_mappings
    import megatron.core.utils as mc_utils

    return [(dist, "all_reduce", "all_reduce"),
            (dist, "all_gather_into_tensor", "all_gather"),
            (dist, "reduce_scatter_tensor", "reduce_scatter"),
            *[(mod, "dist_all_gather_func", "all_gather") for mod in (mc_mappings, mc_layers, mc_utils)],
            *[(mod, "dist_reduce_scatter_func", "reduce_scatter") for mod in (mc_mappings, mc_layers, mc_utils)]]


def _wait_until(deadline: float) -> None:
    """Sleep, then spin the last ``_SPIN_S``: accurate to a few us without hogging a core."""
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_S:
        time.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        pass


def _wrap(fn, kind: str):
    (t_pos, t_name), g_pos = _ARGS[kind]

    def wrapped(*args, **kwargs):
        group = _arg(args, kwargs, g_pos, "group")
        tp = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if not _callbacks and not _delays or group is None or group is not tp:
            return fn(*args, **kwargs)
        tensor = _arg(args, kwargs, t_pos, t_name)
        nbytes = tensor.numel() * tensor.element_size()
        start = clock.now()
        result = fn(*args, **kwargs)
        if _arg(args, kwargs, g_pos + 1, "async_op", False):
            result.wait()
        clock.sync()
        if _delays:
            _wait_until(start + max(d(kind, nbytes) for d in _delays))
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


@contextlib.contextmanager
def simulate_link(profile: LinkProfile | str) -> Iterator[LinkProfile]:
    """Every TP collective inside takes at least ``profile.collective_time`` from the moment
    this rank enters it (the real collective runs first; the rest of the time is waited)."""
    profile = link_profile(profile) if isinstance(profile, str) else profile
    world = parallel_state.get_tensor_model_parallel_world_size()
    with _hooked(delay=lambda kind, nbytes: profile.collective_time(kind, nbytes, world)):
        yield profile
