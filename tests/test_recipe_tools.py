"""The recipe's command lines on a tiny model, in process: ``tools/spd.py plan
--max-ppl-increase`` (the budget measured zero-shot on calibration text) against perplexities
computed here with whole-model forwards, and a smoke run of ``research/recipe_sweep.py`` (the
script behind docs/recipe.md) through all its stages.

The tiny model: test_recipe.py's random LLaMA-style weights (scaled so SPD visibly changes the
function), G=2, saved as a megatron-spd checkpoint with a word-level tokenizer; the text is a
bigram-chain corpus of those words. Tolerance: perplexities rel 1e-5 (fp32; the tool measures
from cached hidden states, the test with whole-model forwards).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_spd.core.plan import SPDPlan

from test_recipe import CFG, G, random_full
from tiny import word_tokenizer, write_bigram_corpus

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, corpus file, full state dict)."""
    from megatron_spd.parallel import distributed
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model

    work = tmp_path_factory.mktemp("recipe_tools")
    write_bigram_corpus(work / "corpus.txt", docs=100, words=60)
    with distributed.running(1):
        full = random_full(CFG)
        model = build_model(CFG)
        load_full_state_dict(model, full)
        save_checkpoint(model, work / "ckpt", config=CFG, plan=SPDPlan.dense(CFG.num_layers, G),
                        tokenizer=word_tokenizer())
    return work / "ckpt", work / "corpus.txt", full


def _zs_ppls(full, tokens, order):
    """Calibration perplexity with the n least sensitive blocks zero-shot SPD, n = 0..L, from
    whole-model forwards."""
    from megatron_spd.parallel import distributed
    from megatron_spd.core.sharding import forward_logits, load_full_state_dict
    from megatron_spd.core.spec import build_model

    out = []
    with distributed.running(1), torch.no_grad():
        for n in range(CFG.num_layers + 1):
            m = build_model(CFG, SPDPlan.from_spd_blocks(CFG.num_layers, G, sorted(order[:n])))
            load_full_state_dict(m, full)
            logits = forward_logits(m.eval(), tokens)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1))
            out.append(math.exp(nll.item()))
    return out


def test_plan_max_ppl_increase_via_the_cli(tiny, tmp_path):
    from megatron_spd.recipe.run import Calibration
    from megatron_spd.recipe.sensitivity import Sensitivity
    from megatron_spd.cli.spd import main
    from megatron_spd.files import unmark_report

    ckpt, corpus, full = tiny
    calib = ["--calib", str(corpus), "--samples", "4", "--seq-len", "32"]
    sens_path, plan_path = tmp_path / "sens.json", tmp_path / "plan.json"
    main(["sensitivity", "--ckpt", str(ckpt), *calib, "--json", str(sens_path)])
    sens = Sensitivity.load(sens_path)
    tokens = Calibration(samples=4, seq_len=32, source=str(corpus)).batches(word_tokenizer(), CFG)
    ppls = _zs_ppls(full, tokens, sens.order())
    print("zero-shot calibration ppl by number of SPD blocks:", [f"{p:.3f}" for p in ppls])
    assert ppls[0] == pytest.approx(sens.baseline_ppl, rel=1e-5)
    # a budget whose fitting plans are exactly the n <= k least sensitive blocks (ppl need not
    # be monotone in n on random weights): the answer must be k
    L = CFG.num_layers
    k = next(k for k in range(1, L) if max(ppls[:k + 1]) < min(ppls[k + 1:]))
    budget = (max(ppls[:k + 1]) + min(ppls[k + 1:])) / 2 - ppls[0]
    report = main(["plan", "--ckpt", str(ckpt), "--sensitivity", str(sens_path), *calib,
                   "--max-ppl-increase", f"{budget!r}", "--strategy", "zs",
                   "--out", str(plan_path), "--json", str(tmp_path / "plan_report.json")])
    plan = SPDPlan.load(plan_path)
    assert plan.spd_blocks == sorted(sens.order()[:k]) and set(plan.strategies) == {"dense", "zs"}
    prov = plan.extra["provenance"]
    assert prov["max_ppl_increase"] == budget and prov["n_spd"] == k
    assert prov["zs_calibration_ppl"] == pytest.approx(ppls[k], rel=1e-5)
    written = json.loads((tmp_path / "plan_report.json").read_text())
    assert report == unmark_report(written) == plan.to_dict()  # the file also carries our mark
    with pytest.raises(SystemExit):  # ratio and budget are exclusive
        main(["plan", "--sensitivity", str(sens_path), "--ratio", "0.5",
              "--max-ppl-increase", "1", "--out", str(plan_path)])


@pytest.mark.slow
def test_recipe_sweep_smoke(tiny, tmp_path):
    """research/recipe_sweep.py end to end on the tiny model: sweep, per-block recovery (B2B and
    HG + B2B, composed into each plan), perplexity and the paper's tasks on 2 items, the table,
    the JSON and the plots; the dense row's perplexity is the model's own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))
    import recipe_sweep

    from megatron_spd.parallel import distributed
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.data.texts import load_texts
    from megatron_spd.evaluate import perplexity

    ckpt, corpus, _ = tiny
    docs = tmp_path / "docs"
    recipe_sweep.main(["--ckpt", str(ckpt), "--text", str(corpus), "--groups", str(G),
                       "--ratios", "0,0.5,1", "--priority", "0,0.5,1", "--calib-samples", "2",
                       "--calib-len", "16", "--sweep-samples", "2", "--b2b-epochs", "1",
                       "--ppl-tokens", "256", "--ppl-ctx", "32", "--limit", "2", "--chunk", "2",
                       "--work", str(tmp_path / "work"), "--docs", str(docs)])
    out = json.loads((docs / "recipe_results.json").read_text())
    results = out["results"]
    expected = {"zs@0", "zs@0.5", "zs@1", "b2b@0.5", "b2b@1", "hg@0.5", "hg@1", "auto@0.5",
                "auto@1", "b2b_spd@0.5"}
    assert set(results) == expected
    for key, entry in results.items():
        assert math.isfinite(entry["ppl"]) and entry["n_spd"] == round(float(key.split("@")[1]) * 4)
        if not key.startswith(("auto", "b2b_spd")):
            assert entry["tasks"]["limit"] == 2 and entry["tasks"]["average"] is not None
    assert results["b2b@1"]["ppl"] != results["zs@1"]["ppl"] != results["hg@1"]["ppl"]
    assert sorted(out["records"]["b2b"]["blocks"]) == [0, 1, 2, 3]
    table = (docs / "recipe_results.md").read_text()
    assert "| ZS+B2B+HG | 100% | 4 |" in table and "+0.00 +/- 0.00" in table
    for png in ("recipe_accuracy.png", "recipe_sensitivity.png"):
        assert (docs / png).stat().st_size > 1000
    with distributed.running(1):
        lm = open_model(ckpt)
        dense = perplexity(lm.model, lm.tokenizer, load_texts(str(corpus), split="eval"),
                           ctx=32, n_tokens=256)["ppl"]
    assert results["zs@0"]["ppl"] == pytest.approx(dense, rel=1e-5)
