"""``tools/spd.py recover`` (recipe/pipeline.py) on the tiny checkpoint of test_recipe_tools.py with
tiny budgets: every stage runs and records KL / top-1 to dense; a rerun skips every stage; a
changed end-to-end setting reruns that stage only; an end-to-end stage cut short resumes from its
training checkpoint. The closeness numbers themselves are tested in test_closeness.py; here the
perplexity ratio of each stage equals its own report's perplexity over the dense one (rel 1e-6,
float32 vs float64 sums).
"""
from __future__ import annotations

import json
import math

import pytest

from test_recipe_tools import tiny  # noqa: F401  (the fixture)

STAGES = ["reference", "sensitivity", "plan", "zero-shot", "blockwise", "end-to-end"]


def _argv(ckpt, corpus, work, *extra):
    return ["recover", "--ckpt", str(ckpt), "--calib", str(corpus), "--samples", "4",
            "--seq-len", "32", "--sensitivity-samples", "2", "--ratio", "0.5",
            "--e2e-tokens", str(4 * 2 * 16), "--e2e-seq-len", "16", "--e2e-micro-batch", "2",
            "--e2e-warmup-steps", "2",
            "--e2e-save-interval", "2", "--eval-tokens", "256", "--eval-ctx", "32",
            "--topk", "8", "--work", str(work), *extra]


def test_recover_runs_every_stage_and_resumes(tiny, tmp_path, capsys):  # noqa: F811
    from megatron_spd.cli.spd import main
    from megatron_spd.core.plan import SPDPlan
    from megatron_spd.files import unmark_report

    ckpt, corpus, _ = tiny
    work = tmp_path / "work"
    state = main(_argv(ckpt, corpus, work, "--json", str(tmp_path / "r.json")))
    assert list(state["stages"]) == STAGES
    assert unmark_report(json.loads((tmp_path / "r.json").read_text())) == state
    assert unmark_report(json.loads((work / "recover.json").read_text())) == state
    assert SPDPlan.load(work / "plan.json").spd_ratio == 0.5
    dense_ppl = state["stages"]["reference"]["result"]["ppl"]
    for name in ("zero-shot", "blockwise", "end-to-end"):
        r = state["stages"][name]["result"]
        c = r["closeness"]
        assert c["kl"] > 0 and math.isfinite(c["kl_se"]) and 0 <= c["top1"] <= 1
        assert c["tokens"] == 248 and c["topk"] == 8
        assert c["ppl_ratio"] == pytest.approx(r["ppl"] / dense_ppl, rel=1e-6)
    # random weights and 4 x 32 calibration tokens: recovery need not lower KL here, but every
    # stage's model is a different one
    kl = [state["stages"][n]["result"]["closeness"]["kl"] for n in STAGES[3:]]
    print("KL per stage:", kl)
    assert len(set(kl)) == 3
    assert (work / "recover.png").stat().st_size > 1000
    assert (work / "end-to-end").is_dir() and (work / "blockwise").is_dir()
    out = capsys.readouterr().out
    assert "[recover] end-to-end: done" in out and "KL " in out

    again = main(_argv(ckpt, corpus, work))  # nothing to do
    assert again["stages"] == state["stages"]
    assert "skipped" in capsys.readouterr().out

    changed = main(_argv(ckpt, corpus, work, "--e2e-lr", "3e-4"))
    assert "--e2e-lr 3e-4" in changed["command"]
    for name in STAGES[:-1]:
        assert changed["stages"][name] == state["stages"][name]

    assert changed["stages"]["end-to-end"]["settings"]["finetune"]["lr"] == 3e-4
    assert changed["stages"]["end-to-end"]["digest"] != state["stages"]["end-to-end"]["digest"]

    # an end-to-end stage cut short: its record gone, its training checkpoint at step 2 kept
    record = json.loads((work / "recover.json").read_text())
    del record["stages"]["end-to-end"]
    (work / "recover.json").write_text(json.dumps(record))
    resumed = main(_argv(ckpt, corpus, work, "--e2e-lr", "3e-4"))
    assert json.loads((work / "end-to-end.finetune.json").read_text())["start_step"] == 2
    got, want = (r["stages"]["end-to-end"]["result"]["closeness"] for r in (resumed, changed))
    for key in ("kl", "top1", "ppl_ratio"):  # the resumed trajectory is the same (test_finetune)
        assert got[key] == pytest.approx(want[key], rel=1e-5)

    fewer = main(_argv(ckpt, corpus, work, "--e2e-lr", "3e-4", "--e2e-tokens", "0"))
    assert list(fewer["stages"]) == STAGES[:-1]  # the end-to-end record was another run's
    assert json.loads((work / "recover.json").read_text()) == fewer


def test_recover_at_100_percent_needs_no_sweep(tiny, tmp_path):  # noqa: F811
    """Every block SPD with one strategy: the sweep would decide nothing and is not run; no
    end-to-end stage with a zero token budget."""
    from megatron_spd.cli.spd import main
    from megatron_spd.core.plan import SPDPlan

    ckpt, corpus, _ = tiny
    argv = _argv(ckpt, corpus, tmp_path / "work", "--e2e-tokens", "0")
    argv[argv.index("--ratio") + 1] = "1"
    state = main(argv)
    assert list(state["stages"]) == ["reference", "plan", "zero-shot", "blockwise"]
    assert state["command"].startswith("tools/spd.py recover --ckpt ")
    assert state["total_minutes"] == round(sum(st["seconds"] for st in state["stages"].values())
                                           / 60, 1)
    plan = SPDPlan.load(tmp_path / "work" / "plan.json")
    assert plan.strategies == ["hg"] * 4 and plan.compensation_for(3) is not None
    assert not (tmp_path / "work" / "sensitivity.json").exists()
    assert state["stages"]["blockwise"]["result"]["closeness"]["kl"] > 0
