"""megatron-core 0.19's own dynamic inference engine and HTTP server serving an SPD checkpoint
(megatron_spd.integrations.megatron_dynamic), on CPU behind compat.apply_dynamic_inference.

A tiny LLaMA-style model (tests/tiny.py, vocabulary widened to the word tokenizer's 101 ids)
saved as an SPD checkpoint with plan G=2 [zs, dense, zs], opened with open_model:
- greedy tokens through megatron's DynamicInferenceEngine equal our KV-cache engine's
  (megatron_spd.inference) and full recompute's, at TP=1 (G=2 emulated) and TP=2 over gloo;
  identical tokens are required (logits agree to fp32 rounding, so an argmax tie would show);
- TP all-reduces per engine step at TP=2: 1 (embedding) + 1 per SPD block + 2 per dense block,
  and the same checkpoint opened with a dense plan gives the stock 1 + 2 per block;
- megatron's server on 127.0.0.1: POST /v1/completions (text and token-list prompts) and
  /v1/chat/completions return the same tokens. The word tokenizer has no chat template; the
  minimal one here renders each message's content, so the chat prompt is the same tokens.
Passes on megatron-core 0.18.2 and 0.19.2. Skipped, with the reason, where megatron-core lacks
the classes the integration uses (0.16.x, 0.17.x) or the server
packages (quart, hypercorn, pyzmq, msgpack; the ``megatron-server`` extra) are missing.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.request

import pytest

from megatron_spd import SPDPlan
from megatron_spd.parallel import compat
from megatron_spd.testing import run_ranks

from tiny import LLAMA, word_tokenizer

try:
    from megatron_spd.parallel.mcore_versions import dynamic_inference

    dynamic_inference()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)
if not compat.importable("einops"):
    pytest.skip("megatron-core's dynamic attention needs einops (the megatron-server extra)",
                allow_module_level=True)

CFG = dataclasses.replace(LLAMA, vocab_size=128)
PLAN = SPDPlan(2, ["zs", "dense", "zs"])
PROMPTS = [[5, 17, 42, 9, 3, 88], [7, 8], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
NEW = 6
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
SERVER_MISSING = [p for p in ("quart", "hypercorn", "zmq", "msgpack") if not compat.importable(p)]


def test_cpu_paged_attention_equals_plain_causal_attention():
    """compat's stand-in for flash-attn's paged kernels against torch's own attention on the
    same sequences laid out contiguously (fp32, atol 1e-6): prefill with a cached prefix and
    padding rows (zeros), and a decode step; GQA (4 query heads per 2 KV heads), scattered
    blocks."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    lengths, new = [7, 3], [3, 3]  # request 0: 4 cached + 3 new tokens; request 1: 3 new
    keys = [torch.randn(n, kv_heads, dim) for n in lengths]
    values = [torch.randn(n, kv_heads, dim) for n in lengths]
    queries = [torch.randn(n, heads, dim) for n in new]
    k_cache, v_cache = torch.zeros(8, block, kv_heads, dim), torch.zeros(8, block, kv_heads, dim)
    table = torch.tensor([[5, 2], [7, 0]])  # request r's blocks, out of order
    for r, n in enumerate(lengths):
        for i in range(n):
            k_cache[table[r, i // block], i % block] = keys[r][i]
            v_cache[table[r, i // block], i % block] = values[r][i]

    def reference(r: int) -> torch.Tensor:
        k, v = (t.repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
                for t in (keys[r], values[r]))
        n, m = new[r], lengths[r]
        mask = torch.arange(m)[None, :] <= torch.arange(m - n, m)[:, None]
        return F.scaled_dot_product_attention(queries[r].transpose(0, 1), k, v,
                                              attn_mask=mask).transpose(0, 1)

    q = torch.cat([*queries, torch.randn(2, heads, dim)])  # 2 padding rows
    out = compat.paged_attention_varlen(
        q, k_cache, v_cache, torch.tensor([0, 3, 6]), torch.tensor([0, 7, 10]), 3, 7,
        causal=True, block_table=table)
    torch.testing.assert_close(out[:6], torch.cat([reference(0), reference(1)]), atol=1e-6,
                               rtol=0)
    assert out.shape == q.shape and not out[6:].any()
    last = torch.stack([queries[0][-1:], queries[1][-1:]])  # [requests, 1, heads, dim]
    out = compat.paged_attention_with_kvcache(last, k_cache, v_cache, torch.tensor(lengths),
                                              causal=True, block_table=table)
    torch.testing.assert_close(out[:, 0], torch.stack([reference(0)[-1], reference(1)[-1]]),
                               atol=1e-6, rtol=0)


def _save(out: str) -> None:
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.core.spec import build_model

    save_checkpoint(build_model(CFG, PLAN), out, config=CFG, plan=PLAN,
                    tokenizer=word_tokenizer(), overwrite=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("dynamic") / "spd")
    run_ranks(_save, 1, out)
    return out


def _recompute(model, prompt: list[int]) -> list[int]:
    import torch

    from megatron_spd.core.sharding import forward_logits

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(NEW):
            seq.append(int(forward_logits(model, torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def _three_engines(ckpt: str, dense: bool = False) -> dict:
    """Greedy tokens by full recompute, our KV-cache engine and megatron's dynamic engine, and
    the TP collectives the dynamic engine issued per step."""
    from megatron_spd.inference import GenerationConfig, generate_ids
    from megatron_spd.integrations.megatron_dynamic import build_engine
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.parallel.collectives import CollectiveCounter

    lm = open_model(ckpt, plan=SPDPlan.dense(CFG.num_layers, 2) if dense else None)
    recompute = [_recompute(lm.model, p) for p in PROMPTS]
    ours = [r.tokens for r in generate_ids(lm.model, PROMPTS, GenerationConfig(
        max_new_tokens=NEW, stop_on_eos=False))]
    with build_engine(lm) as engine, CollectiveCounter() as counter:
        megatron = engine.generate(PROMPTS, NEW)
    return {"recompute": recompute, "ours": ours, "megatron": megatron, "steps": engine.steps,
            "calls": dict(counter.calls)}


def _check_tokens(result: dict) -> None:
    assert all(len(t) == NEW for t in result["megatron"])
    assert result["megatron"] == result["ours"] == result["recompute"]


def test_dynamic_engine_tp1_equals_our_engine_and_recompute(ckpt):
    _check_tokens(run_ranks(_three_engines, 1, ckpt)[0])


def test_dynamic_engine_tp2_one_all_reduce_per_spd_block(ckpt):
    spd = run_ranks(_three_engines, 2, ckpt, threads=1)
    dense = run_ranks(_three_engines, 2, ckpt, dense=True, threads=1)
    for rank in spd + dense:
        _check_tokens(rank)
    assert spd[0]["megatron"] == spd[1]["megatron"]
    syncs = sum(1 if s == "zs" else 2 for s in PLAN.strategies)  # 4
    for result, per_step in ((spd[0], 1 + syncs), (dense[0], 1 + 2 * CFG.num_layers)):
        assert result["calls"]["all_reduce"] == per_step * result["steps"], result
        assert result["calls"]["all_gather"] == result["steps"]  # the vocab-parallel logits


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _ask(base: str) -> dict:
    """What the HTTP client sees: the generated ids of each endpoint for PROMPTS[0]."""
    text = " ".join(f"w{t - 1}" for t in PROMPTS[0])  # the word tokenizer: w<i> is id i + 1
    common = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    completions = [_post(f"{base}/v1/completions", {"prompt": p, **common})
                   for p in (text, PROMPTS[0])]
    chat = _post(f"{base}/v1/chat/completions",
                 {"messages": [{"role": "user", "content": text}], **common})
    return {"completions": [c["choices"][0]["generation_token_ids"] for c in completions],
            "completions_prompt": [c["choices"][0]["prompt_token_ids"] for c in completions],
            "chat": chat["choices"][0]["message"]["generation_token_ids"],
            "chat_prompt": chat["choices"][0]["message"]["prompt_token_ids"]}


def _serve(ckpt: str) -> dict:
    from megatron_spd.inference import GenerationConfig, generate_ids
    from megatron_spd.integrations.megatron_dynamic import build_engine
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.parallel.distributed import free_port

    lm = open_model(ckpt)
    (ours,) = generate_ids(lm.model, PROMPTS[:1], GenerationConfig(max_new_tokens=NEW,
                                                                    stop_on_eos=False))
    engine = build_engine(lm, chat_template=CHAT_TEMPLATE)
    return {"ours": ours.tokens, **engine.serve(free_port(), client=_ask)}


@pytest.mark.skipif(bool(SERVER_MISSING), reason=f"megatron's dynamic text generation server "
                    f"needs {SERVER_MISSING} (pip install 'megatron-spd[megatron-server]')")
def test_dynamic_text_gen_server_completions_and_chat(ckpt):
    got = run_ranks(_serve, 1, ckpt)[0]
    assert got["completions_prompt"] == [PROMPTS[0], PROMPTS[0]]
    assert got["chat_prompt"] == PROMPTS[0]
    assert got["completions"] == [got["ours"], got["ours"]]
    assert got["chat"] == got["ours"]
