"""No silent model change across the Megatron-LM border (issue 21), without a Megatron-LM checkout.

Each case below was a silent wrong model (or a traceback) before its fix; the Megatron-LM side of
the same cases runs in tests/test_patches.py when MEGATRON_LM_DIR is set:
- the norm epsilon under Megatron-LM's own argument name (``layernorm_epsilon`` from core_v0.16.0,
  ``norm_epsilon`` before);
- ``--use-checkpoint-args`` restoring what Megatron-LM's loader does not (q/k norms, epsilon, RoPE
  scaling, the sliding window, the plan), and a run that differs from its checkpoint refused in
  one line naming the flag (instead of a torch.distributed.checkpoint traceback);
- a checkpoint with SPD blocks refused by any reader that has not imported megatron_spd (what
  unpatched Megatron-LM is), while a dense plan's checkpoint stays readable by everyone;
- the tokenizer path stored relative to the checkpoint, so a moved checkpoint keeps it;
- the docs' Megatron-LM launches set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (Megatron-LM asserts it
  at TP > 1 on GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spd.checkpoint.args import SPDPlanJSON, args_from_config, config_from_args, \
    plan_json
from megatron_spd.checkpoint.layout import CheckpointError
from megatron_spd.checkpoint.read import tokenizer_path
from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import SPDPlan
from megatron_spd.integrations.megatron_lm import check_architecture, restore_checkpoint_args

ROOT = Path(__file__).resolve().parents[1]
QWEN3_LIKE = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=64, vocab_size=96, max_seq_length=64, norm_eps=1e-6,
                         qk_layernorm=True, rope_scaling=True, rope_scaling_factor=8.0)
PLAN = SPDPlan(2, ["zs", "dense"])


def _megatron_lm_run_args(cfg: ModelConfig, **kw) -> argparse.Namespace:
    """What Megatron-LM core_v0.16.0+ parses for ``cfg``'s flags: --norm-epsilon lands in
    ``layernorm_epsilon`` (the TransformerConfig field) and there is no ``norm_epsilon``."""
    args = vars(args_from_config(cfg, None, tp=1))
    args.pop("norm_epsilon")
    return argparse.Namespace(**{**args, **kw})


def test_norm_epsilon_is_read_and_written_under_megatron_lms_own_name():
    mlm = _megatron_lm_run_args(QWEN3_LIKE)  # a checkpoint Megatron-LM 0.16+ saved
    assert config_from_args(mlm, "ck").norm_eps == 1e-6
    ours = args_from_config(QWEN3_LIKE, None, tp=1)
    assert ours.layernorm_epsilon == 1e-6  # what Megatron-LM 0.16+ builds its norms from
    assert ours.norm_epsilon == 1e-6  # and Megatron-LM <= core_v0.15's name
    old = argparse.Namespace(**{k: v for k, v in vars(ours).items() if k != "layernorm_epsilon"})
    assert config_from_args(old, "ck").norm_eps == 1e-6


def test_use_checkpoint_args_restores_every_model_field_and_a_differing_run_is_refused(tmp_path):
    ckpt = args_from_config(QWEN3_LIKE, PLAN, tp=1, tokenizer_type="HuggingFaceTokenizer",
                            tokenizer_model="tokenizer")
    # Megatron-LM's load_args_from_checkpoint restored the shape, not these (core_v0.16.1..main)
    run = _megatron_lm_run_args(dataclasses.replace(QWEN3_LIKE, qk_layernorm=False,
                                                    norm_eps=1e-5, rope_scaling=False),
                                spd_plan_json=None, tokenizer_model="tokenizer")
    with pytest.raises(CheckpointError) as e:
        check_architecture(ckpt, run, "--load ck")
    msg = str(e.value)
    assert "\n" not in msg and "--use-checkpoint-args" in msg
    for flag in ("--qk-layernorm", "--norm-epsilon", "--use-rope-scaling"):
        assert flag in msg
    (tmp_path / "tokenizer").mkdir()
    restore_checkpoint_args(run, ckpt, str(tmp_path))
    check_architecture(ckpt, run, "--load ck")  # now the same model
    assert (run.qk_layernorm, run.layernorm_epsilon, run.use_rope_scaling,
            run.rope_scaling_factor) == (True, 1e-6, True, 8.0)
    assert run.spd_plan_json == plan_json(PLAN)
    assert run.tokenizer_model == str(tmp_path.absolute() / "tokenizer")


def test_a_run_with_q_k_norms_on_a_checkpoint_without_them_is_one_line():
    ckpt = args_from_config(dataclasses.replace(QWEN3_LIKE, qk_layernorm=False), None, tp=1)
    run = _megatron_lm_run_args(QWEN3_LIKE)
    with pytest.raises(CheckpointError, match=r"^--load ck holds another model .*--qk-layernorm "
                                              r"\(checkpoint False, this run True\)[^\n]*$"):
        check_architecture(ckpt, run, "--load ck")
    # RoPE models may change their position limit; an unset vocabulary is not compared
    check_architecture(ckpt, _megatron_lm_run_args(
        dataclasses.replace(QWEN3_LIKE, qk_layernorm=False, max_seq_length=128),
        padded_vocab_size=None), "--load ck")


def _torch_load_without_megatron_spd(path: Path) -> subprocess.CompletedProcess:
    """torch.load as megatron-core reads common.pt (weights_only, megatron's safe globals), in a
    process that never imports megatron_spd: what unpatched Megatron-LM does."""
    code = ("import sys, torch, megatron.core.dist_checkpointing; "
            f"a = torch.load({str(path)!r}, map_location='cpu')['args']; "
            "assert 'megatron_spd' not in sys.modules; print(a.num_layers)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_a_checkpoint_with_spd_blocks_is_refused_where_megatron_spd_is_not_imported(tmp_path):
    import torch

    for name, plan in (("spd", PLAN), ("dense", SPDPlan(2, ["dense", "dense"]))):
        torch.save({"args": args_from_config(QWEN3_LIKE, plan, tp=1), "iteration": 0},
                   tmp_path / f"{name}.pt")
    refused = _torch_load_without_megatron_spd(tmp_path / "spd.pt")
    assert refused.returncode != 0
    assert "megatron_spd.checkpoint.args.SPDPlanJSON" in refused.stderr, refused.stderr[-2000:]
    dense = _torch_load_without_megatron_spd(tmp_path / "dense.pt")
    assert dense.returncode == 0 and dense.stdout.strip() == "2", dense.stderr[-2000:]
    # with megatron_spd imported (our tools, the patched Megatron-LM) it reads as the plain text
    back = torch.load(tmp_path / "spd.pt", map_location="cpu")["args"].spd_plan_json
    assert isinstance(back, SPDPlanJSON) and back == plan_json(PLAN)
    assert SPDPlan.from_dict(__import__("json").loads(back)).to_dict() == PLAN.to_dict()


def test_the_tokenizer_path_is_stored_relative_and_resolved_against_the_checkpoint(tmp_path):
    from megatron_spd.checkpoint.save import _tokenizer_args

    class Tok:
        kind = "hf"

    stored = _tokenizer_args(Tok())
    assert stored == {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer"}
    moved = tmp_path / "moved"
    (moved / "tokenizer").mkdir(parents=True)
    args = argparse.Namespace(**stored)
    assert tokenizer_path(args, moved) == str(moved.absolute() / "tokenizer")
    absolute = argparse.Namespace(tokenizer_model="/elsewhere/tok")  # a Megatron-LM run's own
    assert tokenizer_path(absolute, moved) == "/elsewhere/tok"


def test_docs_launch_megatron_lm_with_cuda_device_max_connections():
    blocks = re.findall(r"```(?:bash)?\n(.*?)```|((?:^ {4,}.*\n)+)",
                        (ROOT / "docs" / "megatron-lm.md").read_text(), flags=re.S | re.M)
    launches = [a or b for a, b in blocks
                if re.search(r"torchrun[^\n]*(pretrain_gpt|text_generation_server)", a or b)]
    assert launches, "docs/megatron-lm.md shows no Megatron-LM torchrun launch"
    for block in launches:
        assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in block, block
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in (ROOT / "examples" / "finetune_command.sh").read_text()
