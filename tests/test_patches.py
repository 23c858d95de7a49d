"""The Megatron-LM patch (patches/) applies to the sources it targets and its hooks work.

``git apply --check`` needs a Megatron-LM checkout of the targeted version (core_v0.16.1); CI has
no network, so point ``MEGATRON_LM_DIR`` at one (a clone, or the three patched files exported
with ``git show core_v0.16.1:<path>``); without it that test is skipped and says so. The hooks the
patched files call (``megatron_spd.megatron_lm``) are tested here without Megatron-LM.
"""
import argparse
import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.16.1-spd.patch"
PATCHED_FILES = ("pretrain_gpt.py", "gpt_builders.py", "megatron/training/training.py")


def _megatron_lm_dir() -> Path:
    env = os.environ.get("MEGATRON_LM_DIR")
    if not env:
        pytest.skip("MEGATRON_LM_DIR is not set: the patch check needs a Megatron-LM checkout of "
                    "tag core_v0.16.1 (no network in CI); set MEGATRON_LM_DIR=/path/to/Megatron-LM")
    path = Path(env)
    missing = [f for f in PATCHED_FILES if not (path / f).is_file()]
    if missing:
        pytest.fail(f"MEGATRON_LM_DIR={path} lacks {missing}; it is not a Megatron-LM checkout")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return path


def test_patch_applies_cleanly_and_patched_files_parse(tmp_path):
    src = _megatron_lm_dir()
    check = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=src,
                           capture_output=True, text=True)
    assert check.returncode == 0, (f"the patch does not apply to {src} (it targets Megatron-LM "
                                   f"core_v0.16.1):\n{check.stderr}")
    for f in PATCHED_FILES:  # apply to a copy and make sure the result is valid Python
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, tmp_path / f)
    subprocess.run(["git", "apply", str(PATCH)], cwd=tmp_path, check=True)
    for f in PATCHED_FILES:
        text = (tmp_path / f).read_text()
        ast.parse(text)
        assert "megatron_spd.megatron_lm" in text


def _args(**kw):
    base = dict(spd_plan=None, transformer_impl="local", pipeline_model_parallel_size=1,
                num_experts=None, mtp_num_layers=None, context_parallel_size=1)
    return argparse.Namespace(**{**base, **kw})


def test_hooks_build_the_plan_specs_and_refuse_unsupported_settings(tmp_path):
    from megatron_spd.block import SPDTransformerLayer
    from megatron_spd.config import ModelConfig
    from megatron_spd.megatron_lm import add_arguments, layer_spec
    from megatron_spd.plan import PlanError, SPDPlan

    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--spd-plan", "p.json"]).spd_plan == "p.json"
    assert parser.parse_args([]).spd_plan is None

    cfg = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=6,
                      ffn_hidden_size=96, vocab_size=64)
    plan_path = tmp_path / "plan.json"
    SPDPlan(3, ["zs", "dense", "hg"]).save(plan_path)
    spec = layer_spec(_args(spd_plan=str(plan_path)), cfg.transformer_config(3))
    kinds = [s.module is SPDTransformerLayer for s in spec.layer_specs]
    assert kinds == [True, False, True]

    with pytest.raises(PlanError, match="transformer-impl local"):
        layer_spec(_args(spd_plan=str(plan_path), transformer_impl="transformer_engine"),
                   cfg.transformer_config(1))
    with pytest.raises(PlanError, match="pipeline"):
        layer_spec(_args(spd_plan=str(plan_path), pipeline_model_parallel_size=2),
                   cfg.transformer_config(1))
    with pytest.raises(PlanError, match="TP=2 does not divide G=3"):
        layer_spec(_args(spd_plan=str(plan_path)), cfg.transformer_config(2))
    SPDPlan(3, ["zs"] * 4).save(plan_path)
    with pytest.raises(PlanError, match="4 blocks but the model has 3"):
        layer_spec(_args(spd_plan=str(plan_path)), cfg.transformer_config(1))


def test_wrap_finalize_runs_megatron_finalize_then_the_spd_reduction(monkeypatch):
    from megatron_spd import megatron_lm

    log = []
    monkeypatch.setattr(megatron_lm, "reduce_tp_partial_grads",
                        lambda chunk, include_sequence_parallel: log.append(
                            ("spd", chunk, include_sequence_parallel)))

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        log.append(("finalize", tuple(model), num_tokens, force_all_reduce))
        return "result"

    wrapped = megatron_lm.wrap_finalize(finalize)
    assert wrapped(["chunk0", "chunk1"], 7, pg_collection=None, force_all_reduce=True) == "result"
    assert log == [("finalize", ("chunk0", "chunk1"), 7, True),
                   ("spd", "chunk0", False), ("spd", "chunk1", False)]
