"""comm.py: ring wire bytes, link profiles, the collective counter and the link simulator.

The simulator check is bounded, not a timing assertion on a model: one all-reduce under a link of
alpha = 300 ms plus 40 ms of wire time must take at least 340 ms (minus 1 ms of clock slack) and,
on a loaded 2-core machine, less than 340 ms + 3 s; a collective on another group gets no delay.
"""
from __future__ import annotations

import pytest

from megatron_spd.parallel.collectives import LinkProfile, PROFILES, link_profile, wire_bytes
from megatron_spd.testing import run_ranks

ALPHA_S, WIRE_S = 0.3, 0.04
PAYLOAD = 4096 * 4  # bytes of the simulated all-reduce (4096 fp32)


def test_wire_bytes_ring():
    assert wire_bytes("all_reduce", 1000, 4) == 1500        # 2 (T-1)/T
    assert wire_bytes("all_gather", 1000, 4) == 750         # (T-1)/T of the gathered tensor
    assert wire_bytes("reduce_scatter", 1000, 2) == 500
    assert wire_bytes("all_reduce", 1000, 1) == 0


def test_link_profiles_parse_scale_and_reject_bad_input():
    assert PROFILES["pcie"].beta_Bps == 10e9 and PROFILES["nvlink"].beta_Bps == 300e9
    assert PROFILES["internode"].beta_Bps == 50e9
    custom = link_profile("15:25")
    assert custom.alpha_s == pytest.approx(15e-6) and custom.beta_Bps == pytest.approx(25e9)
    assert custom.collective_time("all_reduce", 1000, 2) == pytest.approx(15e-6 + 1000 / 25e9)
    slow = PROFILES["pcie"].scaled(100)
    assert slow.alpha_s == pytest.approx(1e-3) and slow.beta_Bps == pytest.approx(1e8)
    assert PROFILES["pcie"].scaled(1) is PROFILES["pcie"]
    with pytest.raises(ValueError, match="nvlink"):
        link_profile("infiniband")
    with pytest.raises(ValueError, match="GBps > 0"):
        link_profile("5:0")
    with pytest.raises(ValueError, match="scale"):
        PROFILES["pcie"].scaled(0)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkProfile("x", 1e-6, -1.0)


def _ranks_check() -> dict:
    """Everything that needs a TP group, in one spawn."""
    import time

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    from megatron_spd.parallel.collectives import CollectiveCounter, simulate_link

    tp = parallel_state.get_tensor_model_parallel_group()
    world = dist.get_world_size()
    out: dict = {"original": dist.all_reduce}
    x = torch.ones(4096)
    with CollectiveCounter() as c:
        dist.all_reduce(x, group=tp)
        dist.all_reduce(x)                                         # default group: not TP
        h = dist.all_reduce(x, group=tp, async_op=True)            # async: waited inside
        h.wait()
        full = torch.ones(8 * world)
        part = torch.empty(8)
        dist.reduce_scatter_tensor(part, full, dist.ReduceOp.SUM, tp)  # group positional
        mappings.gather_from_tensor_model_parallel_region(torch.ones(2, 3))  # megatron's path
    out["counts"] = dict(c.calls)
    out["bytes"] = dict(c.bytes)
    out["summary"] = c.summary()

    beta = 2 * (world - 1) / world * PAYLOAD / WIRE_S
    link = LinkProfile("test", ALPHA_S, beta)
    y = torch.ones(PAYLOAD // 4)
    with simulate_link(link), CollectiveCounter() as c:
        t0 = time.perf_counter()
        dist.all_reduce(y, group=tp)
        out["sim_elapsed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dist.all_reduce(y)                                         # not TP: no delay
        out["sim_other_group"] = time.perf_counter() - t0
    out["sim_counted"] = c.seconds["all_reduce"]
    out["sim_expected"] = link.collective_time("all_reduce", PAYLOAD, world)
    out["restored"] = dist.all_reduce is out.pop("original")
    out["sum_ok"] = bool(torch.equal(y, torch.full_like(y, float(world) ** 2)))
    return out


def test_counter_and_simulator_on_two_ranks():
    res = run_ranks(_ranks_check, 2)
    for r in res:
        assert r["counts"] == {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1}, r["counts"]
        assert r["bytes"] == {"all_reduce": 2 * 4096 * 4, "reduce_scatter": 16 * 4,
                              "all_gather": 2 * 6 * 4}, r["bytes"]
        assert set(r["summary"]) == {"all_reduce", "reduce_scatter", "all_gather"}
        assert r["sim_expected"] == pytest.approx(ALPHA_S + WIRE_S)
        assert r["sim_expected"] - 1e-3 <= r["sim_elapsed"] < r["sim_expected"] + 3.0
        assert r["sim_counted"] >= r["sim_expected"] - 1e-3
        assert r["sim_other_group"] < r["sim_expected"]  # bounded: no 340 ms delay added
        assert r["restored"] and r["sum_ok"]


def test_clock_synchronises_cuda_before_reading(monkeypatch):
    """On a GPU the collective timer and the benchmarks read the clock only after the queued
    kernels finished (clock.now); never while a CUDA graph is being captured."""
    import torch

    from megatron_spd.parallel import clock

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    clock.now()
    assert calls == ["sync"]
    capturing[0] = True
    clock.now()
    assert calls == ["sync"]
