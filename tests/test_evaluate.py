"""megatron_spd.evaluate: zero-shot scoring and perplexity against direct computations.

The tiny random model runs at TP=2 with a G=2 SPD plan (one spawned rank group); the direct
log-likelihoods come from the independent plain-torch reference (tests/reference.py), computed
here one sequence at a time with the tokenization rules written out again in this file.
Tolerance: per-choice log-likelihoods and NLL sums atol 1e-3 on sums of up to ~250 fp32 log-probs
(measured differences ~1e-5); ranks must agree exactly (they run identical batches).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_spd.core.config import ModelConfig
from megatron_spd.evaluate import PAPER_TASKS, TASKS, TaskError, get_task, parse_task_list
from megatron_spd.evaluate.perplexity import windows
from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks

from reference import random_full_state_dict, reference_logits
from toy_tokenizer import ByteTokenizer

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=260, max_seq_length=512, rope_theta=10000.0)
PLAN = SPDPlan(2, ["zs", "dense"])
ITEMS = 5
PPL_TOKENS, PPL_CTX, PPL_STRIDE = 300, 64, 48
TOL = dict(atol=1e-3, rtol=0)
# one-token continuations of one context share a row; a longer one in the same batch does not
SHARED = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([5, 6], [7, 9]), ([5, 6, 7], [8])]
# multi-token choices after one context: scored through the KV cache (prefill + extend) and by
# full recompute must agree; fp32, cached vs recomputed attention: atol 1e-4 (measured ~1e-6)
CHOICES = [(list(range(40, 90)), [7, 8, 9, 10]), (list(range(40, 90)), [11]),
           (list(range(40, 90)), [12, 13, 14, 15, 16, 17]), ([3], [4, 5])]


def _tp_worker(sd):
    """At TP=2: every task on its first ITEMS items, and perplexity with and without overlap."""
    from megatron_spd.data import texts as data
    from megatron_spd.evaluate import evaluate_task, loglikelihoods, perplexity
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model

    model = build_model(CFG, PLAN)
    load_full_state_dict(model, sd)
    tok = ByteTokenizer()
    out = {name: evaluate_task(model, tok, name, ITEMS, return_scores=True, batch_tokens=400)
           for name in TASKS}
    texts = data.load_texts(split="eval")
    out["ppl"] = perplexity(model, tok, texts, ctx=PPL_CTX, n_tokens=PPL_TOKENS, desc=None)
    out["shared"] = loglikelihoods(model, SHARED, max_length=CFG.max_seq_length)
    out["choices"] = [loglikelihoods(model, CHOICES, max_length=CFG.max_seq_length,
                                     share_context=share) for share in (True, False)]
    out["ppl_sliding"] = perplexity(model, tok, texts, ctx=PPL_CTX, n_tokens=PPL_TOKENS,
                                    stride=PPL_STRIDE, batch_tokens=100, desc=None)
    return out


@pytest.fixture(scope="module")
def sd():
    return random_full_state_dict(CFG, seed=5)


@pytest.fixture(scope="module")
def tp_results(sd):
    return run_ranks(_tp_worker, 2, sd)


def _direct_loglik(sd, context: str, continuation: str) -> tuple[float, bool]:
    tok = ByteTokenizer()
    ctx_ids = tok.encode(context.rstrip(), add_bos=False)
    cont_ids = tok.encode(context + continuation, add_bos=False)[len(ctx_ids):]
    if not ctx_ids:
        ctx_ids = [0]
    seq = (ctx_ids + cont_ids)[-(CFG.max_seq_length + 1):]
    logp = torch.log_softmax(reference_logits(CFG, sd, torch.tensor([seq[:-1]]), PLAN)[0], -1)
    rows = logp[len(seq) - 1 - len(cont_ids):len(seq) - 1]
    ll = sum(rows[k, t].item() for k, t in enumerate(cont_ids))
    return ll, rows.argmax(-1).tolist() == cont_ids


@pytest.mark.parametrize("name", list(TASKS))
def test_zero_shot_equals_direct_loglik(tp_results, sd, name):
    r0, r1 = tp_results
    assert r0[name] == {**r1[name], "seconds": r0[name]["seconds"]}  # ranks agree exactly
    items = get_task(name).load(ITEMS)
    assert r0[name]["n"] == len(items) == ITEMS
    hits = norm_hits = greedy_hits = 0
    for item, got in zip(items, r0[name]["scores"]):
        pairs = [_direct_loglik(sd, c, x) for c, x in zip(item.contexts, item.continuations)]
        direct = [ll for ll, _ in pairs]
        greedy_hits += pairs[0][1]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(direct, dtype=torch.float64), **TOL)
        hits += max(range(len(direct)), key=direct.__getitem__) == item.gold
        norm = [ll / c for ll, c in zip(direct, item.choice_chars)]
        norm_hits += max(range(len(norm)), key=norm.__getitem__) == item.gold
    if get_task(name).greedy:
        assert r0[name]["acc"] == greedy_hits / ITEMS
    else:
        assert r0[name]["acc"] == hits / ITEMS
        assert r0[name].get("acc_norm") == (norm_hits / ITEMS if TASKS[name].has_norm else None)


def test_requests_sharing_an_input_row(tp_results, sd):
    logp = torch.log_softmax(reference_logits(CFG, sd, torch.tensor([[5, 6, 7]]), PLAN)[0], -1)
    direct = [logp[2, 8].item(), logp[2, 9].item(), logp[1, 7].item() + logp[2, 9].item(),
              logp[2, 8].item()]
    got = [ll for ll, _ in tp_results[0]["shared"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(direct), **TOL)
    assert got[0] == got[3]
    greedy = logp.argmax(-1).tolist()
    assert [g for _, g in tp_results[0]["shared"]] == [
        greedy[2] == 8, greedy[2] == 9, greedy[1:3] == [7, 9], greedy[2] == 8]


def test_shared_context_cache_equals_recompute(tp_results):
    cached, recomputed = tp_results[0]["choices"]
    torch.testing.assert_close(torch.tensor([ll for ll, _ in cached]),
                               torch.tensor([ll for ll, _ in recomputed]), atol=1e-4, rtol=0)
    assert [g for _, g in cached] == [g for _, g in recomputed]
    assert cached[0] != cached[2]  # different continuations really were scored


def _direct_nll(sd, stream: torch.Tensor, begin: int, end: int, first: int) -> float:
    logp = torch.log_softmax(reference_logits(CFG, sd, stream[None, begin:end], PLAN)[0], -1)
    return -sum(logp[t - 1 - begin, stream[t]].item() for t in range(first, end))


@pytest.mark.parametrize("key,stride", [("ppl", PPL_CTX), ("ppl_sliding", PPL_STRIDE)])
def test_perplexity_equals_direct_nll(tp_results, sd, key, stride):
    from megatron_spd.data import texts as data

    r0, r1 = tp_results
    assert r0[key]["ppl"] == r1[key]["ppl"]
    tok = ByteTokenizer()
    stream = data.token_stream(tok, data.load_texts(split="eval"), PPL_TOKENS)
    nll, scored = 0.0, 0
    for begin in range(0, PPL_TOKENS, stride):  # windows written out independently
        end = min(begin + PPL_CTX, PPL_TOKENS)
        first = 1 if begin == 0 else max(begin + PPL_CTX - stride, begin + 1)
        nll += _direct_nll(sd, stream, begin, end, first)
        scored += end - first
        if end == PPL_TOKENS:
            break
    assert r0[key]["tokens"] == scored
    assert math.isclose(r0[key]["nll"] * scored, nll, abs_tol=1e-3)
    assert math.isclose(r0[key]["ppl"], math.exp(nll / scored), rel_tol=1e-5)
    assert math.isclose(r0[key]["bpb"], nll / math.log(2) / r0[key]["bytes"], rel_tol=1e-5)


def test_windows_score_each_token_at_most_once():
    """Overlapping windows score every token but the first; non-overlapping ones skip each
    window's first token (it has no context)."""
    for n, ctx, stride in [(10, 4, 4), (10, 4, 1), (11, 4, 3), (4, 8, 8), (9, 4, 4)]:
        scored = [t for _, end, first in windows(n, ctx, stride) for t in range(first, end)]
        expect = [t for t in range(1, n) if stride < ctx or t % ctx]
        assert scored == expect, (n, ctx, stride)
        for begin, end, first in windows(n, ctx, stride):
            assert end - begin <= ctx and begin < first
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(TaskError, match="unknown task 'hellaswagg'; known tasks: hellaswag"):
        parse_task_list("piqa,hellaswagg")
    from megatron_spd.evaluate import evaluate_tasks

    with pytest.raises(TaskError, match="unknown task 'mmlu'"):
        evaluate_tasks(None, ByteTokenizer(), ["piqa", "mmlu"], 1)  # fails before any scoring
    from megatron_spd.cli.evaluate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tasks", "bogus"])
    assert parse_task_list("all") == list(TASKS)
    assert parse_args(["--tasks", "piqa, sciq"]).eval.task_names() == ["piqa", "sciq"]


def test_items_follow_lm_eval_prompts():
    hs = get_task("hellaswag").load(1)[0]
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.continuations[3] == " starts pulling up roofing on a roof." and hs.gold == 3
    assert hs.choice_chars[3] == len("starts pulling up roofing on a roof.")
    wg = get_task("winogrande").load(1)[0]
    assert wg.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert wg.continuations == (" always got the easier cases.",) * 2 and wg.gold == 1
    arc = get_task("arc_easy").load(1)[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations[0] == " cellular telephone" and arc.gold == 0
    sciq = get_task("sciq").load(1)[0]
    assert sciq.contexts[0].endswith("\nQuestion: Who proposed the theory of evolution by "
                                     "natural selection?\nAnswer:")
    assert sciq.continuations[3] == " darwin" and sciq.gold == 3
    lam = get_task("lambada").load(1)[0]
    assert lam.continuations == (" signs",) and lam.contexts[0].endswith("I don't care about")
    assert len(get_task("piqa").load(3)) == 3


@pytest.mark.real_model
def test_encode_pair_with_the_real_tokenizer():
    from megatron_spd.data.defaults import default_gguf_path
    from megatron_spd.evaluate import encode_pair
    from megatron_spd.data.tokenizer import gguf_tokenizer

    tok = gguf_tokenizer(default_gguf_path())
    ctx, cont = encode_pair(tok, "The capital of France is ", "Paris")  # space moves right
    assert ctx == tok.encode("The capital of France is") and cont == tok.encode(" Paris")
    assert encode_pair(tok, "", "Hello") == ([0], tok.encode("Hello"))
    whole = tok.encode("Question: 2+2?\nAnswer: 4")
    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer:", " 4")
    assert ctx + cont == whole


@pytest.mark.slow
@pytest.mark.real_model
def test_tool_on_smollm2_dense_and_spd_plan(tmp_path, monkeypatch):
    """End to end through tools/evaluate.py: default model, then a plan override."""
    from megatron_spd.cli.evaluate import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # each main() picks a fresh single-process port
    out = tmp_path / "dense.json"
    main(["--tasks", "piqa", "--limit", "2", "--ppl-tokens", "512", "--json", str(out)])
    dense = json.loads(out.read_text())
    assert dense["complete"] and dense["plan"]["strategies"] == ["dense"] * 30
    assert dense["tasks"]["piqa"]["n"] == 2 and 0 <= dense["tasks"]["piqa"]["acc"] <= 1
    assert dense["perplexity"]["tokens"] == 511 and 5 < dense["ppl"] < 60  # measured 30.6
    plan = tmp_path / "plan.json"
    SPDPlan.from_spd_blocks(30, 3, range(30), "zs").save(plan)
    out2 = tmp_path / "spd.json"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    main(["--tasks", "none", "--plan", str(plan), "--ppl-tokens", "512", "--json", str(out2)])
    spd = json.loads(out2.read_text())
    assert spd["plan"]["strategies"] == ["zs"] * 30 and spd["tasks"] == {}
    assert spd["ppl"] > 2 * dense["ppl"]  # all-SPD SmolLM2 is far worse (design.md 5)


def test_paired_difference_of_the_six_task_average():
    from megatron_spd.evaluate import paired_difference, paper_average

    names = [t for group in PAPER_TASKS.values() for t in group]
    base, other = {}, {}
    for k, t in enumerate(names):
        a = [1, 0, 1, 1, 0, 0, 1, 0]
        b = a[k % 3:] + a[:k % 3]  # some items flip, some do not
        metric = TASKS[t].primary_metric
        base[t] = {metric: sum(a) / len(a), "correct": a}
        other[t] = {metric: sum(b) / len(b), "correct": b}
    d = paired_difference(base, other)
    assert math.isclose(d["delta"], paper_average(other)["value"] - paper_average(base)["value"],
                        abs_tol=1e-12)
    # variance written out: ARC is one of six groups, so each ARC task weighs 1/12
    var = 0.0
    for t in names:
        diff = torch.tensor(other[t]["correct"], dtype=torch.float64) - torch.tensor(
            base[t]["correct"], dtype=torch.float64)
        w = 1 / 12 if t.startswith("arc") else 1 / 6
        var += w * w * diff.var(unbiased=True).item() / len(diff)
    assert d["se"] > 0 and math.isclose(d["se"], math.sqrt(var), rel_tol=1e-12)
    assert paired_difference(base, base) == {"delta": 0.0, "se": 0.0}
    with pytest.raises(ValueError, match="same --limit"):
        paired_difference(base, {**other, "piqa": {"correct": [1]}})
    with pytest.raises(ValueError, match="missing sciq"):
        paired_difference(base, {t: r for t, r in other.items() if t != "sciq"})


def test_evaluate_tool_rejects_a_baseline_without_item_results(tmp_path):
    from megatron_spd.cli.evaluate import parse_args

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tasks": {"piqa": {"acc": 0.5, "n": 2}}, "limit": 2}))
    for path in (old, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            parse_args(["--baseline", str(path)])
    short = tmp_path / "short.json"  # fewer items than asked for: refused before evaluating
    short.write_text(json.dumps({"tasks": {"piqa": {"n": 2, "correct": [1, 0]}}, "limit": 2}))
    assert parse_args(["--baseline", str(short), "--limit", "2"]).eval.limit == 2
    with pytest.raises(SystemExit):
        parse_args(["--baseline", str(short), "--limit", "3"])


def test_evaluate_baseline_pairs_on_the_common_items(tmp_path):
    """A baseline scored on more items pairs on its first ones (tasks take their first --limit
    items); one scored on fewer cannot serve."""
    from megatron_spd.evaluate import paired_difference
    from megatron_spd.evaluate.baseline import BaselineError, compare

    names = [t for group in PAPER_TASKS.values() for t in group]
    long = {"limit": 4, "tasks": {t: {"n": 4, "correct": [1, 0, 1, 1]} for t in names}}
    short = {"limit": 2, "tasks": {t: {"n": 2, "correct": [0, 0]} for t in names}}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(long))
    got = compare(str(path), short)
    want = paired_difference({t: {"correct": [1, 0]} for t in names}, short["tasks"])
    assert got["delta"] == want["delta"] and math.isclose(got["delta"], -0.5)
    assert got["se"] == want["se"]
    path.write_text(json.dumps(short))
    with pytest.raises(BaselineError, match="at least as many items"):
        compare(str(path), long)


def test_demo_summary_reports_paired_change_or_perplexity_alone(capsys):
    """examples/demo.py prints the SPD models' paired accuracy change with its standard error
    (flagged when within two standard errors), never bare accuracies; without tasks,
    perplexity alone."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import demo

    dense = {"ppl": 22.5, "limit": 20, "tasks": {"piqa": {}}}
    evals = {"dense": dense,
             "spd_zero_shot": {"ppl": 25.1, "tasks": {"piqa": {}},
                               "vs_baseline": {"delta": -0.075, "se": 0.02}},
             "spd_recovered": {"ppl": 23.0, "tasks": {"piqa": {}},
                               "vs_baseline": {"delta": -0.025, "se": 0.02}}}
    demo._summary(Path("out"), evals, {"convert": 1.0})
    lines = capsys.readouterr().out.splitlines()
    zs = next(x for x in lines if x.startswith("spd_zero_shot"))
    rec = next(x for x in lines if x.startswith("spd_recovered"))
    assert "25.10" in zs and "-7.50 +/- 2.00 on 20 items per task" in zs and "noise" not in zs
    assert "-2.50 +/- 2.00 on 20 items per task (within noise)" in rec
    no_tasks = {k: {"ppl": v["ppl"], "limit": None, "tasks": {}} for k, v in evals.items()}
    demo._summary(Path("out"), no_tasks, {})
    out = capsys.readouterr().out
    assert "not measured: fewer than 20 items per task" in out and "+/-" not in out
