"""Latency benchmark (megatron_spd.bench): the analytic model's bookkeeping, the analysis of
measured records (max/min over ranks, the bound, the analytic validation) and the auto link scale
on synthetic numbers with known answers, thread hygiene, and ``tools/benchmark.py measure`` end to
end on a tiny random model under torchrun (2 ranks, 2 repeats, a simulated link): valid JSON,
collective counts per step that match each plan, a bounded simulator check, the PNG, and docs
written from the JSON. No timing is asserted except the simulator's lower bound (every TP
collective lasts at least the link's alpha). Tolerances: pytest.approx defaults (rel 1e-6).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spd.bench import analytic
from megatron_spd.bench.latency import PRESETS, LinkSetting, Workload, spd_plan
from megatron_spd.bench.run import threads_per_rank
from megatron_spd.parallel.collectives import link_profile

ROOT = Path(__file__).resolve().parents[1]
ALPHA_US = 2000  # simulated link alpha for the CLI run: 2 ms per collective


def expected_all_reduces(num_layers: int, n_spd: int) -> int:
    """Embedding (vocab-parallel) 1 + dense blocks 2 + SPD blocks 1."""
    return 1 + 2 * (num_layers - n_spd) + n_spd


def test_llama2_shapes_have_the_published_sizes():
    sizes = {k: c.num_parameters() / 1e9 for k, c in analytic.LLAMA2.items()}
    assert sizes["llama2-7b"] == pytest.approx(6.74, abs=0.01)
    assert sizes["llama2-13b"] == pytest.approx(13.02, abs=0.01)
    assert sizes["llama2-70b"] == pytest.approx(68.98, abs=0.01)


def test_analytic_counts_curve_and_fit():
    cfg = analytic.LLAMA2["llama2-70b"]
    colls = analytic.step_collectives(cfg, 8, 56, 1, 1, 2)
    assert sum(k == "all_reduce" for k, _ in colls) == expected_all_reduces(80, 56)
    assert sum(k == "all_gather" for k, _ in colls) == 1
    assert analytic.step_collectives(cfg, 1, 0, 1, 1, 2) == []
    rows = analytic.speedup_curve(cfg, 8, link_profile("pcie"), analytic.DEVICES["a100"],
                                  prompt=256, new_tokens=8)
    red = [r["end_to_end_reduction"] for r in rows]
    assert red[0] == 0 and all(b > a for a, b in zip(red, red[1:])) and red[-1] < 1
    # the fitted rate is the step's FLOPs (counted here by hand from the 70B shape) over the
    # measured time minus the predicted communication
    link = link_profile("1000:1")
    fitted = analytic.fit_rate(0.5, cfg, 8, link, 1, 1, 100.0)
    h, hd, L, V = 8192, 128, 80, 32000
    block = (64 + 2 * 8) * hd * h + 64 * hd * h + 3 * 28672 * h  # qkv, proj, gate/up/down
    flops = L * (2 * block / 8 + 4 * 100.0 * h / 8) + 2 * V * h / 8  # per rank; LM head once
    act = h * 4  # one token's fp32 hidden state
    comm = (1 + 2 * L) * link.collective_time("all_reduce", act, 8) \
        + link.collective_time("all_gather", V * 4, 8)
    assert fitted.flops == pytest.approx(flops / (0.5 - comm), rel=1e-12)
    # compute is the same for every plan: the curve is dense minus the dropped link time
    dense = analytic.predict_measured(cfg, 8, 0, link, fitted, 1, 1, 100.0)
    spd = analytic.predict_measured(cfg, 8, 80, link, fitted, 1, 1, 100.0)
    assert dense - spd == pytest.approx(80 * link.collective_time("all_reduce", act, 8))
    with pytest.raises(ValueError, match="too slow"):
        analytic.fit_rate(0.01, cfg, 8, link, 1, 1, 100.0)


def _records(step_s: list[float], comm_s: list[float], n_ar: int, repeats: int = 3) -> list:
    """One rank's visits: each phase takes ``step_s`` (prefill, decode) of which ``comm_s`` is in
    ``n_ar`` all-reduces and one all-gather (a tenth of it), the same every repeat."""
    rec = {}
    for ph, t, c in zip(("prefill", "decode"), step_s, comm_s):
        rec[f"{ph}_s"] = t
        rec[f"{ph}_coll"] = {"all_reduce": {"calls": n_ar, "bytes": 8 * n_ar, "seconds": 0.9 * c},
                             "all_gather": {"calls": 1, "bytes": 4, "seconds": 0.1 * c}}
    return [rec] * repeats


def test_analysis_max_and_min_over_ranks_and_the_bound():
    """Step time = slowest rank, communication = least-waiting rank, bound = dropped all-reduces
    x the dense run's time per all-reduce; numbers written out by hand."""
    from megatron_spd.bench import analysis

    L, ar = 4, 0.01  # 4 blocks; 10 ms per all-reduce
    plans = {}
    for n_spd in (0, 2, 4):
        n_ar = expected_all_reduces(L, n_spd)
        comm = n_ar * ar / 0.9
        fast = _records([1.0 + comm, 0.5 + comm], [comm, comm], n_ar)
        # the other rank waits 0.2 s for the fast one inside its collectives
        slow = _records([1.1 + comm, 0.6 + comm], [comm + 0.2, comm + 0.2], n_ar)
        plans[n_spd] = analysis.summarise(f"spd{25 * n_spd}", spd_plan(L, 2, n_spd / L),
                                          [fast, slow])
    for n_spd, p in plans.items():
        n_ar = expected_all_reduces(L, n_spd)
        assert p["prefill"]["median"] == pytest.approx(1.1 + n_ar * ar / 0.9)  # max over ranks
        assert p["prefill"]["comm_s"]["median"] == pytest.approx(n_ar * ar / 0.9)  # min
        assert p["decode"]["all_reduce_s_each"] == pytest.approx(ar)
        assert p["n_spd"] == n_spd and p["prefill"]["n"] == 3
    report = {"plans": list(plans.values())}
    analysis.add_bounds(report)
    for n_spd, p in plans.items():
        for ph in ("prefill", "decode"):
            assert p[ph]["dropped_all_reduces"] == n_spd
            assert p[ph]["bound_s"] == pytest.approx(n_spd * ar)
            # the plans differ only in the dropped all-reduces' time (and their all-gather
            # share scales with them), so achieved = bound / 0.9
            if n_spd:
                assert p[ph]["achieved_over_bound"] == pytest.approx(1 / 0.9)
    assert report["realised_fraction"]["decode"] == pytest.approx(1 / 0.9)
    assert "stock_vs_dense" not in report


def test_analytic_validation_predicts_the_plans_it_was_not_fitted_on():
    """Measurements made from a known compute rate and link: the rate fitted on the dense plan
    predicts the SPD plans exactly; a plan measured 10 % slow shows -9.1 %."""
    from megatron_spd.bench import analysis

    cfg, tp, rate = PRESETS["tiny"], 2, 2e9
    link = LinkSetting("500:2")
    wl = Workload(batch=2, prompt=16, new_tokens=4, ratios=(0, 0.5, 1))
    shape = {"prefill": (16, 8.5), "decode": (1, 16 + 2.5)}
    probe = analytic.Device("probe", 1.0, float("inf"), 4)
    plans = []
    for r in wl.ratios:
        n = round(r * cfg.num_layers)
        plan = {"name": f"spd{round(100 * r)}", "stock": False, "n_spd": n}
        for ph, (tokens, context) in shape.items():
            flops = analytic.step_time(cfg, tp, n, link.link(ph), probe, 2, tokens,
                                       context).compute_s
            comm = sum(link.link(ph).collective_time(k, b, tp) for k, b in
                       analytic.step_collectives(cfg, tp, n, 2, tokens, 4))
            plan[ph] = {"median": flops / rate + comm}
        plans.append(plan)
    plans[-1]["decode"]["median"] *= 1.1
    report = {"workload": {"batch": 2, "prompt": 16, "new_tokens": 4}, "tp": tp, "plans": plans}
    val = analysis.validate_analytic(report, cfg, link)
    for ph in ("prefill", "decode"):
        assert val[ph]["fitted_GFLOPs"] == pytest.approx(rate / 1e9)
        errors = {row["name"]: row["rel_error"] for row in val[ph]["plans"]}
        assert errors["spd0"] == pytest.approx(0, abs=1e-9)
        assert errors["spd50"] == pytest.approx(0, abs=1e-9)
    assert val["prefill"]["plans"][-1]["rel_error"] == pytest.approx(0, abs=1e-9)
    assert val["decode"]["plans"][-1]["rel_error"] == pytest.approx(1 / 1.1 - 1)
    assert val["decode"]["max_abs_rel_error"] == pytest.approx(1 - 1 / 1.1)


def test_auto_link_scale_is_cpu_over_device_compute_per_phase(monkeypatch):
    """``--link-scale auto``: per phase, (this machine's compute time of the dense step, from the
    least disturbed calibration visit, collectives excluded) / (the analytic compute time of the
    same step on the device in the eager regime)."""
    from megatron_spd.parallel import distributed
    from megatron_spd.bench import latency

    visits = iter([{"prefill_s": 0.9, "decode_s": 0.20,
                    "prefill_coll": {"all_reduce": {"seconds": 0.3}},
                    "decode_coll": {"all_reduce": {"seconds": 0.05}}},
                   {"prefill_s": 0.7, "decode_s": 0.30,  # less disturbed prefill, worse decode
                    "prefill_coll": {"all_reduce": {"seconds": 0.2},
                                     "all_gather": {"seconds": 0.1}},
                    "decode_coll": {"all_reduce": {"seconds": 0.05}}}])
    monkeypatch.setattr(latency, "_visit", lambda *a: next(visits))
    cfg, wl = PRESETS["tiny"], Workload(batch=2, prompt=16, new_tokens=4)
    with distributed.running(1):
        links = LinkSetting("pcie", "auto", "h100")
        latency._calibrate(None, None, None, wl, cfg, links)
        fixed = LinkSetting("pcie", "3")
        latency._calibrate(None, None, None, wl, cfg, fixed)
    dev, pcie = analytic.device("h100", "eager"), link_profile("pcie")  # it decodes eagerly
    gpu = {"prefill": analytic.step_time(cfg, 1, 0, pcie, dev, 2, 16, 8.5).compute_s,
           "decode": analytic.step_time(cfg, 1, 0, pcie, dev, 2, 1, 16 + 2.5).compute_s}
    cpu = {"prefill": 0.4, "decode": 0.15}  # min over visits of (step - collectives)
    for ph in ("prefill", "decode"):
        assert links.calibration[ph] == {"cpu_compute_s": pytest.approx(cpu[ph]),
                                         "device_compute_s": pytest.approx(gpu[ph])}
        assert links.factors[ph] == pytest.approx(cpu[ph] / gpu[ph])
        assert links.link(ph) == pcie.scaled(links.factors[ph])
    assert fixed.factors == {"prefill": 3.0, "decode": 3.0} and fixed.calibration == {}


def test_threads_plans_and_workload_validation():
    assert threads_per_rank(2, 3) == 1 and threads_per_rank(2, 2) == 1
    assert threads_per_rank(16, 4) == 4 and threads_per_rank(8, 1) == 8
    plan = spd_plan(8, 2, 0.25)
    assert plan.spd_blocks == [6, 7] and spd_plan(8, 2, 0).spd_blocks == []
    with pytest.raises(ValueError, match="include 0"):
        Workload(ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Workload(ratios=(0, 1.5))
    with pytest.raises(ValueError, match="repeats"):
        Workload(repeats=0)
    with pytest.raises(ValueError, match="link profile"):
        LinkSetting("fast")
    with pytest.raises(ValueError, match="scale"):
        LinkSetting("pcie", "-2")
    assert LinkSetting("pcie", "auto").link("decode") == link_profile("pcie")


@pytest.mark.slow
def test_benchmark_cli_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), str(ROOT / "tools/benchmark.py"), "measure",
           "--model", "tiny", "--repeats", "2", "--warmup", "0", "--prompt", "8",
           "--new-tokens", "3", "--link", f"{ALPHA_US}:1", "--json", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "spd100" in proc.stdout
    rep = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    cfg = PRESETS["tiny"]
    assert rep["format"] == "megatron-spd-latency/1" and rep["tp"] == 2
    assert rep["host"]["threads_per_rank"] == threads_per_rank(local_ranks=2)
    names = [p["name"] for p in rep["plans"]]
    assert names == ["spd0", "spd25", "spd50", "spd75", "spd100", "stock"]
    for p in rep["plans"]:
        n_ar = expected_all_reduces(cfg.num_layers, p["n_spd"])
        for ph in ("prefill", "decode"):
            colls = p[ph]["collectives"]
            assert colls == {"all_reduce": {"calls": n_ar, "bytes": colls["all_reduce"]["bytes"]},
                             "all_gather": {"calls": 1, "bytes": colls["all_gather"]["bytes"]}}, \
                (p["name"], ph, colls)
            assert p[ph]["n"] == 2 and 0 < p[ph]["min"] <= p[ph]["median"] <= p[ph]["max"]
            # simulator, bounded: every TP collective lasts at least alpha on every rank
            assert p[ph]["comm_s"]["min"] >= (n_ar + 1) * ALPHA_US * 1e-6 * 0.999
            if p["name"] != "spd0" and not p["stock"]:
                assert p[ph]["dropped_all_reduces"] == p["n_spd"]
                assert p[ph]["bound_s"] > 0 and p[ph]["achieved_over_bound"] is not None
    assert set(rep["stock_vs_dense"]) == {"prefill", "decode"}
    for ph in ("prefill", "decode"):  # what the validation means: test_analytic_validation_...
        rows = rep["analytic_validation"][ph]["plans"]
        assert [r["name"] for r in rows] == names[:-1]
        assert all(r["measured_s"] == p[ph]["median"] for r, p in zip(rows, rep["plans"]))

    from megatron_spd.bench import markdown, run

    proj = tmp_path / "projection.json"
    run.project(analytic.Projection(models=("llama2-70b",), tps=(8,), links=("pcie",),
                                    batches=(1,), prompt=128, new_tokens=4), json_out=str(proj))
    md = tmp_path / "latency.md"
    markdown.write_markdown([str(out)], str(proj), str(md))
    text = md.read_text()
    assert "| spd100 | 4/4 |" in text and "llama2-70b | 8 | pcie" in text and "## Targets" in text


def _free_port() -> int:
    from megatron_spd.parallel.distributed import free_port

    return free_port()


def _gpu_check_report(mode: str = "full", graphed: bool = True) -> dict:
    """The parts of an research/gpu_check.py report the projection reads (synthetic values)."""
    paths = {"tensorised_eager": {"block_overhead_us": 300.0, "graphed": False},
             "tensorised_graphed": {"block_overhead_us": 4.0, "graphed": graphed,
                                    "graph_error": None if graphed else "RuntimeError: x"}}
    return {"format": "megatron-spd-gpu-check/1", "mode": mode, "host": {"device": "GPU-X"},
            "checks": {"decode": {"batches": {"1": {"paths": paths}}}}}


def test_projection_regimes_and_measured_overhead(tmp_path):
    """Eager vs graphed per-block overhead (issue 14): the regime is stated, a gpu_check report
    replaces the assumed overhead, and an unusable report is refused."""
    import json

    from megatron_spd.bench.analytic import REGIMES, Projection, projection

    few = dict(models=("llama2-70b",), tps=(8,), links=("pcie",), batches=(1,),
               ratios=(0.0, 0.7), new_tokens=8)
    eager, graphed = Projection(**few), Projection(**few, regime="graphed")
    assert eager.device_model().block_overhead_s == REGIMES["eager"]
    assert graphed.device_model().block_overhead_s == REGIMES["graphed"]
    assert "assumed" in graphed.regime_info()["source"]

    def decode_at_70(p):
        (row,) = [r for r in projection(p) if r["spd_ratio"] == 0.7]
        return row["decode_s"], row["decode_reduction"]

    (t_eager, red_eager), (t_graphed, red_graphed) = decode_at_70(eager), decode_at_70(graphed)
    # less overhead: a shorter step of which the same dropped communication is a larger share
    assert t_graphed < t_eager and red_graphed > red_eager
    report = tmp_path / "gpu_check.json"
    report.write_text(json.dumps(_gpu_check_report()))
    measured = Projection(**few, gpu_check=str(report))
    assert measured.device_model().block_overhead_s == pytest.approx(300e-6)
    assert "measured" in measured.regime_info()["source"]
    assert "GPU-X" in measured.regime_info()["source"]
    assert Projection(**few, regime="graphed", gpu_check=str(report)).regime_info()[
        "block_overhead_us"] == pytest.approx(4.0)
    for bad, regime, message in ((_gpu_check_report("smoke"), "eager", "--smoke"),
                                 (_gpu_check_report(graphed=False), "graphed", "capture")):
        report.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            Projection(**few, regime=regime, gpu_check=str(report))
    with pytest.raises(ValueError, match="does not exist"):
        Projection(**few, gpu_check=str(tmp_path / "none.json"))
