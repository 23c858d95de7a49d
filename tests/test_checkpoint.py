"""megatron-spd checkpoints: resharding between TP degrees with an SPD plan inside, the plan's
TP check, atomic saves and clear errors for damaged checkpoints.

A tiny random LLaMA (6 heads, 3 KV heads, G=3, blocks 1-2 SPD) keeps it fast. Logits of the same
weights at TP=1 and TP=3 agree to |d| <= 1e-5 + 1e-5*|ref| (fp32); weights read back from any
checkpoint are bit-identical to what was saved.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_spd.config import ModelConfig
from megatron_spd.plan import PlanError, SPDPlan
from megatron_spd.testing import run_ranks
from tests.reference import random_full_state_dict

CFG = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=3,
                  ffn_hidden_size=96, vocab_size=96, max_seq_length=64, rope_theta=10000.0)
PLAN = SPDPlan.from_spd_blocks(3, 3, [1, 2], "zs")
TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
ORIGIN = "/models/the-dense-original"  # what a recovered (B2B/HG/fine-tuned) checkpoint records


def write_tokenizer(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    return str(path / "tokenizer.json")


def _logits(model):
    from megatron_spd.model import forward_logits

    with torch.no_grad():
        return forward_logits(model, TOKENS)


def _reinit(tp: int) -> None:
    """Same processes, another TP degree (saves a spawn of ~5 s per rank group)."""
    from megatron.core import parallel_state

    from megatron_spd import distributed

    parallel_state.destroy_model_parallel()
    distributed.init(tp)


def _reshard_and_atomic(full, tok_path, tmp):
    """world 3: save at TP=3 -> load at TP=1 -> save at TP=1 -> load at TP=3, plus a failed
    save over an existing checkpoint and a config/weights mismatch."""
    from megatron_spd import checkpoint
    from megatron_spd.checkpoint import CheckpointError, open_model, save_checkpoint
    from megatron_spd.model import load_full_state_dict
    from megatron_spd.spec import build_model
    from megatron_spd.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    out = {}
    model = build_model(CFG, PLAN)
    load_full_state_dict(model, full)
    out["tp3_built"] = _logits(model)
    save_checkpoint(model, f"{tmp}/ck3", config=CFG, plan=PLAN, tokenizer=tok)

    _reinit(1)
    lm = open_model(f"{tmp}/ck3")
    out["plan_at_tp1"] = lm.plan.to_dict()
    out["tp1_from_tp3"] = _logits(lm.model)
    save_checkpoint(lm.model, f"{tmp}/ck1", config=lm.config, plan=lm.plan, tokenizer=lm.tokenizer,
                    dense_source=ORIGIN)

    # a save that dies half-way leaves the old checkpoint as it was
    real_save = checkpoint._write_weights
    def dying_save(sharded, directory):
        real_save(sharded, directory)
        raise KeyboardInterrupt("killed during save")
    checkpoint._write_weights = dying_save
    try:
        save_checkpoint(lm.model, f"{tmp}/ck1", config=lm.config, plan=PLAN, tokenizer=tok)
    except KeyboardInterrupt:
        out["killed"] = True
    finally:
        checkpoint._write_weights = real_save
    out["tp1_after_kill"] = _logits(open_model(f"{tmp}/ck1").model)

    # a checkpoint whose config does not match its weights
    from megatron_spd.distributed import barrier, is_rank0
    if is_rank0():
        shutil.copytree(f"{tmp}/ck1", f"{tmp}/bad")
        meta = json.loads(open(f"{tmp}/bad/spd_checkpoint.json").read())
        meta["model_config"]["ffn_hidden_size"] = 120
        open(f"{tmp}/bad/spd_checkpoint.json", "w").write(json.dumps(meta))
    barrier()
    try:
        open_model(f"{tmp}/bad")
    except CheckpointError as e:
        out["mismatch"] = str(e)

    _reinit(3)
    lm = open_model(f"{tmp}/ck1")
    out["tp3_from_tp1"], out["ck1_dense_source"] = _logits(lm.model), lm.dense_source
    return out


def _open_at_tp2(ckpt):
    from megatron_spd.checkpoint import open_model

    try:
        open_model(ckpt)
    except PlanError as e:
        return str(e)
    return None


def test_reshard_plan_check_and_atomic_save(tmp_path):
    from megatron_spd.checkpoint import CheckpointError, load_weights, read_meta
    from megatron_spd.tokenizer import TokenizerError

    full = random_full_state_dict(CFG, seed=5)
    tok_path = write_tokenizer(tmp_path / "tok")
    res = run_ranks(_reshard_and_atomic, 3, full, tok_path, str(tmp_path))
    ref = res[0]["tp3_built"]
    for r in range(3):
        for key in ("tp3_built", "tp1_from_tp3", "tp1_after_kill", "tp3_from_tp1"):
            torch.testing.assert_close(res[r][key], ref, atol=1e-5, rtol=1e-5)
    print(f"\nmax|dlogits| TP=3 save -> TP=1 load {(res[0]['tp1_from_tp3'] - ref).abs().max():.2e}"
          f", TP=1 save -> TP=3 load {(res[0]['tp3_from_tp1'] - ref).abs().max():.2e}")
    assert res[0]["plan_at_tp1"] == PLAN.to_dict()
    assert res[0]["killed"] and not (tmp_path / ".ck1.saving" / "spd_checkpoint.json").exists()
    assert "config does not match the weights" in res[0]["mismatch"]

    # weights read back without a model are bit-identical, from either TP
    for name in ("ck3", "ck1"):
        cfg, back, tok, plan = load_weights(tmp_path / name)
        assert cfg == CFG and plan.to_dict() == PLAN.to_dict() and tok.bos_id == 1
        assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    assert read_meta(tmp_path / "ck3")["saved_tp"] == 3

    # the dense origin: recorded by recovered checkpoints, else the source itself
    from megatron_spd.checkpoint import dense_origin, source_kind

    assert res[0]["ck1_dense_source"] == ORIGIN == dense_origin(tmp_path / "ck1")
    assert dense_origin(tmp_path / "ck3") == str((tmp_path / "ck3").absolute())
    assert "dense_source" not in read_meta(tmp_path / "ck3")
    assert dense_origin(None) == "default" == source_kind("default")

    # a G=3 SPD checkpoint refuses TP=2 with a message naming the allowed TPs
    msg = run_ranks(_open_at_tp2, 2, str(tmp_path / "ck3"))[0]
    assert msg is not None and "TP=2 does not divide G=3" in msg and "[1, 3]" in msg

    # damaged checkpoints
    bad = tmp_path / "bad"
    with pytest.raises(CheckpointError, match="does not match"):
        load_weights(bad)
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "ck3", bad)
    shard = sorted((bad / "weights").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(bad)
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "ck3", bad)
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer file .* is missing"):
        load_weights(bad)
    (bad / "spd_checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(bad)
    (bad / "spd_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_weights(bad)
