"""Hugging Face export of an SPD model (convert/spd_hf.py; issue 27), without vLLM:

- an SPD plan makes the directory ``spd_<family>`` / ``SPD<Arch>`` with the whole plan in
  config.json and the compensation tensors in model.safetensors; transformers refuses it;
- ``--hf DIR`` reads it back with its plan; HF -> megatron-spd checkpoint (TP=2) -> HF is
  bit-exact, plan and compensation included;
- a dense plan exports the plain family; an ``spd_*`` config without its plan is refused.
"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_spd.core.plan import PlanError, SPDPlan
from megatron_spd.testing import run_ranks

from families import write_hf_dir

PLAN = SPDPlan(2, ["b2b", "dense"], {"compensation": {"blocks": [0], "rank": 2,
                                                      "inputs": "ln1+partial"},
                                     "sensitivity": [0.1, 0.2]})


def _round_trip(spd_dir: str, ckpt: str, back: str) -> None:
    from megatron_spd.loading.convert import to_hf, to_mcore
    from megatron_spd.parallel.distributed import barrier, is_rank0

    to_mcore(spd_dir, ckpt)      # the plan comes from the directory
    barrier()
    if is_rank0():
        to_hf(ckpt, back)


@pytest.fixture(scope="module")
def spd_dir(tmp_path_factory):
    from megatron_spd.convert.hf import load_hf, save_hf
    from megatron_spd.core.compensation import full_shapes
    from megatron_spd.data.tokenizer import hf_tokenizer_from_dir

    work = tmp_path_factory.mktemp("export")
    write_hf_dir("llama3", work / "hf", attention_bias=True, mlp_bias=True)
    cfg, full = load_hf(work / "hf")
    g = torch.Generator().manual_seed(0)
    comp = {k: torch.randn(s, generator=g) for k, s in full_shapes(cfg, PLAN).items()}
    save_hf(work / "spd", cfg, {**full, **comp}, hf_tokenizer_from_dir(work / "hf"), plan=PLAN)
    return work


def test_spd_config_carries_plan_and_transformers_refuses(spd_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = json.loads((spd_dir / "spd" / "config.json").read_text())
    assert cfg["model_type"] == "spd_llama"
    assert cfg["architectures"] == ["SPDLlamaForCausalLM"]
    assert cfg["spd_plan"] == PLAN.to_dict()
    names = load_file(str(spd_dir / "spd" / "model.safetensors")).keys()
    assert {n for n in names if "spd_compensation" in n} == {
        f"model.layers.0.spd_compensation.{p}" for p in ("bias", "weight_in", "weight_out")}
    with pytest.raises(ValueError, match="spd_llama"):
        AutoConfig.from_pretrained(spd_dir / "spd")


def test_round_trip_keeps_plan_and_tensors(spd_dir):
    from safetensors.torch import load_file

    from megatron_spd.loading.sources import load_weights

    _, _, _, plan = load_weights(str(spd_dir / "spd"))
    assert plan.to_dict() == PLAN.to_dict()
    run_ranks(_round_trip, 2, str(spd_dir / "spd"), str(spd_dir / "ckpt"), str(spd_dir / "back"),
              tp=2)
    a = load_file(str(spd_dir / "spd" / "model.safetensors"))
    b = load_file(str(spd_dir / "back" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((spd_dir / "back" / "config.json").read_text()) == \
        json.loads((spd_dir / "spd" / "config.json").read_text())


def test_dense_plan_exports_plain_family_and_incomplete_spd_config_refused(spd_dir):
    from megatron_spd.convert import spd_hf

    dense = json.loads((spd_dir / "hf" / "config.json").read_text())
    dense = {**dense, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert spd_hf.with_plan(dense, SPDPlan.dense(2, 2)) == dense
    assert spd_hf.plan_of(dense) is None
    broken = {**spd_hf.with_plan(dense, PLAN)}
    del broken[spd_hf.PLAN_KEY]
    with pytest.raises(PlanError, match="export it again"):
        spd_hf.plan_of(broken)
