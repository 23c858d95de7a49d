"""KV-cache generation (megatron_spd.inference): exactness against full recompute, batching with
left padding, TP vs T=1 on SmolLM2, sync points per decode step, bad input, and dead ranks.

Tolerances: tiny random fp32 models, cached vs recomputed logits atol 1e-5 (measured ~1.5e-7);
SmolLM2 (logits of magnitude ~20) atol 1e-3 for cached vs recomputed logits; tokens must be
identical everywhere greedy decoding is compared.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from megatron_spd import ModelConfig, SPDPlan
from megatron_spd.testing import run_ranks

TINY = ModelConfig(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=96, vocab_size=128, max_seq_length=32)
TINY_SPD_BLOCKS = [1, 3]
ATOL_TINY = 1e-5
ATOL_REAL = 1e-3
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [42], [3, 1, 4, 1, 5]]


class ToyTokenizer:
    """Printable ASCII, one character per token (id = ord(c) - 32); 100 is EOS."""

    eos_id, bos_id, vocab_size, add_bos = 100, None, 128, False

    def encode(self, text: str, add_bos=None) -> list[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i + 32) if i < 95 else "?" for i in ids)


# ----- no processes: sampling and config validation ----------------------------------------------
def test_sampling_filters_and_seeds():
    from megatron_spd.inference import GenerationConfig, SamplingParams, filter_logits, sample
    from megatron_spd.inference.sampling import make_generator

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))

    def kept(filtered):
        return torch.isfinite(filtered)[0].tolist()

    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # nucleus: 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15 -> three tokens
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
    assert sample(logits, SamplingParams()).tolist() == [0]
    params = SamplingParams(temperature=1.0, top_k=3)

    def draws(seed):
        return sample(logits.expand(200, 5), params, make_generator(seed, torch.device("cpu"))).tolist()

    assert draws(7) == draws(7)
    assert set(draws(7)) <= {0, 1, 2} and len(set(draws(7))) == 3
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                dict(max_new_tokens=0), dict(max_batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationConfig(**bad)


def test_ttft_and_tpot_on_a_fake_clock(monkeypatch):
    """Time to first token runs from the start of the prompt's own batch's prefill to its first
    token; time per output token is the mean over the later tokens. A fake clock advances only
    inside prefill (1 s) and the decode steps (0.1, 0.2, 0.3 s, ...), so the timings are exact."""
    from megatron_spd.parallel import distributed
    from megatron_spd.inference import GenerationConfig, generate_ids, generation
    from megatron_spd.inference.run import summary
    from megatron_spd.core.spec import build_model

    clock = [100.0]
    steps = iter([0.1, 0.2, 0.3, 0.1, 0.2, 0.3])
    real_prefill, real_decode = generation.prefill, generation.decode_step

    def prefill(*a, **k):
        clock[0] += 1.0
        return real_prefill(*a, **k)

    def decode_step(*a, **k):
        clock[0] += next(steps)
        return real_decode(*a, **k)

    with distributed.running(1):
        model = build_model(TINY).eval()
        monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
        monkeypatch.setattr(generation, "prefill", prefill)
        monkeypatch.setattr(generation, "decode_step", decode_step)
        config = GenerationConfig(max_new_tokens=4, stop_on_eos=False, max_batch_size=1)
        first, second = generate_ids(model, PROMPTS[:2], config)  # two batches of one
        (single,) = generate_ids(model, PROMPTS[:1], GenerationConfig(max_new_tokens=1))
    for r in (first, second):
        assert len(r.tokens) == 4
        assert r.ttft_s == pytest.approx(1.0)  # not 1 + the first batch's time for the second
        assert r.tpot_s == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert single.ttft_s == pytest.approx(1.0) and single.tpot_s is None
    assert summary([first, second, single]) == {
        "prompts": 3, "prompt_tokens": 3 + 7 + 3, "output_tokens": 9,
        "ttft_s_median": pytest.approx(1.0), "tpot_s_median": pytest.approx(0.2)}


# ----- tiny random models at TP=2 ----------------------------------------------------------------
def _cache_vs_recompute(model, prompt: list[int], feed: list[int]) -> float:
    """Max |cached - recomputed| over prefill and len(feed) decode steps (no padding)."""
    from megatron_spd.inference import decode_step, new_cache, prefill
    from megatron_spd.core.sharding import forward_logits

    cache = new_cache(1, len(prompt) + len(feed))
    seq = torch.tensor([prompt])
    logits = prefill(model, cache, seq)
    err = 0.0
    for tok in feed:
        err = max(err, (logits - forward_logits(model, seq)[:, -1]).abs().max().item())
        seq = torch.cat([seq, torch.tensor([[tok]])], 1)
        logits = decode_step(model, cache, torch.tensor([tok]))
    return max(err, (logits - forward_logits(model, seq)[:, -1]).abs().max().item())


def _padded_vs_alone(model, prompts: list[list[int]], feed: list[int]) -> float:
    """Max |batched (left-padded) - alone| logits over prefill and decode steps."""
    from megatron_spd.inference import decode_step, new_cache, prefill

    def run(rows):
        width = max(len(p) for p in rows)
        tokens = torch.tensor([[0] * (width - len(p)) + p for p in rows])
        cache = new_cache(len(rows), width + len(feed))
        out = [prefill(model, cache, tokens, [len(p) for p in rows])]
        for tok in feed:
            out.append(decode_step(model, cache, torch.full((len(rows),), tok)))
        return torch.stack(out, 1)  # [b, steps, V]

    batched = run(prompts)
    alone = torch.cat([run([p]) for p in prompts], 0)
    return (batched - alone).abs().max().item()


def _count_step_collectives(model) -> dict:
    from megatron_spd.parallel.collectives import CollectiveCounter
    from megatron_spd.inference import decode_step, new_cache, prefill

    cache = new_cache(2, 8)
    with CollectiveCounter() as pre:
        prefill(model, cache, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with CollectiveCounter() as dec:
        decode_step(model, cache, torch.tensor([7, 8]))
    return {"prefill": dict(pre.calls), "decode": dict(dec.calls)}


def _tiny_checks() -> dict:
    import torch.distributed as dist

    from megatron_spd.inference import GenerationConfig, GenerationError, generate, generate_ids
    from megatron_spd.core.spec import build_model

    out: dict = {"rank": dist.get_rank()}
    greedy = GenerationConfig(max_new_tokens=6, stop_on_eos=False, max_batch_size=3)
    for name, plan in (("dense", None),
                       ("spd", SPDPlan.from_spd_blocks(TINY.num_layers, 2, TINY_SPD_BLOCKS))):
        model = build_model(TINY, plan).eval()
        r = out[name] = {}
        r["cache_err"] = _cache_vs_recompute(model, PROMPTS[1], [9, 8, 7, 6, 5])
        r["pad_err"] = _padded_vs_alone(model, PROMPTS[:3], [9, 8, 7])
        r["batched"] = [x.tokens for x in generate_ids(model, PROMPTS, greedy)]
        r["alone"] = [generate_ids(model, [p], greedy)[0].tokens for p in PROMPTS]
        r["collectives"] = _count_step_collectives(model)
    # the SPD model from here on
    # EOS: declare the first greedy token of prompt 0 that is new after step 0 the EOS
    ref = out["spd"]["alone"][0]
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    res = generate_ids(model, [PROMPTS[0]], GenerationConfig(max_new_tokens=6), eos_id=ref[k])[0]
    out["eos"] = (ref[:k], res.tokens, res.finish_reason)
    # a caller's stop rule: prompt 1 stops after its third token, prompt 0 runs on
    res = generate_ids(model, PROMPTS[:2], greedy, stop=lambda i, ids: i == 1 and len(ids) == 3)
    out["stop_rule"] = [(x.tokens, x.finish_reason) for x in res]
    # context end: a 29-token prompt in a 32-token context gets 3 tokens
    res = generate_ids(model, [list(range(1, 30))], greedy)[0]
    out["context"] = (len(res.tokens), res.finish_reason)
    # sampling: identical on both ranks (compared by the test), reproducible, batch-independent
    samp = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3,
                            stop_on_eos=False)
    out["sampled"] = [x.tokens for x in generate_ids(model, PROMPTS, samp)]
    out["sampled_alone"] = [generate_ids(model, [p], samp, indices=[i])[0].tokens
                            for i, p in enumerate(PROMPTS)]
    out["sampled_seed4"] = [x.tokens for x in generate_ids(
        model, PROMPTS, GenerationConfig(**{**vars(samp), "seed": 4}))]
    # text path with streaming (rank 0 only)
    pieces: dict = {}
    texts = generate(model, ToyTokenizer(), ["hi", "hello world"],
                     GenerationConfig(max_new_tokens=5, stop_on_eos=False),
                     stream=lambda i, s: pieces.setdefault(i, []).append(s))
    out["text"] = [(t.text, t.ttft_s, t.tpot_s, len(t.tokens)) for t in texts]
    out["streamed"] = {i: "".join(p) for i, p in pieces.items()}
    # bad input
    errors = {}
    for key, call in (
            ("empty_ids", lambda: generate_ids(model, [[1, 2], []], greedy)),
            ("empty_text", lambda: generate(model, ToyTokenizer(), ["ok", ""], greedy)),
            ("no_prompts", lambda: generate_ids(model, [], greedy)),
            ("too_long", lambda: generate_ids(model, [list(range(1, 41))], greedy)),
            ("fills_context", lambda: generate_ids(model, [[1] * 32], greedy)),
            ("bad_token", lambda: generate_ids(model, [[1, 500]], greedy))):
        try:
            call()
            errors[key] = None
        except GenerationError as e:
            errors[key] = str(e)
    out["errors"] = errors
    return out


def test_tiny_tp2_cache_batching_sampling_and_sync_points():
    results = run_ranks(_tiny_checks, 2, threads=1)
    r0, r1 = results
    layers, spd = TINY.num_layers, len(TINY_SPD_BLOCKS)
    for name in ("dense", "spd"):
        r = r0[name]
        print(f"{name}: cached vs recomputed {r['cache_err']:.2e}, padded vs alone "
              f"{r['pad_err']:.2e}, collectives {r['collectives']}")
        assert r["cache_err"] < ATOL_TINY, (name, r["cache_err"])
        assert r["pad_err"] < ATOL_TINY, (name, r["pad_err"])
        assert r["batched"] == r["alone"], name
        assert all(len(t) == 6 for t in r["batched"])
        assert r1[name]["batched"] == r["batched"]
    # all-reduces per forward: 1 in the vocab-parallel embedding + 2 per dense block + 1 per SPD block
    for phase in ("prefill", "decode"):
        dense = r0["dense"]["collectives"][phase]["all_reduce"]
        spd_ar = r0["spd"]["collectives"][phase]["all_reduce"]
        assert dense == 1 + 2 * layers, (phase, dense)
        assert spd_ar == 1 + 2 * (layers - spd) + spd, (phase, spd_ar)
    before_eos, tokens, reason = r0["eos"]
    assert tokens == before_eos and reason == "eos", r0["eos"]
    assert r0["context"] == (3, "context")
    alone = r0["spd"]["alone"]
    assert r0["stop_rule"] == [(alone[0], "length"), (alone[1][:3], "stop")], r0["stop_rule"]
    assert r0["sampled"] == r1["sampled"] == r0["sampled_alone"]
    assert r0["sampled"] != r0["sampled_seed4"]
    for (text, _, _, n), streamed in zip(r0["text"], (r0["streamed"][0], r0["streamed"][1])):
        assert n == 5 and len(text) == 5 and streamed == text  # timings: test_ttft_and_tpot_...
    assert r1["streamed"] == {}
    errors = r0["errors"]
    assert "prompt 1 is empty" in errors["empty_ids"]
    assert "prompt 1 is empty" in errors["empty_text"]
    assert "no prompts" in errors["no_prompts"]
    assert "40 tokens" in errors["too_long"] and "context is 32" in errors["too_long"]
    assert "shorten" in errors["fills_context"]
    assert "outside the vocabulary" in errors["bad_token"]


# ----- a rank dies (or hangs) mid-generation -----------------------------------------------------
def _die_mid_generation(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    from megatron_spd.inference import GenerationConfig, GenerationError, generation
    from megatron_spd.core.spec import build_model

    model = build_model(TINY).eval()
    if dist.get_rank() == 1:
        real, calls = generation.decode_step, [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                if mode == "die":
                    os._exit(3)
                time.sleep(HANG_S)  # stuck well past the survivors' timeout, then gone
                os._exit(4)
            return real(*args, **kwargs)

        generation.decode_step = failing
    start = time.perf_counter()
    try:
        generation.generate_ids(model, [PROMPTS[1]], GenerationConfig(max_new_tokens=20,
                                                                      stop_on_eos=False))
        message = None
    except GenerationError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"message": message, "seconds": time.perf_counter() - start}, f)


# The timeout also bounds the start-up rendezvous and any lag between ranks, so it must cover a
# slow spawn on a busy box; a dead peer is noticed at once (its sockets close), a stuck one only
# after the timeout, so the stuck rank sleeps well past it: until the survivor's bound below
# (timeout + 10 s), so that noticing its exit instead of the timeout fails the test.
HANG_S = 25


@pytest.mark.parametrize("mode,timeout_s", [("die", 60),
                                            pytest.param("hang", 15, marks=pytest.mark.slow)])
def test_dead_or_stuck_rank_fails_fast_with_clear_error(mode, timeout_s, tmp_path):
    with pytest.raises(RuntimeError, match=r"ranks \[1\] exited with codes"):
        run_ranks(_die_mid_generation, 2, mode, str(tmp_path), threads=1, fresh=True,
                  _timeout_s=timeout_s)
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    print(f"{mode}: survivor failed after {survivor['seconds']:.2f} s: {survivor['message']}")
    assert survivor["message"] is not None, "the surviving rank did not notice the failure"
    assert "generation aborted on rank 0" in survivor["message"]
    assert "another rank died or stopped responding" in survivor["message"]
    assert "--timeout-s" in survivor["message"]  # the flag a user changes, not a Python call
    # generation itself takes well under a second here; the wait is bounded by the timeout
    # (a TP group left at torch's 30-minute default would wait until the stuck rank exits)
    assert survivor["seconds"] < min(timeout_s + 10, HANG_S), survivor
    if mode == "hang":
        assert survivor["seconds"] > timeout_s - 1, survivor


# ----- SmolLM2: TP=3 vs TP=1, dense and SPD ------------------------------------------------------
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
REAL_SPD_BLOCKS = range(15, 30)


def _real_generation() -> dict:
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.inference import GenerationConfig, generate

    out = {}
    config = GenerationConfig(max_new_tokens=10)
    for name, plan in (("dense", None), ("spd", SPDPlan.from_spd_blocks(30, 3, REAL_SPD_BLOCKS))):
        lm = open_model(None, plan=plan)
        res = generate(lm.model, lm.tokenizer, REAL_PROMPTS, config)
        ids = lm.tokenizer.encode(REAL_PROMPTS[0])
        out[name] = {"tokens": [r.tokens for r in res], "text": [r.text for r in res],
                     "cache_err": _cache_vs_recompute(lm.model, ids, res[0].tokens[:4])}
        del lm
    return out


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_greedy_tp3_equals_tp1_dense_and_spd():
    tp1 = run_ranks(_real_generation, 1)[0]
    tp3 = run_ranks(_real_generation, 3, threads=1)
    for name in ("dense", "spd"):
        print(f"{name}: T=1 {tp1[name]['text']} cache err {tp1[name]['cache_err']:.2e}; "
              f"TP=3 {tp3[0][name]['text']} cache err {tp3[0][name]['cache_err']:.2e}")
    assert tp1["dense"]["text"][0].startswith(" Paris"), tp1["dense"]["text"]
    for name in ("dense", "spd"):
        assert tp1[name]["cache_err"] < ATOL_REAL, (name, tp1[name]["cache_err"])
        for rank in tp3:
            assert rank[name]["tokens"] == tp1[name]["tokens"], (name, rank[name]["text"],
                                                                 tp1[name]["text"])
            assert rank[name]["cache_err"] < ATOL_REAL, (name, rank[name]["cache_err"])
    assert tp1["spd"]["tokens"] != tp1["dense"]["tokens"]  # the SPD plan really is in use


# ----- the tool body (inference.run): prompt files, data-parallel sharding, the command line ----
def test_read_prompts_and_summary(tmp_path):
    from megatron_spd.inference import GenerationError, GenerationResult
    from megatron_spd.inference.run import read_prompts, summary

    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\\nline\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(["cli"], txt) == ["cli", "first", "second\nline"]
    assert read_prompts([], jsonl) == ["a", "b"]
    with pytest.raises(GenerationError, match="no prompts"):
        read_prompts([])
    with pytest.raises(GenerationError, match="does not exist"):
        read_prompts([], tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(GenerationError, match=r"bad.jsonl:1: .*\"prompt\""):
        read_prompts([], tmp_path / "bad.jsonl")
    results = [GenerationResult([1, 2], [3, 4, 5], "length", 0.5, 0.1),
               GenerationResult([1], [7], "length", 0.3, None)]
    assert summary(results) == {"prompts": 2, "prompt_tokens": 3, "output_tokens": 4,
                                "ttft_s_median": 0.4, "tpot_s_median": 0.1}


def _sharded() -> dict:
    import torch.distributed as dist

    from megatron_spd.inference import GenerationConfig, generate
    from megatron_spd.inference.run import generate_sharded
    from megatron_spd.core.spec import build_model

    model = build_model(TINY).eval()  # same seed on every rank: identical replicas
    prompts = ["ab", "cde", "f", "ghij", "k"]
    config = GenerationConfig(max_new_tokens=4, temperature=1.0, seed=5, stop_on_eos=False)
    sharded = generate_sharded(model, ToyTokenizer(), prompts, config)
    whole = generate(model, ToyTokenizer(), prompts, config)
    return {"rank": dist.get_rank(), "sharded": None if sharded is None else
            [(r.prompt, r.tokens) for r in sharded], "whole": [(r.prompt, r.tokens) for r in whole]}


def test_data_parallel_replicas_share_prompts():
    r0, r1 = run_ranks(_sharded, 2, tp=1, threads=1)
    assert r1["sharded"] is None
    assert r0["sharded"] == r0["whole"] == r1["whole"]


def test_generate_tool_rejects_missing_prompts_file(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "tools/generate.py", "--prompts-file",
                           str(tmp_path / "nope.txt")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2 and "nope.txt does not exist" in proc.stderr, proc.stderr


@pytest.mark.real_model
@pytest.mark.slow
def test_generate_tool_smollm2_one_process(tmp_path, capsys):
    """The generate command's body end to end on the default model, in this process (a tool
    subprocess runs in test_generate_tool_rejects_missing_prompts_file): printed results, the
    JSON report and its timing summary."""
    from megatron_spd.cli.generate import main

    out = tmp_path / "gen.json"
    main(["--prompt", REAL_PROMPTS[0], "--max-new-tokens", "3", "--json", str(out)])
    assert "[0] The capital of France is Paris" in capsys.readouterr().out
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["text"].startswith(" Paris") and len(res["tokens"]) == 3
    assert data["summary"]["ttft_s_median"] > 0 and data["summary"]["tpot_s_median"] > 0
