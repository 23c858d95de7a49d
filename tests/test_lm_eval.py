"""The lm-eval backend ``megatron-spd`` against the project's own evaluator, on a tiny slice.

A tiny random model (byte tokenizer) runs lm-eval's ``simple_evaluate`` on the ``spd_paper``
tasks (the shipped offline YAMLs) and ``evaluate_task`` on the same first ``ITEMS`` items, for
the dense plan and a G=2 SPD plan, at TP=2 (two spawned ranks: every rank runs the same requests)
and at TP=1 (the plan's emulation). Checked item by item: every choice's log-likelihood to
``LL_ATOL`` (both sides run ``evaluate.loglik.loglikelihoods``; the tolerance covers float
rounding between TP=1 and TP=2 reductions; measured differences ~1e-6), and acc/acc_norm equal.

Rolling perplexity, by construction: lm-eval's ``loglikelihood_rolling`` predicts every token of
a string, the first from a prefix token, in disjoint windows of ``max_length`` = C whose inputs
start one token before the predicted span. Our ``perplexity`` over ``[prefix] + tokens`` at
ctx = C + 1, stride = C makes exactly those windows when the length is a multiple of C, so the
two NLL sums must agree (``LL_ATOL`` per token). Our default (ctx = stride = C, no prefix) scores
fewer tokens (not the first of each window) with one token less of context each: a different
number by construction, whose size on the real model docs/evaluation.md reports (from
examples/lm_eval_agreement.py).

Skipped when lm-eval is not installed (``pip install -e '.[lm-eval]'``); the missing-extra
message itself is tested without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spd.config import ModelConfig
from megatron_spd.plan import SPDPlan
from megatron_spd.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=260, max_seq_length=512, rope_theta=10000.0)
PLANS = {"dense": SPDPlan.dense(2, groups=2), "spd": SPDPlan(2, ["zs", "dense"])}
ITEMS = 3
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "sciq",
         "lambada_openai")
OURS = {"lambada_openai": "lambada"}  # lm-eval's task name -> the project's
ROLL_CTX, ROLL_TOKENS = 64, 256
LL_ATOL = 1e-4


def _worker(sd):
    """Both routes for each plan at the current TP; rank 0's view of lm-eval's samples."""
    import lm_eval
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from megatron_spd import data
    from megatron_spd.evaluate import evaluate_task, perplexity
    from megatron_spd.factory import LoadedModel
    from megatron_spd.integrations.lm_eval import SPDLM
    from megatron_spd.integrations.lm_eval_tasks import TASKS_DIR
    from megatron_spd.model import load_full_state_dict
    from megatron_spd.spec import build_model
    from toy_tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    manager = TaskManager(include_path=str(TASKS_DIR))
    out = {}
    for name, plan in PLANS.items():
        model = build_model(CFG, plan)
        load_full_state_dict(model, sd)
        backend = SPDLM(loaded=LoadedModel(model, CFG, plan, tok), batch_tokens=400)
        res = lm_eval.simple_evaluate(model=backend, tasks=["spd_paper"], limit=ITEMS,
                                      task_manager=manager, log_samples=True,
                                      bootstrap_iters=0)
        samples = None if res is None else {
            t: [([r[0][0] for r in s["resps"]], {m: s[m] for m in ("acc", "acc_norm") if m in s},
                 s["doc_id"]) for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])]
            for t in TASKS}
        ours = {t: evaluate_task(model, tok, OURS.get(t, t), ITEMS, return_scores=True)
                for t in TASKS}
        tokens = data.token_stream(tok, data.load_texts(split="eval"), ROLL_TOKENS)
        text = tok.decode(tokens.tolist())
        rolling = SPDLM(loaded=LoadedModel(model, CFG, plan, tok), max_length=ROLL_CTX)
        lm_ll = rolling.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
        prefixed = perplexity(model, None, torch.cat([torch.tensor([rolling.prefix_token_id]),
                                                      tokens]),
                              ctx=ROLL_CTX + 1, stride=ROLL_CTX, desc=None)
        out[name] = {"samples": samples, "ours": ours, "lm_rolling": lm_ll,
                     "roundtrip": tok.encode(text) == tokens.tolist(), "ours_prefixed": prefixed,
                     "ours_default": perplexity(model, None, tokens, ctx=ROLL_CTX, desc=None)}
    return out


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e "
                                          "'.[lm-eval]'); the agreement test needs it")
    from reference import random_full_state_dict

    sd = random_full_state_dict(CFG, seed=11)
    return {"tp2": run_ranks(_worker, 2, sd), "tp1": run_ranks(_worker, 1, sd, tp=1)}


def _ours_item_metrics(task: str, ours: dict) -> list[dict]:
    """acc/acc_norm per item from our scores, by our evaluator's own rule (task_metrics)."""
    from megatron_spd.evaluate.tasks import get_task
    from megatron_spd.evaluate.zeroshot import task_metrics

    items = get_task(OURS.get(task, task)).load(ITEMS)
    rows = []
    for item, lls in zip(items, ours["scores"]):
        m = task_metrics(OURS.get(task, task), [item], [[(ll, False) for ll in lls]])
        rows.append({k: m[k] for k in ("acc", "acc_norm") if k in m})
    return rows


@pytest.mark.parametrize("tp", ["tp2", "tp1"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_lm_eval_backend_agrees_item_by_item(results, tp, plan):
    rank0 = results[tp][0][plan]
    assert rank0["samples"] is not None, "rank 0 must report"
    if tp == "tp2":
        assert results[tp][1][plan]["samples"] is None, "only rank 0 reports"
    for task in TASKS:
        lm, ours = rank0["samples"][task], rank0["ours"][task]
        assert [doc for _, _, doc in lm] == list(range(ITEMS)), task
        for i, (lls, metrics, _) in enumerate(lm):
            assert lls == pytest.approx(ours["scores"][i], abs=LL_ATOL, rel=0), (task, i)
            if task == "lambada_openai":  # greedy match: the project's acc
                assert metrics["acc"] == ours["correct"][i], (task, i)
            else:
                assert metrics == _ours_item_metrics(task, ours)[i], (task, i)


@pytest.mark.parametrize("plan", list(PLANS))
def test_tp2_equals_tp1_emulation(results, plan):
    for task in TASKS:
        a, b = results["tp2"][0][plan]["samples"][task], results["tp1"][0][plan]["samples"][task]
        for (lls2, m2, _), (lls1, m1, _) in zip(a, b):
            assert lls2 == pytest.approx(lls1, abs=LL_ATOL, rel=0), task
            assert m2 == m1, task


@pytest.mark.parametrize("plan", list(PLANS))
def test_rolling_loglikelihood_equals_prefixed_windows(results, plan):
    r = results["tp2"][0][plan]
    assert r["roundtrip"], "the text must encode back to the same tokens"
    p = r["ours_prefixed"]
    assert p["tokens"] == ROLL_TOKENS  # every token scored, the first from the prefix
    assert -r["lm_rolling"] == pytest.approx(p["nll"] * p["tokens"], abs=LL_ATOL * ROLL_TOKENS)
    # our default windows score ROLL_TOKENS / ROLL_CTX tokens fewer: by construction
    assert r["ours_default"]["tokens"] == ROLL_TOKENS - ROLL_TOKENS // ROLL_CTX


def test_missing_lm_eval_is_one_line():
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['lm_eval_spd', "
            "'--help']; runpy.run_path('tools/lm_eval_spd.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: lm-eval is not installed; install the extra: "
                     "pip install -e '.[lm-eval]'"], proc.stderr
