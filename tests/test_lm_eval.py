"""The lm-eval backend ``megatron-spd`` against the project's own evaluator, on a tiny slice.

A tiny random model (byte tokenizer) runs lm-eval's ``simple_evaluate`` on the ``spd_paper``
tasks (the shipped offline YAMLs) and ``evaluate_task`` on the same first ``ITEMS`` items, for
the dense plan and a G=2 SPD plan at TP=2 (two spawned ranks: every rank runs the same requests,
only rank 0 reports), and the SPD plan at TP=1 (its emulation). Checked item by item: every
choice's log-likelihood to ``LL_ATOL`` (both routes end in ``evaluate.loglik.loglikelihoods``; the
tolerance covers float rounding between TP=1 and TP=2 reductions), acc/acc_norm equal; and the
TP=2 lm-eval run equals the TP=1 one the same way.

Rolling perplexity, by construction: lm-eval's ``loglikelihood_rolling`` predicts every token of
a string, the first from a prefix token, in disjoint windows of ``max_length`` = C whose inputs
start one token before the predicted span. Our ``perplexity`` over ``[prefix] + tokens`` at
ctx = C + 1, stride = C makes exactly those windows when the length is a multiple of C, so the
two NLL sums must agree (``LL_ATOL`` per token). Our default (ctx = stride = C, no prefix) scores
fewer tokens (not the first of each window) with one token less of context each: a different
number by construction, whose size on the real model docs/evaluation.md reports (from
research/lm_eval_agreement.py).

Skipped when lm-eval is not installed (``pip install -e '.[lm-eval]'``); the missing-extra
message itself is tested without it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=260, max_seq_length=512, rope_theta=10000.0)
PLANS = {"dense": SPDPlan.dense(2, groups=2), "spd": SPDPlan(2, ["zs", "dense"])}
ITEMS = 2
ROLL_CTX, ROLL_TOKENS = 64, 256
LL_ATOL = 1e-4
PROMPTS = ["Question: what is the capital of France?\nAnswer:", "The"]
GEN_KWARGS = {"max_gen_toks": 12, "do_sample": False}  # "until": a token greedy decoding makes
STOP_AT = 3  # the stop string is the text of prompt 0's fourth greedy token


def _worker(sd, plans):
    """Both routes for each plan at the current TP, and the rolling log-likelihood; the
    backend's generation calls are recorded to see where each row stopped decoding."""
    import megatron_spd.integrations.lm_eval as backend
    from megatron_spd.inference import generate_ids

    finished = []  # what the backend's generate_ids calls returned: (tokens, finish_reason)

    def recorded(*args, **kwargs):
        results = generate_ids(*args, **kwargs)
        finished.extend((len(r.tokens), r.finish_reason) for r in results)
        return results

    backend.generate_ids = recorded  # undone below: the rank processes are reused
    try:
        return _both_routes(sd, plans, finished)
    finally:
        backend.generate_ids = generate_ids


def _both_routes(sd, plans, finished):
    """``_worker``'s results (``finished`` fills with the backend's generation outcomes)."""
    import torch
    from lm_eval.api.instance import Instance

    from megatron_spd.data import texts as data
    from megatron_spd.evaluate import perplexity
    from megatron_spd.inference import GenerationConfig, generate_ids
    from megatron_spd.loading.open_model import LoadedModel
    from megatron_spd.integrations.lm_eval import SPDLM
    from megatron_spd.integrations.lm_eval_agreement import (PAPER_LM_EVAL_TASKS, lm_eval_items,
                                                             our_items)
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from toy_tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    out = {}
    for name in plans:
        plan = PLANS[name]
        model = build_model(CFG, plan)
        load_full_state_dict(model, sd)
        loaded = LoadedModel(model, CFG, plan, tok)
        tokens = data.token_stream(tok, data.load_texts(split="eval"), ROLL_TOKENS)
        text = tok.decode(tokens.tolist())
        rolling = SPDLM(loaded=loaded, max_length=ROLL_CTX)
        prefixed = torch.cat([torch.tensor([rolling.prefix_token_id]), tokens])
        out[name] = {
            "lm_eval": lm_eval_items(SPDLM(loaded=loaded, batch_tokens=400), ["spd_paper"],
                                     ITEMS, tasks_out=PAPER_LM_EVAL_TASKS),
            "ours": {t: our_items(model, tok, t, ITEMS) for t in PAPER_LM_EVAL_TASKS},
            "roundtrip": tok.encode(text) == tokens.tolist(),
            "lm_rolling": rolling.loglikelihood_rolling(
                [Instance("loglikelihood_rolling", {}, (text,), 0)])[0],
            "ours_prefixed": perplexity(model, None, prefixed, ctx=ROLL_CTX + 1,
                                        stride=ROLL_CTX, desc=None),
            "ours_default": perplexity(model, None, tokens, ctx=ROLL_CTX, desc=None),
        }
        ours = generate_ids(model, [tok.encode(p) for p in PROMPTS],
                            GenerationConfig(max_new_tokens=GEN_KWARGS["max_gen_toks"]),
                            eos_id=tok.eos_id)
        stop = tok.decode(ours[0].tokens[STOP_AT:STOP_AT + 1])
        finished.clear()
        out[name].update(
            stop=stop, ours_tokens=[r.tokens for r in ours],
            ours_generate=[tok.decode(r.tokens) for r in ours],
            ours_finished=[(len(r.tokens), r.finish_reason) for r in ours],
            lm_generate=SPDLM(loaded=loaded, batch_size=2).generate_until(
                [Instance("generate_until", {}, (p, {**GEN_KWARGS, "until": [stop]}), i)
                 for i, p in enumerate(PROMPTS)]),
            lm_finished=list(finished))
    return out


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e "
                                          "'.[lm-eval]'); the agreement test needs it")
    from reference import random_full_state_dict

    sd = random_full_state_dict(CFG, seed=11)
    return {"tp2": run_ranks(_worker, 2, sd, list(PLANS)),
            "tp1": run_ranks(_worker, 1, sd, ["spd"], tp=1)}


@pytest.mark.parametrize("tp,plan", [("tp2", "dense"), ("tp2", "spd"), ("tp1", "spd")])
def test_lm_eval_backend_agrees_item_by_item(results, tp, plan):
    from megatron_spd.integrations.lm_eval_agreement import PAPER_LM_EVAL_TASKS, compare

    rank0 = results[tp][0][plan]
    assert rank0["lm_eval"] is not None, "rank 0 must report"
    if tp == "tp2":
        assert results[tp][1][plan]["lm_eval"] is None, "only rank 0 reports"
        assert results[tp][1][plan]["ours"] == rank0["ours"], "ranks run identical batches"
    for task in PAPER_LM_EVAL_TASKS:
        c = compare(rank0["lm_eval"][task], rank0["ours"][task])
        assert c["items"] == ITEMS, task
        assert c["max_abs_loglik_diff"] <= LL_ATOL, (task, c)
        assert c["acc_mismatch"] == c["acc_norm_mismatch"] == [], (task, c)


def test_tp2_equals_tp1_emulation(results):
    from megatron_spd.integrations.lm_eval_agreement import PAPER_LM_EVAL_TASKS, compare

    plan = "spd"

    for task in PAPER_LM_EVAL_TASKS:
        c = compare(results["tp2"][0][plan]["lm_eval"][task],
                    results["tp1"][0][plan]["lm_eval"][task])
        assert c["max_abs_loglik_diff"] <= LL_ATOL, (task, c)
        assert c["acc_mismatch"] == c["acc_norm_mismatch"] == [], (task, c)


@pytest.mark.parametrize("plan", list(PLANS))
def test_rolling_loglikelihood_equals_prefixed_windows(results, plan):
    r = results["tp2"][0][plan]
    assert r["roundtrip"], "the text must encode back to the same tokens"
    p = r["ours_prefixed"]
    assert p["tokens"] == ROLL_TOKENS  # every token scored, the first from the prefix
    assert -r["lm_rolling"] == pytest.approx(p["nll"] * p["tokens"], abs=LL_ATOL * ROLL_TOKENS)
    # our default windows score ROLL_TOKENS / ROLL_CTX tokens fewer: by construction
    assert r["ours_default"]["tokens"] == ROLL_TOKENS - ROLL_TOKENS // ROLL_CTX


@pytest.mark.parametrize("plan", list(PLANS))
def test_generate_until_is_greedy_generation_cut_at_the_stop_string(results, plan):
    r = results["tp2"][0][plan]
    stop = r["stop"]
    assert r["lm_generate"] == [text.split(stop)[0] for text in r["ours_generate"]]
    # a row stops decoding at the first token whose text completes the stop string: the
    # backend generated exactly that many tokens (not max_gen_toks), else ran as ours did
    from toy_tokenizer import ByteTokenizer

    decode = ByteTokenizer().decode
    want = []
    for ids, ours in zip(r["ours_tokens"], r["ours_finished"]):
        n = next((n for n in range(1, len(ids) + 1) if stop in decode(ids[:n])), None)
        want.append(ours if n is None else (n, "stop"))
    assert r["lm_finished"] == want, (r["lm_finished"], r["ours_generate"], stop)
    assert want[0][0] <= STOP_AT + 1 < GEN_KWARGS["max_gen_toks"] and want[0][1] == "stop"
    assert results["tp2"][1][plan]["lm_generate"] == r["lm_generate"], "ranks agree"


def test_missing_lm_eval_is_one_line():
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['lm_eval_spd', "
            "'--help']; runpy.run_path('tools/lm_eval_spd.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: lm-eval is not installed; install the extra: "
                     "pip install -e '.[lm-eval]'"], proc.stderr
