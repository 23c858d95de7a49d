"""Llama-3.x, Qwen2/2.5, Qwen3 and Mistral end to end (issue 12), on tiny random models that
transformers builds and saves (tests/families.py: Llama-3 RoPE scaling + tied embeddings; Qwen2
q/k/v biases; Qwen3 QK-norm + head_dim 24 != 64/4; Mistral sliding window 16 + sentencepiece):

- HF directory -> megatron-core: logits at TP=1 and TP=2 equal transformers';
- an SPD plan (G=2) at T=2 (with and without sequence parallel) equals its T=1 emulation, and
  that equals tests/reference.py (logits and gradients); the sensitivity sweep, head grouping
  and B2B run on every family;
- HF -> megatron-spd checkpoint (saved at TP=2) -> HF is bit-exact, and transformers loads it;
- perplexity through the evaluate command equals transformers' on the same tokens;
- KV-cache decode (the engine's cache path and megatron's) equals recompute; Mistral
  refuses sequences beyond its window;
- GGUF files written as llama.cpp writes them load to the same weights as the HF directory and as
  transformers' own GGUF loader, with tokenizers equal to the families' tokenizer.json and to
  transformers' GGUF tokenizer.

One rank group per world size (1, 2) runs every family. Tolerances (fp32, logits O(1-10)):
- megatron vs transformers, and TP=2 vs TP=1: atol = rtol = 1e-5 (measured: <= 3e-7);
- gradients T=2 vs T=1: atol 1e-6 * max(1, max|g|), rtol 1e-4; megatron vs the plain-torch
  reference: logits atol 2e-5, rtol 1e-5, gradients atol 4e-6 * max(1, max|g|), rtol 1e-4
  (tests/tiny.py, as tests/test_foundation.py);
- KV-cache decode vs recompute: atol = rtol = 1e-5; perplexity: relative 1e-5;
- conversions and round trips: bit-exact (torch.equal).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks

from families import FAMILIES, GGUF_ARCH, TEXTS, VOCAB, WINDOW, hf_llama3_divisors, write_gguf, \
    write_hf_dir
from reference import reference_logits
from tiny import CROSS_PATH_GRAD_TOL, CROSS_PATH_LOGIT_TOL, GRAD_TOL, LOGIT_TOL, \
    assert_grads_close

G = 2
PLAN = SPDPlan(G, ["zs", "zs"])
TOKENS = torch.randint(3, 280, (2, WINDOW), generator=torch.Generator().manual_seed(0))
PROMPT = 8  # KV cache: prefill this many tokens, decode the rest one by one


def _loss_weights():
    return torch.randn(*TOKENS.shape, VOCAB, generator=torch.Generator().manual_seed(7))


# ----- what each rank computes ------------------------------------------------------------------

def _family_on_rank(hf_dir: str, ckpt: str | None, recipe: bool) -> dict:
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.core.grads import reduce_tp_partial_grads
    from megatron_spd.inference import decode_step, new_cache, prefill
    from megatron_spd.core.sharding import forward_logits, gather_full_state_dict, load_full_state_dict
    from megatron_spd.core.spec import build_model

    out: dict = {}
    lm = open_model(hf_dir)
    with torch.no_grad():
        out["dense"] = forward_logits(lm.model, TOKENS)
    full = gather_full_state_dict(lm.model)
    for sp in (True, False) if ckpt is not None else (False,):  # sequence parallel at T=2
        spd = build_model(lm.config, PLAN, sequence_parallel=sp)
        load_full_state_dict(spd, full)
        logits = forward_logits(spd, TOKENS)
        (logits * _loss_weights()).sum().backward()
        reduce_tp_partial_grads(spd)
        out["spd_sp" if sp else "spd"] = (logits.detach(), gather_full_state_dict(spd, grads=True))
    spd.eval()  # the one without sequence parallel: decoding cannot split one token
    for tensor_path in (True, False):  # the engine's cache path and megatron's static one
        cache = new_cache(TOKENS.shape[0], WINDOW, tensor_path=tensor_path)
        steps = [prefill(spd, cache, TOKENS[:, :PROMPT])]
        steps += [decode_step(spd, cache, TOKENS[:, t]) for t in range(PROMPT, WINDOW - 1)]
        out[f"decode_{'tensor' if tensor_path else 'megatron'}"] = torch.stack(steps, 1)
    with torch.no_grad():
        out["recompute"] = forward_logits(spd, TOKENS)[:, PROMPT - 1:WINDOW - 1]
    if lm.config.sliding_window is not None:
        try:
            forward_logits(lm.model, torch.zeros(1, WINDOW + 1, dtype=torch.long))
        except ValueError as e:
            out["too_long"] = str(e)
    if ckpt is not None:
        save_checkpoint(lm.model, ckpt, config=lm.config, plan=lm.plan, tokenizer=lm.tokenizer)
    if recipe:
        out["recipe"] = _recipe(lm.config, full)
    return out


def _recipe(cfg, full) -> dict:
    """Sensitivity sweep, head grouping (dense function unchanged) and B2B on this family."""
    from megatron_spd.core.sharding import forward_logits, load_full_state_dict
    from megatron_spd.recipe import activations, distill, headgroup, recover, sensitivity
    from megatron_spd.core.spec import build_model

    calib = torch.randint(3, 280, (4, WINDOW), generator=torch.Generator().manual_seed(5))
    dense, spd = sensitivity.build_pair(cfg, full, G)
    xs = activations.block_inputs(dense, calib)
    sens = sensitivity.sweep(dense, spd, calib, dense_inputs=xs, progress=False)
    regrouped, _ = headgroup.regroup(full, cfg, dense, [0, 1], xs, G, progress=False)
    check = build_model(cfg)
    load_full_state_dict(check, regrouped)
    with torch.no_grad():
        hg_dense = forward_logits(check, TOKENS)
    model = build_model(cfg, PLAN)
    load_full_state_dict(model, full)
    (b2b,) = recover.recover(model, dense, calib, {1: recover.BlockSteps(b2b=True)}, cfg,
                             b2b=distill.B2BConfig(epochs=3, lr=2e-3), progress=False).b2b
    # plain data for run_ranks: the B2BResult's fields
    return {"sensitivity": sens.sensitivity, "hg_dense": hg_dense, "b2b": dataclasses.asdict(b2b)}


def _world(dirs: dict, ckpts: dict | None) -> dict:
    single = ckpts is None
    return {f: _family_on_rank(dirs[f], None if single else ckpts[f], recipe=single)
            for f in FAMILIES}


# ----- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (HF directory, transformers model)}."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for f in FAMILIES:
        (root / f).mkdir()
        out[f] = (root / f, write_hf_dir(f, root / f))
    return out


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    """{1: rank-0 results at T=1, 2: [rank results at T=2], "ckpts": {family: checkpoint}}."""
    root = tmp_path_factory.mktemp("ckpts")
    dirs = {f: str(d) for f, (d, _) in models.items()}
    ckpts = {f: str(root / f) for f in FAMILIES}
    return {1: run_ranks(_world, 1, dirs, None)[0], 2: run_ranks(_world, 2, dirs, ckpts),
            "ckpts": ckpts}


def _hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


# ----- conversion of the config ------------------------------------------------------------------

def test_config_carries_each_familys_features(models):
    from megatron_spd.convert.hf import load_hf

    cfgs = {f: load_hf(d)[0] for f, (d, _) in models.items()}
    assert cfgs["llama3"].rope_scaling and cfgs["llama3"].rope_scaling_factor == 32.0
    assert cfgs["llama3"].tie_word_embeddings and cfgs["llama3"].head_dim == 16
    assert cfgs["qwen2"].add_qkv_bias and not cfgs["qwen2"].add_bias_linear
    assert cfgs["qwen3"].qk_layernorm and cfgs["qwen3"].head_dim == 24
    assert cfgs["qwen3"].kv_channels == 24 and not cfgs["qwen3"].qkv_bias
    m = cfgs["mistral"]
    assert (m.sliding_window, m.max_seq_length) == (WINDOW, WINDOW)  # 128 capped to the window
    tcfg = cfgs["qwen3"].transformer_config(1)
    assert (tcfg.kv_channels, tcfg.qk_layernorm, tcfg.add_qkv_bias) == (24, True, False)
    assert cfgs["qwen2"].transformer_config(1).add_qkv_bias
    for f, (_, model) in models.items():  # parameters() counts tied embeddings once
        assert cfgs[f].num_parameters() == sum(t.numel() for t in model.parameters()), f


# ----- logits, SPD, gradients, decode ------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_tp1_and_tp2_equal_transformers(models, ranks, family):
    ref = _hf_logits(models[family][1])
    torch.testing.assert_close(ranks[1][family]["dense"], ref, **LOGIT_TOL)
    for r in ranks[2]:
        torch.testing.assert_close(r[family]["dense"], ref, **LOGIT_TOL)


def test_llama3_rope_scaling_matters(models):
    """The tiny Llama-3 model must be sensitive to the scaling for the test above to mean it."""
    from transformers import AutoModelForCausalLM

    _, model = models["llama3"]
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg)).float().eval()
    plain.load_state_dict(model.state_dict())
    long = torch.randint(3, 280, (1, 128), generator=torch.Generator().manual_seed(3))
    assert (_hf_logits(plain, long) - _hf_logits(model, long)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_spd_t2_equals_emulation_and_reference(models, ranks, family):
    from megatron_spd.convert.hf import load_hf

    t1_logits, t1_grads = ranks[1][family]["spd"]
    for r in ranks[2]:
        for key in ("spd", "spd_sp"):  # without and with sequence parallel
            t2_logits, t2_grads = r[family][key]
            torch.testing.assert_close(t2_logits, t1_logits, **LOGIT_TOL)
            assert_grads_close(t2_grads, t1_grads, GRAD_TOL, f"{family} T=2 {key}")
    assert (t1_logits - ranks[1][family]["dense"]).abs().max() > 1e-3, "SPD must change the model"
    cfg, full = load_hf(models[family][0])
    sd = {k: v.clone().requires_grad_() for k, v in full.items()}
    ref = reference_logits(cfg, sd, TOKENS, PLAN)
    torch.testing.assert_close(t1_logits, ref.detach(), **CROSS_PATH_LOGIT_TOL)
    (ref * _loss_weights()).sum().backward()
    assert_grads_close(t1_grads, {k: v.grad for k, v in sd.items()}, CROSS_PATH_GRAD_TOL,
                  f"{family} reference")
    dense_ref = reference_logits(cfg, full, TOKENS)
    torch.testing.assert_close(dense_ref, _hf_logits(models[family][1]), **CROSS_PATH_LOGIT_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_equals_recompute(ranks, family):
    for res in [ranks[1]] + ranks[2]:
        for path in ("decode_tensor", "decode_megatron"):
            torch.testing.assert_close(res[family][path], res[family]["recompute"], **LOGIT_TOL)


def test_sliding_window_caps_the_context(ranks):
    from megatron_spd.core.config import ModelConfig

    assert f"exceed the model's context of {WINDOW}" in ranks[1]["mistral"]["too_long"]
    with pytest.raises(ValueError, match="cannot restrict attention to a window"):
        ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=96, vocab_size=VOCAB, max_seq_length=32, sliding_window=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_runs_on_each_family(ranks, family):
    r = ranks[1][family]["recipe"]
    assert len(r["sensitivity"]) == 2 and all(s == s for s in r["sensitivity"])
    torch.testing.assert_close(r["hg_dense"], ranks[1][family]["dense"], atol=1e-4, rtol=0)
    b2b = r["b2b"]  # ran on the block; keeps the initial weights if training did not help
    assert b2b["steps"] > 0 and b2b["mse_trained"] == b2b["mse_trained"]
    assert b2b["mse_after"] == min(b2b["mse_before"], b2b["mse_trained"])


# ----- round trip and the evaluation tool --------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_mcore_hf_round_trip_bit_exact(models, ranks, family, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_spd.convert.hf import model_config_from_hf
    from megatron_spd.loading.convert import to_hf
    from megatron_spd.data.tokenizer import load_tokenizer

    src, model = models[family]
    out = tmp_path / "hf"
    summary = to_hf(ranks["ckpts"][family], out)
    assert summary["context"] == (WINDOW if family == "mistral" else 128)
    assert any(f"sliding window {WINDOW}" in x for x in summary["features"]) == \
        (family == "mistral")
    back, orig = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert back.keys() == orig.keys()
    assert all(torch.equal(back[k], orig[k]) for k in orig)
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert out_cfg["model_type"] == src_cfg["model_type"]
    assert model_config_from_hf(out_cfg) == model_config_from_hf(src_cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(_hf_logits(reloaded), _hf_logits(model), atol=0, rtol=0)
    t_src, t_out = load_tokenizer(src), load_tokenizer(out)
    assert (t_out.bos_id, t_out.eos_id, t_out.add_bos) == (t_src.bos_id, t_src.eos_id, t_src.add_bos)
    assert all(t_out.encode(t) == t_src.encode(t) for t in TEXTS)


def test_perplexity_tool_equals_transformers(models, tmp_path):
    """The evaluate command on each HF directory, in this process (test_errors runs
    tools/evaluate.py as a script), against transformers' NLL on the same tokens and windows
    (ctx = the Mistral window)."""
    from megatron_spd.cli.evaluate import main
    from megatron_spd.data.texts import load_texts, token_stream
    from megatron_spd.data.tokenizer import load_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS * 3))
    n_tokens = 4 * WINDOW
    for f, (d, _) in models.items():
        main(["--ckpt", str(d), "--tasks", "none", "--ppl-text", str(text), "--ppl-ctx",
              str(WINDOW), "--ppl-tokens", str(n_tokens), "--json", str(tmp_path / f"{f}.json")])
        got = json.loads((tmp_path / f"{f}.json").read_text())["perplexity"]
        tokens = token_stream(load_tokenizer(models[f][0]), load_texts(text), n_tokens)
        windows = tokens.view(-1, WINDOW)
        logits = _hf_logits(models[f][1], windows)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                                windows[:, 1:].reshape(-1))
        assert got["tokens"] == windows[:, 1:].numel()
        assert abs(got["ppl"] - nll.exp().item()) <= 1e-5 * got["ppl"], (f, got["ppl"], nll.exp())


# ----- GGUF ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for f in GGUF_ARCH:
        d, model = models[f]
        write_gguf(f, d, root / f"{f}.gguf",
                   rope_freqs=hf_llama3_divisors(model) if f == "llama3" else None)
        out[f] = root / f"{f}.gguf"
    return out


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_gguf_equals_hf_and_transformers_loader(models, ggufs, family):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from megatron_spd.convert.gguf import load_gguf
    from megatron_spd.convert.hf import full_to_hf, load_hf

    d, model = models[family]
    cfg, full = load_gguf(ggufs[family])
    hf_cfg, hf_full = load_hf(d)
    assert cfg == hf_cfg
    assert full.keys() == hf_full.keys() and all(torch.equal(full[k], hf_full[k]) for k in full)
    # transformers' own GGUF loader (name mapping and llama q/k un-permutation of its own)
    theirs = load_gguf_checkpoint(str(ggufs[family]), return_tensors=True, model_to_load=model)
    ours = full_to_hf(full, cfg)
    tensors = theirs["tensors"]
    assert set(ours) - {"lm_head.weight"} <= set(tensors), set(ours) - set(tensors)
    assert all(torch.equal(tensors[k].float(), ours[k]) for k in ours if k in tensors)
    tc = theirs["config"]
    assert (tc["num_hidden_layers"], tc["num_attention_heads"], tc["num_key_value_heads"],
            tc["hidden_size"], tc["intermediate_size"]) == (
        cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups, cfg.hidden_size,
        cfg.ffn_hidden_size)


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_gguf_tokenizer_equals_tokenizer_json_and_transformers(models, ggufs, family):
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    from megatron_spd.data.tokenizer import load_tokenizer

    ours, src = load_tokenizer(ggufs[family]), load_tokenizer(models[family][0])
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(ggufs[family]))
    theirs, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (src.bos_id, src.eos_id, src.add_bos)
    special = "<|begin_of_text|>" if family == "llama3" else "<|im_start|>"
    for text in TEXTS + [f"{special}user\nhi 2026{special}"]:
        ids = ours.encode(text, add_bos=False)
        assert ids == src.encode(text, add_bos=False), text
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text


def test_gguf_cache_keeps_one_entry_per_live_file(ggufs, tmp_path, monkeypatch):
    """A conversion prunes the cached conversions no lookup can reach again (their GGUF changed
    or is gone: 517 MB each for SmolLM2); a live file's entry and anything not ours stay."""
    import os
    import shutil

    from megatron_spd.loading.sources import load_weights

    cache = tmp_path / "cache"
    monkeypatch.setenv("MEGATRON_SPD_CACHE", str(cache))
    a, b, c = (tmp_path / f"{n}.gguf" for n in "abc")
    for p in (a, b, c):
        shutil.copy(ggufs["qwen2"], p)
    foreign = cache / "notes-0123456789abcdef"
    foreign.mkdir(parents=True)
    (foreign / "done").write_text("not ours: no config.json naming a source\n")

    def entries():
        return sorted(e.name.rsplit("-", 1)[0] for e in cache.iterdir() if e != foreign)

    _, first, _, _ = load_weights(a, progress=False)
    (entry,) = (e for e in cache.iterdir() if e != foreign)
    assert json.loads((entry / "config.json").read_text())["source"] == str(a.resolve())
    load_weights(a, progress=False)  # a hit: nothing written, nothing pruned
    assert entries() == ["a"] and entry.is_dir()
    os.utime(a, ns=(0, 0))  # the file changed: a new entry replaces the unreachable one
    _, again, _, _ = load_weights(a, progress=False)
    assert entries() == ["a"] and not entry.exists()
    assert all(torch.equal(first[k], again[k]) for k in first)
    load_weights(b, progress=False)
    assert entries() == ["a", "b"]
    a.unlink()  # gone: pruned at the next conversion; b's and the foreign entry stay
    load_weights(c, progress=False)
    assert entries() == ["b", "c"] and (foreign / "done").is_file()


def test_gguf_rope_freqs_not_llama3_refused(models, tmp_path):
    from megatron_spd.convert.gguf import load_gguf
    from megatron_spd.convert.hf import ConversionError

    d, model = models["llama3"]
    bad = hf_llama3_divisors(model)
    bad[4] *= 1.5  # a smooth-band entry other low/high frequency factors would give
    write_gguf("llama3", d, tmp_path / "bad.gguf", rope_freqs=bad)
    with pytest.raises(ConversionError, match="rope_freqs.weight is not Llama-3 RoPE scaling"):
        load_gguf(tmp_path / "bad.gguf")
