"""Converters: HF <-> megatron-core (bit-exact, through a real dist checkpoint at TP=2) and
GGUF -> megatron-core for SmolLM2-135M, checked against HF transformers' LlamaForCausalLM
built from a config and the same weights (test-only reference; nothing is downloaded).

Tolerances (fp32): tiny random models |dlogits| <= 1e-5 + 1e-5*|ref|; SmolLM2 logits
|d| <= 2e-4 + 1e-5*|ref| (30 blocks, logits up to ~30, different matmul/softmax orders);
per-token NLL |d| <= 1e-4; perplexity relative difference <= 1e-4.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_spd.convert.gguf import unpermute_rope_rows
from megatron_spd.convert.hf import (ConversionError, full_to_hf, hf_to_full, load_hf,
                                     model_config_from_hf)
from megatron_spd.testing import run_ranks

ATOL, RTOL = 1e-5, 1e-5
ROOT = Path(__file__).resolve().parents[1]


# ----- helpers -------------------------------------------------------------------------------

def hf_reference(hf_cfg: dict, hf_sd: dict):
    """HF transformers' LlamaForCausalLM with exactly these tensors (eager attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",
                                                                      "model_type")})
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def write_random_hf_dir(path, *, tied: bool, bias: bool, heads: int, kv: int, seed: int,
                        dtype=torch.float32) -> dict:
    """A random LLaMA checkpoint as HF writes it: config.json (LlamaConfig), model.safetensors,
    tokenizer.json + tokenizer_config.json. Returns the stored tensors."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-6,
                      attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        noise = 0.3 * torch.randn(v.shape) if v.dim() == 1 else 0.0  # norms away from 1, biases from 0
        sd[k] = (v + noise).to(dtype).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    return sd


# ----- pure re-layout -------------------------------------------------------------------------

def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert_hf_to_gguf.py permute (written here from its source) is undone."""
    def llama_cpp_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]) \
            .swapaxes(1, 2).reshape(w.shape)

    rng = np.random.default_rng(0)
    for shape, n_head in (((9 * 64, 576), 9), ((3 * 64, 576), 3), ((4 * 8,), 4)):
        w = rng.standard_normal(shape).astype(np.float32)
        back = unpermute_rope_rows(llama_cpp_permute(w, n_head), n_head)
        assert np.array_equal(back, w)
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_hf_layout_round_trip_bf16_and_errors(tmp_path):
    """bf16 HF tensors -> fp32 full -> bf16 HF is bit-exact; mismatches give clear errors."""
    sd = write_random_hf_dir(tmp_path / "m", tied=True, bias=False, heads=6, kv=3, seed=3,
                             dtype=torch.bfloat16)
    cfg, full = load_hf(tmp_path / "m")
    assert cfg.tie_word_embeddings and cfg.num_query_groups == 3 and cfg.rope_theta == 50000.0
    assert all(v.dtype == torch.float32 for v in full.values())
    back = {k: v.to(torch.bfloat16) for k, v in full_to_hf(full, cfg).items()}
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    hf_cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ConversionError, match="not used by a 1-layer"):
        hf_to_full(sd, model_config_from_hf({**hf_cfg, "num_hidden_layers": 1}))
    with pytest.raises(ConversionError, match="config does not match the weights"):
        hf_to_full(sd, model_config_from_hf({**hf_cfg, "intermediate_size": 80}))
    with pytest.raises(ConversionError, match="lm_head.weight.*missing"):
        hf_to_full(sd, model_config_from_hf({**hf_cfg, "tie_word_embeddings": False}))
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert model_config_from_hf({**hf_cfg, "rope_scaling": llama3}).rope_scaling_factor == 8.0
    _refusals(hf_cfg, llama3)
    (tmp_path / "m" / "model.safetensors").write_bytes(
        (tmp_path / "m" / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ConversionError, match="corrupt or truncated"):
        load_hf(tmp_path / "m")


def _refusals(hf_cfg: dict, llama3: dict) -> None:
    """What megatron-core cannot express is refused, naming the config field."""
    cases = [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type 'yarn'"),
        ({"rope_parameters": {**llama3, "rope_theta": 5e5, "low_freq_factor": 2.0}},
         "rope_parameters.low_freq_factor is 2.0 but megatron-core"),
        ({"rope_scaling": {**llama3, "original_max_position_embeddings": 4096}},
         "rope_scaling.original_max_position_embeddings is 4096"),
        ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True but mlp_bias has none"),
        ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=True but the MLP"),
        ({"model_type": "gemma"}, "model_type 'gemma'.*supported: llama"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]
    for change, message in cases:
        with pytest.raises(ConversionError, match=message):
            model_config_from_hf({**hf_cfg, **change})
    # export: a combination no HF architecture has
    from megatron_spd.core.config import ModelConfig
    from megatron_spd.convert.hf import hf_config_from_model_config

    odd = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=96, qk_layernorm=True, add_qkv_bias=True)
    with pytest.raises(ConversionError, match="no Hugging Face architecture"):
        hf_config_from_model_config(odd)


# ----- HF -> mcore (TP=2, dist checkpoint) -> HF ----------------------------------------------

def _open_save_logits(hf_dirs, ckpt_dirs, tokens):
    """On each of 2 TP ranks: open HF dirs at TP=2, logits, save as megatron-spd checkpoints."""
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.core.sharding import forward_logits

    out = []
    for hf_dir, ckpt in zip(hf_dirs, ckpt_dirs):
        lm = open_model(hf_dir)
        with torch.no_grad():
            out.append(forward_logits(lm.model, tokens))
        save_checkpoint(lm.model, ckpt, config=lm.config, plan=lm.plan, tokenizer=lm.tokenizer)
    return out


def test_hf_mcore_hf_round_trip_bit_exact_and_logits(tmp_path):
    from safetensors.torch import load_file

    from megatron_spd.loading.convert import to_hf
    from megatron_spd.data.tokenizer import load_tokenizer

    variants = {"untied_bias_gqa": dict(tied=False, bias=True, heads=4, kv=2, seed=1),
                "tied_mha": dict(tied=True, bias=False, heads=4, kv=4, seed=2)}
    hf_dirs = [tmp_path / f"hf_{n}" for n in variants]
    ckpts = [tmp_path / f"mc_{n}" for n in variants]
    sds = [write_random_hf_dir(d, **kw) for d, kw in zip(hf_dirs, variants.values())]
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    rank_logits = run_ranks(_open_save_logits, 2, [str(d) for d in hf_dirs],
                            [str(c) for c in ckpts], tokens)
    for i, name in enumerate(variants):
        assert torch.equal(rank_logits[0][i], rank_logits[1][i])
        out = tmp_path / f"back_{name}"
        if i == 0:  # once through the command-line tool, as a user runs it
            summary = tmp_path / "summary.json"
            subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"),
                            "--mcore", str(ckpts[i]), "--to", "hf", "--out", str(out),
                            "--json", str(summary)], check=True, cwd=ROOT)
            s = json.loads(summary.read_text())
            assert (s["layers"], s["heads"], s["kv_heads"], s["G"]) == (2, 4, 2, 2)
        else:
            to_hf(str(ckpts[i]), out)
        back = load_file(str(out / "model.safetensors"))
        assert set(back) == set(sds[i]), name
        assert all(torch.equal(back[k], sds[i][k]) for k in sds[i]), name
        src_cfg = json.loads((hf_dirs[i] / "config.json").read_text())
        out_cfg = json.loads((out / "config.json").read_text())
        assert model_config_from_hf(out_cfg) == model_config_from_hf(src_cfg)
        t_src, t_out = load_tokenizer(hf_dirs[i]), load_tokenizer(out)
        assert t_src.add_bos and t_out.add_bos and t_out.bos_id == t_src.bos_id == 1
        assert t_out.encode("w5 w7 zz") == t_src.encode("w5 w7 zz") == [1, 5, 7, 0]
        ref = hf_logits(hf_reference(src_cfg, sds[i]), tokens)
        torch.testing.assert_close(rank_logits[0][i], ref, atol=ATOL, rtol=RTOL)


# ----- SmolLM2-135M from GGUF --------------------------------------------------------------------

# 4 windows (2048 tokens) are enough for the per-token agreement with HF; their perplexity
# (measured 22.5; 20.4 over 8 windows) is inside the sanity range below.
N_WINDOWS, CTX = 4, 512


def _smollm2_logits_and_nll(short, windows):
    """Logits of ``short`` and per-token NLL of ``windows`` at the current TP (default model)."""
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.core.sharding import forward_logits

    lm = open_model(None)
    with torch.no_grad():
        logits = forward_logits(lm.model, short)
        nll = []
        for w in windows:  # one window at a time keeps peak memory low
            lg = forward_logits(lm.model, w[None])[0]
            nll.append(torch.nn.functional.cross_entropy(lg[:-1], w[1:], reduction="none"))
    return logits, torch.stack(nll) if nll else None


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_gguf_matches_hf_reference_tp1_tp3():
    from megatron_spd.loading.sources import load_weights
    from megatron_spd.convert.hf import hf_config_from_model_config
    from megatron_spd.data.texts import load_texts, token_stream

    cfg, full, tok, plan = load_weights(None)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.ffn_hidden_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_word_embeddings and "output_layer.weight" not in full
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5 and plan.groups == 3
    windows = token_stream(tok, load_texts(split="eval"), N_WINDOWS * CTX).view(N_WINDOWS, CTX)
    short = windows[:1, :64]

    tp1 = run_ranks(_smollm2_logits_and_nll, 1, short, windows[:0])[0]
    tp3 = run_ranks(_smollm2_logits_and_nll, 3, short, windows)
    ref_model = hf_reference(hf_config_from_model_config(cfg), full_to_hf(full, cfg))
    del full
    ref_short = hf_logits(ref_model, short)
    ref_nll = torch.stack([torch.nn.functional.cross_entropy(
        hf_logits(ref_model, w[None])[0, :-1], w[1:], reduction="none") for w in windows])

    d1 = (tp1[0] - ref_short).abs().max().item()
    d3 = (tp3[0][0] - ref_short).abs().max().item()
    d13 = (tp3[0][0] - tp1[0]).abs().max().item()
    ppl, ref_ppl = tp3[0][1].mean().exp().item(), ref_nll.mean().exp().item()
    print(f"\nSmolLM2 max|dlogits| vs HF: TP=1 {d1:.2e}, TP=3 {d3:.2e}; TP=3 vs TP=1 {d13:.2e}; "
          f"ppl@{CTX} over {N_WINDOWS * CTX} tokens: TP=3 {ppl:.3f}, HF {ref_ppl:.3f}, "
          f"max|dNLL| {(tp3[0][1] - ref_nll).abs().max().item():.2e}")
    torch.testing.assert_close(tp1[0], ref_short, atol=2e-4, rtol=1e-5)
    for r in range(3):
        torch.testing.assert_close(tp3[r][0], ref_short, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(tp3[0][1], ref_nll, atol=1e-4, rtol=0)
    assert abs(ppl - ref_ppl) / ref_ppl < 1e-4
    assert 15 < ppl < 25, f"perplexity {ppl:.1f}: the q/k layout or the tokenizer is wrong"
