"""evaluate/closeness.py: KL(dense || model), top-1 agreement and perplexity ratio against direct
computations.

- The math on random logits (float64): with k = V the estimate and the bound are the exact KL
  (atol 1e-12); with k < V the bound equals the coarsened KL written out here and stays below
  the exact one, and the estimate with sampled tail is unbiased (the mean of 400 seeded
  estimates within 4 s.e. of the exact KL).
- A tiny random model at TP=2 (one spawned rank group): the dense reference recorded in
  ``perplexity``'s forward pass; the same model against it gives KL 0 (atol 1e-7: the
  reference stores float32 log-probs; measured 2e-9), top-1 1 and ratio 1 (atol 1e-9, float64
  target log-probs); a perturbed model (block 0 zero-shot SPD, every weight plus Gaussian noise)
  gives per-window KL (with the reference's stored tail draws, whose dense log-probs are
  checked too), top-1 and NLL differences equal to those of the plain-torch reference model
  (tests/reference.py) computed here, atol 1e-4 on means of float32 logits (measured
  ~1e-6), and a ratio equal to the two perplexities' ratio (rel 1e-6: ``perplexity`` sums
  float32 NLLs, the closeness float64 ones; measured 1.3e-7).
- ``tools/evaluate.py --reference-topk`` / ``--baseline`` on the tiny checkpoint of
  test_recipe_tools.py: the reference file beside the JSON, KL 0 against itself, the ratio of
  the two reports' perplexities, and a clear refusal of other perplexity text.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from megatron_spd.core.config import ModelConfig
from megatron_spd.evaluate import closeness
from megatron_spd.evaluate.perplexity import windows
from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks

from reference import random_full_state_dict, reference_logits
from test_recipe_tools import tiny  # noqa: F401  (the fixture)
from toy_tokenizer import ByteTokenizer

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=260, max_seq_length=512, rope_theta=10000.0)
DENSE, PERTURBED = SPDPlan(2, ["dense", "dense"]), SPDPlan(2, ["zs", "dense"])
N_TOKENS, CTX, STRIDE, K = 300, 64, 48, 16


def _exact_kl(p_logits, q_logits):
    logp, logq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _rows(p, k, m=0, seed=0):
    return closeness.dense_rows(p, k, m, torch.Generator().manual_seed(seed))


def test_token_kl_exact_at_full_k_unbiased_with_tail_samples_and_bounded_below():
    g = torch.Generator().manual_seed(0)
    p = 3 * torch.randn(50, 260, generator=g)
    q = p + torch.randn(50, 260, generator=g)
    exact = _exact_kl(p, q)
    for got in closeness.token_kl(q, _rows(p, 260, 16)):  # k = V: no tail, both exact
        assert torch.allclose(got, exact, atol=1e-12, rtol=0)
    for got in closeness.token_kl(p, _rows(p, 8, 16)):  # the dense model against itself
        assert torch.allclose(got, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)
    d = _rows(p, 8)
    logp, logq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    mask = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, d.top_ids, True)
    p_in, q_in = logp.exp()[mask].view(50, 8), logq.exp()[mask].view(50, 8)
    p_out, q_out = 1 - p_in.sum(-1), 1 - q_in.sum(-1)
    coarse = (p_in * (p_in / q_in).log()).sum(-1) + p_out * (p_out / q_out).log()
    _, bound = closeness.token_kl(q, d)
    assert torch.allclose(bound, coarse, atol=1e-10, rtol=0)
    assert (bound <= exact + 1e-12).all() and (bound < exact).any()
    # the sampled tail: the mean of 400 seeded estimates is within 4 s.e. of the exact KL,
    # where the bound is far below it
    est = torch.stack([closeness.token_kl(q, _rows(p, 8, 16, seed))[0].mean()
                       for seed in range(400)])
    se = est.std() / 20
    print(f"exact {exact.mean():.5f}, estimate {est.mean():.5f} +/- {se:.5f}, "
          f"bound {bound.mean():.5f}")
    assert abs(est.mean() - exact.mean()) < 4 * se
    assert exact.mean() - bound.mean() > 40 * se


def _worker(sd, sd_q):
    """At TP=2: the dense reference (k = K and k = V), the dense and the perturbed model against
    them, and both perplexities."""
    from megatron_spd.data import texts as data
    from megatron_spd.evaluate import perplexity
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model

    tok, texts = ByteTokenizer(), data.load_texts(split="eval")
    models = {}
    for name, plan, weights in (("dense", DENSE, sd), ("spd", PERTURBED, sd_q)):
        models[name] = build_model(CFG, plan)
        load_full_state_dict(models[name], weights)
    kw = dict(ctx=CTX, n_tokens=N_TOKENS, stride=STRIDE, desc=None)
    refs = {k: closeness.Reference({"topk": k, "tail_samples": 8}) for k in (K, CFG.vocab_size)}
    out = {"ppl_dense": perplexity(models["dense"], tok, texts, **kw, on_window=lambda t, x: [
        r.record(t, x) for r in refs.values()])}
    for name in ("dense", "spd"):
        cmps = {k: closeness.Comparison(r) for k, r in refs.items()}
        out[f"ppl_{name}"] = perplexity(
            models[name], tok, texts, **kw,
            on_window=lambda t, x, cmps=cmps: [c(t, x) for c in cmps.values()])
        out[name] = {k: c.result() for k, c in cmps.items()}
        out[f"{name}_windows"] = {k: (c.kl, c.agree, c.dnll) for k, c in cmps.items()}
        out[f"{name}_per_token"] = {k: c.per_token() for k, c in cmps.items()}
    out["tokens"] = data.token_stream(tok, texts, N_TOKENS)
    out["ref"] = dataclasses.asdict(refs[K])  # plain data for run_ranks; rebuilt in results
    return out


@pytest.fixture(scope="module")
def sd():
    return random_full_state_dict(CFG, seed=5)


@pytest.fixture(scope="module")
def sd_q(sd):
    g = torch.Generator().manual_seed(6)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


@pytest.fixture(scope="module")
def results(sd, sd_q):
    ranks = run_ranks(_worker, 2, sd, sd_q)
    for key in ("dense", "spd"):
        assert ranks[0][key] == ranks[1][key]  # ranks run identical batches
    return {**ranks[0], "ref": closeness.Reference(**ranks[0]["ref"])}


def test_dense_against_itself_is_zero(results):
    for k in (K, CFG.vocab_size):
        c = results["dense"][k]
        assert abs(c["kl"]) < 1e-7 and c["kl_se"] < 1e-7
        assert c["top1"] == 1.0 and c["top1_se"] == 0.0
        assert c["ppl_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert results["dense"][CFG.vocab_size]["kl_is"] == "exact"
    assert results["dense"][K]["kl_is"] == "unbiased estimate (top-k + sampled tail)"


def test_perturbed_model_equals_direct_computation(results, sd, sd_q):
    tokens = results["tokens"]
    kl_exact, kl_k, bound_k, agree, dnll = [], [], [], [], []
    ref = results["ref"]
    for w, (b, e, first) in enumerate(windows(tokens.numel(), CTX, STRIDE)):
        rows = slice(first - 1 - b, e - 1 - b)
        p = reference_logits(CFG, sd, tokens[None, b:e], DENSE)[0, rows]
        q = reference_logits(CFG, sd_q, tokens[None, b:e], PERTURBED)[0, rows]
        target = tokens[first:e]
        assert torch.equal(ref.targets[w], target)
        kl_exact.append(_exact_kl(p, q))
        d = ref.rows(w)  # the stored draws; the dense rows must be the reference model's
        lp_all = torch.log_softmax(p.double(), -1)
        assert torch.equal(d.top_ids.long(), lp_all.topk(K, -1).indices)
        assert torch.allclose(d.tail_logp.double(), lp_all.gather(-1, d.tail_ids.long()),
                              atol=1e-4, rtol=0)
        direct = closeness.DenseRows(d.top_ids, lp_all.gather(-1, d.top_ids.long()),
                                     lp_all.scatter(-1, d.top_ids.long(), -math.inf).logsumexp(-1),
                                     d.tail_ids, lp_all.gather(-1, d.tail_ids.long()))
        est, bound = closeness.token_kl(q, direct)
        kl_k.append(est)
        bound_k.append(bound)
        agree.append((q.argmax(-1) == p.argmax(-1)).double())
        lp = torch.log_softmax(p.double(), -1).gather(-1, target[:, None])[:, 0]
        lq = torch.log_softmax(q.double(), -1).gather(-1, target[:, None])[:, 0]
        dnll.append(lp - lq)
    full, topk = results["spd"][CFG.vocab_size], results["spd"][K]
    direct_full = closeness.summarize(kl_exact, agree, dnll)
    direct_k = closeness.summarize(kl_k, agree, dnll)
    print("perturbed vs dense:", closeness.line(full), "|", closeness.line(topk))
    assert full["kl"] > 0.01 and 0 < full["top1"] < 1 and full["ppl_ratio"] != 1
    assert full["tokens"] == sum(t.numel() for t in kl_exact) == N_TOKENS - 1
    for got, want in ((full, direct_full), (topk, direct_k)):
        for key in ("kl", "kl_se", "ln_ppl_ratio", "ln_ppl_ratio_se", "kl_se_windows"):
            assert got[key] == pytest.approx(want[key], abs=1e-4, rel=0), key
        assert got["top1"] == pytest.approx(want["top1"], abs=1.5 / full["tokens"])
    assert full["kl_lower_bound"] == pytest.approx(full["kl"], abs=1e-12)
    assert topk["kl_lower_bound"] == pytest.approx(torch.cat(bound_k).mean().item(), abs=1e-4)
    assert topk["kl_lower_bound"] < full["kl"]
    assert abs(topk["kl"] - full["kl"]) < 4 * topk["kl_se"]  # unbiased: within its s.e.
    assert full["ppl_ratio"] == pytest.approx(
        results["ppl_spd"]["ppl"] / results["ppl_dense"]["ppl"], rel=1e-6)


def test_paired_change_of_two_models(results):
    """b minus a on the same tokens: the difference of the two summaries, with the s.e. of the
    per-token differences (exact arithmetic on float64 values, so 1e-9)."""
    a, b = results["dense_per_token"][K], results["spd_per_token"][K]
    d = closeness.paired_change(a, b)
    for name, key in (("kl", "kl"), ("top1", "top1"), ("dnll", "ln_ppl_ratio")):
        assert d[name] == pytest.approx(results["spd"][K][key] - results["dense"][K][key],
                                        abs=1e-9), name
    diff = b["kl"] - a["kl"]
    assert d["kl"] > 0.01
    assert d["kl_se"] == pytest.approx(diff.std().item() / math.sqrt(diff.numel()), rel=1e-9)
    assert d["tokens"] == N_TOKENS - 1 and d["windows"] == len(results["spd_windows"][K][0])
    assert 0 < d["kl_se"] and 0 < d["kl_se_windows"]
    same = closeness.paired_change(b, b)
    assert same["kl"] == 0 and same["kl_se"] == 0 and same["dnll_se_windows"] == 0
    with pytest.raises(ValueError, match="different tokens"):
        closeness.paired_change(a, {**b, "window": b["window"].flip(0)})


def test_reference_file_round_trip_and_refusals(results, tmp_path):
    ref = results["ref"]
    ref.meta.update(ctx=CTX, stride=STRIDE)
    path = tmp_path / "x.reference.safetensors"
    ref.save(path)
    back = closeness.Reference.load(path)
    assert back.meta == ref.meta
    for name in closeness.ROWS:
        assert all(torch.equal(a, b) for a, b in zip(getattr(back, name), getattr(ref, name),
                                                         strict=True))
    with pytest.raises(ValueError, match="ctx 32 vs 64"):
        back.check_text({**back.meta, "ctx": 32}, "this run")
    cmp = closeness.Comparison(back)
    with pytest.raises(ValueError, match="window 0 .* differs"):
        cmp(back.targets[0] + 1, torch.zeros(back.targets[0].numel(), CFG.vocab_size))
    with pytest.raises(ValueError, match="0 windows scored"):
        cmp.result()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        closeness.Reference.load(tmp_path / "bad.safetensors")


def test_evaluate_tool_baseline_reports_closeness(tiny, tmp_path, capsys):  # noqa: F811
    from megatron_spd.cli.evaluate import main

    ckpt, corpus, _ = tiny
    text = ["--ckpt", str(ckpt), "--tasks", "none", "--ppl-text", str(corpus), "--ppl-split",
            "eval", "--ppl-tokens", "256", "--ppl-ctx", "32"]
    dense = tmp_path / "dense.json"
    main([*text, "--reference-topk", "8", "--json", str(dense)])
    assert closeness.reference_path(dense).is_file()
    same = main([*text, "--baseline", str(dense), "--json", str(tmp_path / "same.json")])
    assert abs(same["closeness"]["kl"]) < 1e-7 and same["closeness"]["top1"] == 1.0
    plan = tmp_path / "plan.json"
    SPDPlan.from_spd_blocks(4, 2, range(4), "zs").save(plan)
    spd = main([*text, "--plan", str(plan), "--baseline", str(dense), "--json",
                str(tmp_path / "spd.json")])
    c = spd["closeness"]
    assert c["kl"] > 0 and c["tokens"] == 248 and c["topk"] == 8  # 8 windows of 31
    base = json.loads(dense.read_text())
    assert c["ppl_ratio"] == pytest.approx(spd["ppl"] / base["ppl"], rel=1e-6)
    assert json.loads((tmp_path / "spd.json").read_text())["closeness"] == c
    assert "KL " in capsys.readouterr().out
    with pytest.raises(SystemExit):  # other text than the reference's: refused before loading
        main([*text[:-4], "--ppl-tokens", "128", "--ppl-ctx", "32", "--baseline", str(dense)])
    with pytest.raises(SystemExit):  # a reference is written beside --json: none given
        main([*text, "--reference-topk", "8"])
    with pytest.raises(SystemExit):  # a baseline without a reference and no tasks to pair
        main([*text, "--baseline", str(tmp_path / "same.json")])
    assert math.isfinite(c["kl_se"]) and c["kl_se"] > 0
