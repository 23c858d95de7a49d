"""Checkpoints: the Megatron-LM layout with the plan inline in the args, written and read back at
TP 1 and 3; resharding; Megatron-LM's own checkpoints (iter_*, optimizer tensors, no tokenizer);
format-1 checkpoints; atomic saves; never replacing a user's files; checksums.

A tiny random LLaMA (6 heads, 3 KV heads, G=3, blocks 1-2 SPD) keeps it fast. Logits of the same
weights at TP=1 and TP=3 agree to |d| <= 1e-5 + 1e-5*|ref| (fp32); weights read back from any
checkpoint are bit-identical to what was saved.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import PlanError, SPDPlan
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
    from megatron_spd.core.sharding import forward_logits

    with torch.no_grad():
        return forward_logits(model, TOKENS)


def _reinit(tp: int) -> None:
    """Same processes, another TP degree (saves a spawn of ~5 s per rank group)."""
    from megatron.core import parallel_state

    from megatron_spd.parallel import distributed

    parallel_state.destroy_model_parallel()
    distributed.init(tp)


def save_like_megatron_lm(model, directory, args, iteration: int) -> None:
    """What Megatron-LM's save_checkpoint writes for torch_dist (checkpointing.py,
    core_v0.16.1): {model, optimizer, rng_state, opt_param_scheduler, args, iteration,
    checkpoint_version} through megatron's default save strategy into iter_%07d, then the
    tracker. The optimizer entries mirror every weight (Adam's exp_avg) and the RNG state is a
    per-rank sharded object, so a reader must ignore them."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_spd.parallel.distributed import barrier, is_rank0

    sd = model.sharded_state_dict()
    optim = {f"exp_avg.{k}": dataclasses.replace(v, key=f"optimizer.state.exp_avg.{v.key}",
                                                 data=torch.full_like(v.data, 7.0))
             for k, v in sd.items() if isinstance(v, ShardedTensor)}
    it_dir = directory / f"iter_{iteration:07d}"
    if is_rank0():
        it_dir.mkdir(parents=True)
    barrier()
    tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_tensor_model_parallel_rank())
    rng = ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (1, tp),
                        (0, tp_rank), replica_id=parallel_state.get_data_parallel_rank())
    dist_checkpointing.save({"model": sd, "optimizer": optim, "rng_state": rng, "args": args,
                             "opt_param_scheduler": {"max_lr": 3e-4}, "iteration": iteration,
                             "checkpoint_version": 3.0}, str(it_dir))
    if is_rank0():
        (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    barrier()


def _reshard_and_atomic(full, tok_path, tmp):
    """world 3: save at TP=3 -> load at TP=1 -> save at TP=1 -> load at TP=3; a Megatron-LM
    iter_* checkpoint with optimizer tensors saved at TP=3 -> TP=1; a killed save; refusals."""
    from pathlib import Path

    from megatron_spd.checkpoint import save as checkpoint
    from megatron_spd.checkpoint.layout import CheckpointError
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.checkpoint.args import args_from_config
    from megatron_spd.parallel.distributed import barrier, is_rank0
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.data.tokenizer import load_tokenizer

    tmp = Path(tmp)
    tok = load_tokenizer(tok_path)
    out = {}
    model = build_model(CFG, PLAN)
    load_full_state_dict(model, full)
    out["tp3_built"] = _logits(model)
    save_checkpoint(model, tmp / "ck3", config=CFG, plan=PLAN, tokenizer=tok)
    # Megatron-LM's own layout (no spd_checkpoint.json, no tokenizer, optimizer state)
    mlm_args = args_from_config(CFG, PLAN, tp=3)
    mlm_args.no_save_optim, mlm_args.lr = None, 3e-4  # what a training run records
    save_like_megatron_lm(model, tmp / "mlm", mlm_args, iteration=20)

    _reinit(1)
    lm = open_model(tmp / "ck3")
    out["plan_at_tp1"] = lm.plan.to_dict()
    out["tp1_from_tp3"] = _logits(lm.model)
    out["tp1_from_mlm"] = _logits(open_model(tmp / "mlm", tokenizer=tok_path).model)
    out["tp1_from_mlm_iter"] = _logits(open_model(tmp / "mlm" / "iter_0000020",
                                                  tokenizer=tok_path).model)
    save_checkpoint(lm.model, tmp / "ck1", config=lm.config, plan=lm.plan, tokenizer=lm.tokenizer,
                    dense_source=ORIGIN)

    # replacing one of ours needs overwrite=True; a killed save leaves the old one as it was
    try:
        save_checkpoint(lm.model, tmp / "ck1", config=lm.config, plan=PLAN, tokenizer=tok)
    except CheckpointError as e:
        out["no_overwrite"] = str(e)
    real_save = checkpoint._write_weights

    def dying_save(state, directory):
        real_save(state, directory)
        raise KeyboardInterrupt("killed during save")
    checkpoint._write_weights = dying_save
    try:
        save_checkpoint(lm.model, tmp / "ck1", config=lm.config, plan=PLAN, tokenizer=tok,
                        overwrite=True)
    except KeyboardInterrupt:
        out["killed"] = True
    finally:
        checkpoint._write_weights = real_save
    out["tp1_after_kill"] = _logits(open_model(tmp / "ck1").model)

    # args that do not match the weights
    if is_rank0():
        shutil.copytree(tmp / "ck1", tmp / "bad")
        common = torch.load(tmp / "bad/release/common.pt", weights_only=False)
        common["args"].ffn_hidden_size = 120
        torch.save(common, tmp / "bad/release/common.pt")
        (tmp / "bad/spd_checkpoint.json").unlink()  # its manifest would (rightly) refuse first
    barrier()
    try:
        open_model(tmp / "bad", tokenizer=tok_path)
    except CheckpointError as e:
        out["mismatch"] = str(e)

    _reinit(3)
    lm = open_model(tmp / "ck1")
    out["tp3_from_tp1"], out["ck1_dense_source"] = _logits(lm.model), lm.dense_source
    return out


def _open_at_tp2(ckpt):
    from megatron_spd.loading.open_model import open_model

    try:
        open_model(ckpt)
    except PlanError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    full = random_full_state_dict(CFG, seed=5)
    tok_path = write_tokenizer(tmp / "tok")
    res = run_ranks(_reshard_and_atomic, 3, full, tok_path, str(tmp))
    return tmp, full, tok_path, res


def test_reshard_megatron_lm_layout_and_atomic_save(saved):
    from megatron_spd.checkpoint.layout import CheckpointError
    from megatron_spd.checkpoint.read import read_checkpoint
    from megatron_spd.loading.sources import dense_origin, load_weights, source_kind

    tmp, full, _, res = saved
    ref = res[0]["tp3_built"]
    keys = ("tp3_built", "tp1_from_tp3", "tp1_from_mlm", "tp1_from_mlm_iter", "tp1_after_kill",
            "tp3_from_tp1")
    for r in range(3):
        for key in keys:
            torch.testing.assert_close(res[r][key], ref, atol=1e-5, rtol=1e-5)
    print(f"\nmax|dlogits| TP=3 save -> TP=1 load {(res[0]['tp1_from_tp3'] - ref).abs().max():.2e}"
          f", TP=1 save -> TP=3 load {(res[0]['tp3_from_tp1'] - ref).abs().max():.2e}, "
          f"Megatron-LM TP=3 -> TP=1 {(res[0]['tp1_from_mlm'] - ref).abs().max():.2e}")
    assert res[0]["plan_at_tp1"] == PLAN.to_dict()
    assert "already holds a megatron-spd checkpoint" in res[0]["no_overwrite"]
    assert "--overwrite" in res[0]["no_overwrite"]
    assert res[0]["killed"] and not (tmp / ".ck1.saving" / "spd_checkpoint.json").exists()
    assert "could not be loaded" in res[0]["mismatch"] and "\n" not in res[0]["mismatch"]

    # the Megatron-LM layout, its args and our metadata, at TP 3 and 1
    for name, tp in (("ck3", 3), ("ck1", 1)):
        ck = tmp / name
        assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
        common = torch.load(ck / "release" / "common.pt", weights_only=False)
        assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
        args = common["args"]
        assert (args.num_layers, args.hidden_size, args.num_attention_heads,
                args.num_query_groups, args.group_query_attention, args.ffn_hidden_size,
                args.kv_channels, args.padded_vocab_size, args.max_position_embeddings,
                args.normalization, args.swiglu, args.position_embedding_type, args.rotary_base,
                args.untie_embeddings_and_output_weights, args.add_bias_linear,
                args.tensor_model_parallel_size, args.ckpt_format) == \
            (3, 48, 6, 3, True, 96, 8, 96, 64, "RMSNorm", True, "rope", 10000.0, True, False,
             tp, "torch_dist")
        assert json.loads(args.spd_plan_json) == PLAN.to_dict()
        assert args.tokenizer_type == "HuggingFaceTokenizer"
        stored = read_checkpoint(ck)
        assert stored.config == CFG and stored.plan.to_dict() == PLAN.to_dict()
        assert stored.saved_tp == tp and stored.layout == "megatron-lm"
        # weights read back without a model are bit-identical, from either TP
        cfg, back, tok, plan = load_weights(ck)
        assert cfg == CFG and plan.to_dict() == PLAN.to_dict() and tok.bos_id == 1
        assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)

    # Megatron-LM's checkpoint: optimizer tensors ignored, tokenizer must be given
    mlm = read_checkpoint(tmp / "mlm")
    assert mlm.weights.name == "iter_0000020" and mlm.plan.to_dict() == PLAN.to_dict()
    _, back, _, _ = load_weights(tmp / "mlm", tokenizer=tmp / "tok" / "tokenizer.json")
    assert all(torch.equal(back[k], full[k]) for k in full)
    with pytest.raises(Exception, match="carries no tokenizer.*--tokenizer"):
        load_weights(tmp / "mlm")

    # the dense origin: recorded by recovered checkpoints, else the source itself
    assert res[0]["ck1_dense_source"] == ORIGIN == dense_origin(tmp / "ck1")
    assert dense_origin(tmp / "ck3") == str((tmp / "ck3").absolute())
    assert dense_origin(None) == "default" == source_kind("default")
    assert source_kind(tmp / "mlm") == source_kind(tmp / "ck3" / "release") == "mcore"
    with pytest.raises(CheckpointError, match="not a checkpoint|neither"):
        source_kind(tmp / "tok")

    # a G=3 SPD checkpoint refuses TP=2 with a message naming the allowed TPs
    msg = run_ranks(_open_at_tp2, 2, str(tmp / "ck3"))[0]
    assert msg is not None and "TP=2 does not divide G=3" in msg and "[1, 3]" in msg


def test_damaged_checkpoints_give_clear_errors(saved):
    from megatron_spd.checkpoint.layout import CheckpointError
    from megatron_spd.checkpoint.read import read_checkpoint
    from megatron_spd.loading.sources import load_weights
    from megatron_spd.data.tokenizer import TokenizerError

    tmp = saved[0]
    bad = tmp / "damaged"

    def fresh():
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(tmp / "ck3", bad)
        return sorted((bad / "release").glob("*.distcp"))[0]

    shard = fresh()  # bytes flipped inside a shard, size unchanged: only the checksum sees it
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp does not match the sha256.*"
                                              r"--no-verify"):
        load_weights(bad)
    read_checkpoint(bad, verify=False)  # the opt-out skips the checksum (sizes still checked)
    shard = fresh()
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(bad, verify=False)
    fresh()
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer file .* is missing"):
        load_weights(bad)
    (bad / "spd_checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(bad)
    fresh()
    (bad / "latest_checkpointed_iteration.txt").write_text("12")
    with pytest.raises(CheckpointError, match="points to iter_0000012/, which is missing"):
        load_weights(bad)
    shutil.rmtree(bad)


def test_output_dir_check_never_replaces_user_files(saved, tmp_path):
    from megatron_spd.checkpoint.layout import CheckpointError
    from megatron_spd.checkpoint.save import check_output_dir

    check_output_dir(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is an existing file"):
        check_output_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(CheckpointError, match=r"not a megatron-spd checkpoint \(it holds "
                                              r"thesis.tex\)"):
        check_output_dir(tmp_path / "mine", overwrite=True)
    with pytest.raises(CheckpointError, match="--overwrite"):
        check_output_dir(saved[0] / "ck3")
    check_output_dir(saved[0] / "ck3", overwrite=True)
    # a Megatron-LM checkpoint is not ours to replace either
    with pytest.raises(CheckpointError, match="not a megatron-spd checkpoint"):
        check_output_dir(saved[0] / "mlm", overwrite=True)


def test_format_1_checkpoints_still_load(saved, tmp_path):
    """spd_checkpoint.json (config + plan) beside weights/ with an empty common.pt."""
    from megatron_spd.checkpoint.read import read_checkpoint
    from megatron_spd.loading.sources import load_weights

    tmp, full, _, _ = saved
    old = tmp_path / "v1"
    old.mkdir()
    shutil.copytree(tmp / "ck3" / "release", old / "weights")
    torch.save({}, old / "weights" / "common.pt")
    shutil.copytree(tmp / "ck3" / "tokenizer", old / "tokenizer")
    meta = json.loads((tmp / "ck3" / "spd_checkpoint.json").read_text())
    files = {str(p.relative_to(old)): p.stat().st_size for p in old.rglob("*") if p.is_file()}
    (old / "spd_checkpoint.json").write_text(json.dumps({
        "format": "megatron-spd-checkpoint/1", "model_config": CFG.to_dict(),
        "plan": PLAN.to_dict(), "tokenizer": meta["tokenizer"], "saved_tp": 3, "files": files}))
    assert read_checkpoint(old).layout == "legacy"
    cfg, back, _, plan = load_weights(old)
    assert cfg == CFG and plan.to_dict() == PLAN.to_dict()
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_every_model_config_field_maps_to_megatron_lm_args():
    from megatron_spd.checkpoint.args import args_from_config, config_from_args, \
        unmapped_config_fields

    assert unmapped_config_fields() == []
    for cfg in (CFG, dataclasses.replace(CFG, normalization="LayerNorm", activation="gelu",
                                         add_bias_linear=True, tie_word_embeddings=True,
                                         position_embedding_type="learned_absolute",
                                         num_query_groups=6, norm_eps=1e-6, rope_theta=5e5),
                dataclasses.replace(CFG, kv_channels=24, qk_layernorm=True, rope_scaling=True,
                                    rope_scaling_factor=32.0),
                dataclasses.replace(CFG, add_qkv_bias=True, max_seq_length=16,
                                    sliding_window=16)):
        assert config_from_args(args_from_config(cfg, None, tp=1), "x") == cfg
    args = args_from_config(CFG, None, tp=1)
    args.rotary_interleaved, args.num_experts = True, 8
    with pytest.raises(ValueError, match="MoE.*; interleaved rotary"):
        config_from_args(args, "ckpt")


# ----- a save killed with SIGKILL ----------------------------------------------------------------

def save_in_subprocess(out: str, tok_path: str, marker: str = "", strategy: str = "ours",
                       tiny: bool = False) -> None:
    """Run in a fresh interpreter: save a small (``tiny``: CFG) dense model to ``out``. With
    ``marker``, announce the start of the weight write there and never finish the save (the
    test kills this process, during or after the write, always before the swap)."""
    import os
    import time
    from pathlib import Path

    from megatron_spd.checkpoint import save as checkpoint
    from megatron_spd.parallel import distributed
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.data.tokenizer import load_tokenizer

    distributed.init(1)
    cfg = CFG if tiny else dataclasses.replace(CFG, hidden_size=384, ffn_hidden_size=1536,
                                               num_layers=6)
    dense = SPDPlan.dense(cfg.num_layers, 3)
    model = build_model(cfg, dense)
    load_full_state_dict(model, random_full_state_dict(cfg, seed=1))
    if strategy == "megatron":  # only to show the test catches megatron's forking writer
        checkpoint._in_process_strategy = lambda: None
    real = checkpoint._write_weights

    def announced(state, directory):
        Path(marker).write_text(str(os.getpid()))
        real(state, directory)
        time.sleep(3600)  # a save that finished within the test's watch would leave nothing
    if marker:
        checkpoint._write_weights = announced
    checkpoint.save_checkpoint(model, out, config=cfg, plan=dense,
                               tokenizer=load_tokenizer(tok_path), overwrite=True)


def _descendants(pid: int) -> set[int]:
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_a_save(tmp_path, tok_path: str, strategy: str = "ours") -> set[int]:
    """SIGKILL the saving process while it writes weights; the descendants it had then that
    are still alive a moment later."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "saving.pid"
    code = ("import sys; sys.path.insert(0, '.'); from tests.test_checkpoint import "
            f"save_in_subprocess as s; s({str(tmp_path / 'out')!r}, {tok_path!r}, "
            f"{str(marker)!r}, {strategy!r})")
    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    seen: set[int] = set()
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the save never started"
            time.sleep(0.05)
        for _ in range(20):  # watch the write for a moment, remembering every descendant
            seen |= _descendants(proc.pid)
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)
    return {p for p in seen if _alive(p)}


@pytest.mark.slow
def test_killed_save_leaves_no_process_and_the_next_save_cleans_up(tmp_path, capfd):
    """kill -9 during the weight write: no process it started survives, a stale .out.saving
    is left, and the next save removes it with a message and succeeds."""
    import subprocess
    import sys

    from megatron_spd.checkpoint.read import read_checkpoint
    from tests.conftest import ROOT

    tok_path = write_tokenizer(tmp_path / "tok")
    survivors = kill_a_save(tmp_path, tok_path)
    assert survivors == set(), f"processes of the killed save still run: {survivors}"
    assert (tmp_path / ".out.saving").is_dir()
    code = ("import logging, sys; sys.path.insert(0, '.'); "
            "logging.basicConfig(level=logging.INFO); from tests.test_checkpoint import "
            f"save_in_subprocess as s; s({str(tmp_path / 'out')!r}, {tok_path!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removing {tmp_path / '.out.saving'}, left by an interrupted save" in r.stderr
    assert not (tmp_path / ".out.saving").exists()
    assert read_checkpoint(tmp_path / "out").config.num_layers == 6


# ----- the plan inline survives every tool that writes a checkpoint ------------------------------

@pytest.mark.slow
def test_plan_inline_survives_every_tool(tmp_path):
    """convert, spd.py headgroup, spd.py distill and finetune each write a Megatron-LM-layout
    checkpoint whose args carry the plan they were given (one process each, tiny model)."""
    import subprocess
    import sys

    from megatron_spd.checkpoint.read import read_args
    from megatron_spd.checkpoint.args import plan_from_args
    from tests.conftest import ROOT
    from tests.tiny import write_bigram_corpus

    plan = SPDPlan(3, ["hg", "b2b", "zs"])
    plan.save(tmp_path / "plan.json")
    code = ("import sys; sys.path.insert(0, '.'); from tests.test_checkpoint import "
            f"save_in_subprocess as s; s({str(tmp_path / 'src')!r}, "
            f"{write_tokenizer(tmp_path / 'tok')!r}, tiny=True)")
    write_bigram_corpus(tmp_path / "corpus.txt")

    def run(*argv):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    run("-c", code)  # a dense source checkpoint
    calib = ["--calib", str(tmp_path / "corpus.txt"), "--samples", "2", "--seq-len", "16",
             "--micro-batch", "1"]
    outs = {"convert": ["tools/convert_checkpoint.py", "--mcore", str(tmp_path / "src")],
            "headgroup": ["tools/spd.py", "headgroup", "--ckpt", str(tmp_path / "src"), *calib],
            "distill": ["tools/spd.py", "distill", "--ckpt", str(tmp_path / "src"), *calib,
                        "--epochs", "1"]}
    for name, argv in outs.items():
        run(*argv, "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / name))
    run("tools/finetune.py", "--ckpt", str(tmp_path / "distill"), "--out",
        str(tmp_path / "finetune"), "--steps", "1", "--seq-len", "16", "--micro-batch", "1",
        "--data", str(tmp_path / "corpus.txt"), "--eval-samples", "2", "--distill", "0")
    for name in (*outs, "finetune"):
        stored = plan_from_args(read_args(tmp_path / name), name)
        assert stored.strategies == plan.strategies and stored.groups == 3, name
