"""The Megatron-LM patch (patches/): it applies, its hooks carry the plan, and Megatron-LM's own
code round-trips our checkpoints.

Without Megatron-LM (CI): the hooks the patched files call (``megatron_spd.integrations.megatron_lm``) are
tested on ``args`` namespaces: the plan from ``--spd-plan`` or restored from the ``--load``
checkpoint, a mismatched plan refused, settings SPD blocks cannot honour refused.

With ``MEGATRON_LM_DIR`` (an unpatched checkout of a supported Megatron-LM line, patches/README.md;
skipped otherwise): the patch of that line (the one of patches/ that ``git apply --check``
accepts), then, in a subprocess on a patched copy, Megatron-LM's own ``parse_args``/
``validate_args``, ``load_args_from_checkpoint`` (--use-checkpoint-args), the patched builder
(``gpt_builder``; on core_v0.19+ also ``pretrain_gpt.py``'s ``GPTModelConfig`` route),
``load_checkpoint`` and ``save_checkpoint`` on CPU, on a Qwen3-like model (q/k norms, epsilon
1e-6, Llama-3 RoPE scaling): our checkpoint loads with its plan and every model field restored
and the same logits as ours (fp32, exact: the same modules and weights, |d| = 0 expected; the test
allows 1e-6), Megatron-LM's saved checkpoint opens in our tools with the plan, a different
``--spd-plan`` is refused, a run missing ``--qk-layernorm`` is refused in one line naming it, and
the text generation server's parser accepts ``--spd-plan``; on core_v0.19+ the engine
``tools/run_dynamic_text_generation_server.py`` serves (``get_dynamic_inference_engine``) builds
the plan's SPD layers from the checkpoint, stops stock on CPU at its first CUDA-only call inside
``DynamicInferenceContext`` (recorded), and behind ``compat.apply_dynamic_inference`` generates
our engine's greedy tokens. Then the UNPATCHED copy refuses the
same checkpoint (``--use-checkpoint-args`` and ``--finetune`` routes).
Megatron-LM's ``megatron.training`` imports ``six`` and ``triton`` (not in the venv): put a
directory holding them on ``MEGATRON_LM_DEPS`` (``pip install --target DIR six triton``).
"""
import argparse
import dataclasses
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from megatron_spd.checkpoint.args import args_from_config, plan_json
from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import PlanError, SPDPlan

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("megatron-lm-*-spd.patch"))
MLM_DEPS = ("six", "triton")
CFG = ModelConfig(num_layers=3, hidden_size=48, num_attention_heads=6, num_query_groups=6,
                  ffn_hidden_size=96, vocab_size=96, max_seq_length=64)
# the round trip's model: every field Megatron-LM's own --use-checkpoint-args did not restore
RT_CFG = dataclasses.replace(CFG, qk_layernorm=True, norm_eps=1e-6, rope_scaling=True,
                             rope_scaling_factor=8.0)


def _patched_files(patch: Path) -> list[str]:
    return re.findall(r"^diff --git a/(\S+) b/", patch.read_text(), flags=re.M)


def _megatron_lm_dir() -> Path:
    env = os.environ.get("MEGATRON_LM_DIR")
    if not env:
        pytest.skip("MEGATRON_LM_DIR is not set: these checks need an unpatched Megatron-LM "
                    "checkout of a supported line (patches/README.md; no network in CI); set "
                    "MEGATRON_LM_DIR=/path/to/Megatron-LM and MEGATRON_LM_DEPS=a directory with "
                    f"{', '.join(MLM_DEPS)}")
    path = Path(env)
    if not (path / "pretrain_gpt.py").is_file() or not (path / "megatron" / "training").is_dir():
        pytest.fail(f"MEGATRON_LM_DIR={path} is not a Megatron-LM checkout")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return path


def _patch_for(src: Path) -> Path:
    """The patch of patches/ that applies to the checkout ``src`` (one per supported line)."""
    errors = []
    for patch in PATCHES:
        check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=src,
                               capture_output=True, text=True)
        if check.returncode == 0:
            return patch
        errors.append(f"{patch.name}: {check.stderr.strip()[:400]}")
    pytest.fail(f"no patch of patches/ applies to {src} (an unpatched checkout of a line "
                "patches/README.md lists?):\n" + "\n".join(errors))


def test_patch_applies_cleanly_and_patched_files_parse(tmp_path):
    src = _megatron_lm_dir()
    patch = _patch_for(src)
    files = _patched_files(patch)
    for f in files:  # apply to a copy and make sure the result is valid Python
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, tmp_path / f)
    subprocess.run(["git", "apply", str(patch)], cwd=tmp_path, check=True)
    for f in files:
        text = (tmp_path / f).read_text()
        ast.parse(text)
        assert "megatron_spd.integrations.megatron_lm" in text


# ----- the hooks, without Megatron-LM ------------------------------------------------------------

def _args(**kw):
    """A Megatron-LM run's args for CFG (as --use-checkpoint-args would restore them)."""
    base = dict(spd_plan=None, spd_plan_json=None, transformer_impl="local",
                pipeline_model_parallel_size=1, num_experts=None, mtp_num_layers=None,
                context_parallel_size=1, spec=None, load=None, pretrained_checkpoint=None)
    return argparse.Namespace(**{**vars(args_from_config(CFG, None, tp=1)), **base, **kw})


def _fake_checkpoint(path: Path, plan) -> Path:
    """What resolve_plan reads of a --load checkpoint: the tracker and common.pt's args."""
    (path / "release").mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"args": args_from_config(CFG, plan, tp=1), "iteration": 0},
               path / "release" / "common.pt")
    (path / "release" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return path


def test_plan_from_flag_or_restored_from_the_checkpoint_and_mismatch_refused(tmp_path, caplog):
    from megatron_spd.integrations.megatron_lm import check_checkpoint_plan, resolve_plan

    spd = SPDPlan(3, ["zs", "dense", "b2b"])
    other = SPDPlan(3, ["dense", "zs", "zs"])
    spd.save(tmp_path / "spd.json")
    other.save(tmp_path / "other.json")
    ckpt = _fake_checkpoint(tmp_path / "ck", spd)
    dense_ckpt = _fake_checkpoint(tmp_path / "dense", None)

    args = _args(load=str(ckpt))  # no --spd-plan: restored from the checkpoint
    assert resolve_plan(args).to_dict() == spd.to_dict()
    assert json.loads(args.spd_plan_json) == spd.to_dict()  # inline: Megatron-LM saves carry it
    assert "SPD plan restored from --load" in caplog.text
    caplog.clear()
    args = _args(spd_plan_json=plan_json(spd))  # --use-checkpoint-args restored it
    assert resolve_plan(args).to_dict() == spd.to_dict()
    args = _args(spd_plan=str(tmp_path / "other.json"), load=str(ckpt))
    with pytest.raises(PlanError, match="differs from the plan stored in --load"):
        resolve_plan(args)
    args = _args(spd_plan=str(tmp_path / "other.json"), spd_plan_json=plan_json(spd))
    with pytest.raises(PlanError, match="differs from the plan stored in the checkpoint args"):
        resolve_plan(args)
    spd_noted = SPDPlan(3, spd.strategies, {"provenance": {"tool": "x"}})  # same structure
    spd_noted.save(tmp_path / "noted.json")
    assert resolve_plan(_args(spd_plan=str(tmp_path / "noted.json"), load=str(ckpt))) is not None
    # a dense checkpoint takes any plan; its b2b block was not recovered, which is said
    args = _args(spd_plan=str(tmp_path / "spd.json"), load=str(dense_ckpt))
    assert resolve_plan(args).to_dict() == spd.to_dict()
    assert "blocks [2] are b2b/hg in the plan but the weights from --load" in caplog.text
    assert resolve_plan(_args(load=str(dense_ckpt))) is None  # stock dense model
    assert resolve_plan(_args(load=str(tmp_path / "fresh"))) is None  # nothing saved yet
    args = _args(load=str(ckpt))
    resolve_plan(args)
    assert args.spd_dense_source == str(ckpt)  # Megatron-LM's saves record the dense origin

    # Megatron-LM's check_checkpoint_args part
    ck_args = args_from_config(CFG, spd, tp=1)
    check_checkpoint_plan(ck_args, _args(spd_plan_json=plan_json(spd)))
    with pytest.raises(PlanError, match="saved with SPD plan .* built with no SPD blocks"):
        check_checkpoint_plan(ck_args, _args())
    check_checkpoint_plan(args_from_config(CFG, None, tp=1), _args(spd_plan_json=plan_json(spd)))


def test_unrecovered_blocks_are_named_the_same_way_on_every_route():
    from megatron_spd.loading.open_model import unrecovered_note

    plan = SPDPlan(3, ["zs", "hg", "b2b"])
    assert unrecovered_note(plan, plan, "ck") is None
    note = unrecovered_note(plan, SPDPlan(3, ["zs", "hg", "zs"]), "ck")
    assert note.startswith("blocks [2] are b2b/hg in the plan but the weights from ck")
    assert "blocks [1, 2]" in unrecovered_note(plan, None, "hf")


def test_hooks_build_the_plan_specs_and_refuse_unsupported_settings(tmp_path):
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_spd.core.block import SPDTransformerLayer
    from megatron_spd.integrations.megatron_lm import add_arguments, layer_spec, resolve_plan

    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--spd-plan", "p.json"]).spd_plan == "p.json"
    assert parser.parse_args([]).spd_plan is None and parser.parse_args([]).spd_plan_json is None

    plan_path = tmp_path / "plan.json"
    SPDPlan(3, ["zs", "dense", "hg"]).save(plan_path)

    def spec(tp=3, **kw):
        args = _args(spd_plan=str(plan_path), **kw)
        resolve_plan(args)
        return layer_spec(args, CFG.transformer_config(tp))

    kinds = [s.module is SPDTransformerLayer for s in spec().layer_specs]
    assert kinds == [True, False, True]
    for setting, message in ((dict(transformer_impl="transformer_engine"), "impl local"),
                             (dict(pipeline_model_parallel_size=2), "pipeline"),
                             (dict(spec="my.spec"), "drop --spec"),
                             (dict(use_legacy_models=True), "use-legacy-models"),
                             (dict(multi_latent_attention=True), "multi-latent"),
                             (dict(heterogeneous_layers_config_path="h.json"), "heterogeneous"),
                             (dict(experimental_attention_variant="x"), "experimental")):
        with pytest.raises(PlanError, match=message):
            spec(**setting)
    # --qk-layernorm: the SPD and dense specs build megatron's q/k norms (issue 12)
    args = _args(spd_plan=str(plan_path), qk_layernorm=True)
    resolve_plan(args)
    qk = layer_spec(args, dataclasses.replace(CFG, qk_layernorm=True).transformer_config(3))
    assert all(s.submodules.self_attention.submodules.q_layernorm is not IdentityOp
               for s in qk.layer_specs)
    with pytest.raises(PlanError, match="TP=2 does not divide G=3"):
        spec(tp=2)
    SPDPlan(3, ["zs"] * 4).save(plan_path)
    with pytest.raises(PlanError, match="4 blocks but the model has 3"):
        spec(tp=1)


def test_wrap_finalize_runs_megatron_finalize_then_the_spd_reduction(monkeypatch):
    from megatron_spd.integrations import megatron_lm

    log = []
    monkeypatch.setattr(megatron_lm, "reduce_tp_partial_grads",
                        lambda chunk, include_megatron_reduced: log.append(
                            ("spd", chunk, include_megatron_reduced)))

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        log.append(("finalize", tuple(model), num_tokens, force_all_reduce))
        return "result"

    wrapped = megatron_lm.wrap_finalize(finalize)
    assert wrapped(["chunk0", "chunk1"], 7, pg_collection=None, force_all_reduce=True) == "result"
    assert log == [("finalize", ("chunk0", "chunk1"), 7, True),
                   ("spd", "chunk0", False), ("spd", "chunk1", False)]


# ----- Megatron-LM's own code on our checkpoints (MEGATRON_LM_DIR) ------------------------------

# with rank-local compensation on one block: parameters Megatron-LM does not know, stored per layer
ROUND_TRIP_PLAN = SPDPlan(3, ["dense", "zs", "zs"],
                          {"compensation": {"blocks": [2], "rank": 2, "inputs": "ln1"}}).to_dict()


def megatron_lm_round_trip(work: str) -> None:
    """Run in a subprocess whose path starts with the patched Megatron-LM copy: Megatron-LM's
    argument parsing, builder, loader and saver on CPU. Results go to work/result.json."""
    from tests.megatron_lm_runs import (RT_SHAPE, build_with_gpt_builder, megatron_args,
                                        megatron_lm_env)

    megatron_lm_env()
    import pretrain_gpt
    import run_text_generation_server
    from megatron.training import arguments as mlm_args
    from megatron.training import checkpointing

    from megatron_spd.parallel import distributed
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.core.compensation import zero_entries
    from megatron_spd.core.sharding import forward_logits, load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.data.tokenizer import load_tokenizer
    from megatron_spd.integrations.megatron_lm import add_arguments
    from megatron_spd.loading.open_model import open_model
    from tests.reference import random_full_state_dict
    from tests.test_checkpoint import write_tokenizer

    work = Path(work)
    plan = SPDPlan.from_dict(ROUND_TRIP_PLAN)
    other = work / "other.json"
    SPDPlan(3, ["zs", "zs", "dense"]).save(other)
    distributed.init(1)
    tok = write_tokenizer(work / "tok")
    ours = build_model(RT_CFG, plan)
    g = torch.Generator().manual_seed(4)
    load_full_state_dict(ours, {**random_full_state_dict(RT_CFG, seed=3),
                                **{k: 0.3 * torch.randn(v.shape, generator=g)
                                   for k, v in zero_entries(RT_CFG, plan).items()}})
    save_checkpoint(ours, work / "ours", config=RT_CFG, plan=plan,
                    tokenizer=load_tokenizer(tok))
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = forward_logits(open_model(work / "ours").model, tokens)
    provider = getattr(pretrain_gpt, "extra_args_provider", add_arguments)

    out = {}
    # 1. our checkpoint -> --use-checkpoint-args + patched builder + Megatron-LM's loader
    args = megatron_args(["--load", str(work / "ours"), "--use-checkpoint-args",
                           "--save", str(work / "mlm")], provider)
    out["restored_plan"] = json.loads(args.spd_plan_json)
    out["restored_fields"] = [args.qk_layernorm, args.layernorm_epsilon, args.use_rope_scaling,
                              args.rope_scaling_factor]
    out["tokenizer_model"] = args.tokenizer_model
    model = build_with_gpt_builder(args)
    out["spd_layers"] = [type(m).__name__ for m in model.decoder.layers]
    out["compensated"] = sorted({n.split(".")[2] for n, _ in model.named_parameters()
                                 if ".spd_compensation." in n})
    checkpointing.load_checkpoint([model], None, None, strict=True)
    with torch.no_grad():
        out["mlm_vs_ours"] = (forward_logits(model, tokens) - ref).abs().max().item()
    # 1b. core_v0.19+: pretrain_gpt.py and both servers build from a GPTModelConfig
    # (configure_model's route; the servers through megatron.inference.utils.get_model_builder)
    try:
        from megatron.inference.utils import get_model_builder
        from megatron.training.models.gpt import GPTModelBuilder  # noqa: F401 - the 0.19 route
    except ImportError:
        pass
    else:
        from megatron.core.process_groups_config import ProcessGroupCollection

        built = get_model_builder(args, provider="gpt").build_model(
            ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
        out["config_route_layers"] = [type(m).__name__ for m in built.decoder.layers]
        out["config_route_finalize"] = built.config.finalize_model_grads_func.__name__
        checkpointing.load_checkpoint([built], None, None, strict=True)
        with torch.no_grad():
            out["config_route_vs_ours"] = (forward_logits(built, tokens) - ref).abs().max().item()
        sys.argv = ["run_dynamic_text_generation_server.py", "--spd-plan", str(other)]
        from megatron.inference.utils import add_inference_args

        out["dynamic_server_spd_plan"] = mlm_args.parse_args(add_inference_args).spd_plan
    # 2. Megatron-LM's saver -> our tools (plan inline, no tokenizer: passed explicitly)
    if hasattr(checkpointing, "save_tokenizer_assets"):  # main copies the run's tokenizer
        checkpointing.get_tokenizer = lambda: None  # files into each save; this run built none
    checkpointing.save_checkpoint(7, [model], None, None, num_floating_point_operations_so_far=0)
    back = open_model(work / "mlm", tokenizer=tok)
    out["mlm_saved_plan"] = back.plan.to_dict()
    out["mlm_dense_source"] = back.dense_source
    out["mlm_saved_config"] = back.config == RT_CFG
    with torch.no_grad():
        out["ours_from_mlm"] = (forward_logits(back.model, tokens) - ref).abs().max().item()
    # 3. --load without --use-checkpoint-args (e.g. --finetune): the plan comes from --load
    args = megatron_args(["--load", str(work / "ours"), "--finetune", "--qk-layernorm",
                           *RT_SHAPE], provider)
    out["plan_from_load"] = [type(m).__name__ for m in build_with_gpt_builder(args).decoder.layers]
    # 4. another plan for that checkpoint is refused before any weight is loaded
    try:
        build_with_gpt_builder(megatron_args(["--load", str(work / "ours"), "--spd-plan",
                                                str(other), "--qk-layernorm", *RT_SHAPE],
                                               provider))
    except PlanError as e:
        out["mismatch"] = str(e)
    # 5. a run without --qk-layernorm: one line naming the flag, before any weight is read
    try:
        build_with_gpt_builder(megatron_args(["--load", str(work / "ours"), "--finetune",
                                                *RT_SHAPE], provider))
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["architecture"] = f"{type(e).__name__}: {e}"
    # 6. the text generation server's parser (it allows no unknown arguments)
    sys.argv = ["run_text_generation_server.py", "--spd-plan", str(other)]
    out["server_spd_plan"] = mlm_args.parse_args(
        run_text_generation_server.add_text_generate_args).spd_plan
    # 7. core_v0.19+: the engine tools/run_dynamic_text_generation_server.py serves, built by
    # megatron.inference.utils.get_dynamic_inference_engine (get_model_for_inference: the
    # patched get_model_builder, build_distributed_models, load_checkpoint), last: it leaves
    # megatron's InferenceMode active
    if "config_route_layers" in out:
        out.update(_dynamic_server_engine(work))
    (work / "result.json").write_text(json.dumps(out))


def _dynamic_server_engine(work: Path) -> dict:
    """Megatron-LM's dynamic engine for our checkpoint: the model's layers, where the stock
    engine stops on CPU, and, behind compat.apply_dynamic_inference, its greedy tokens with ours."""
    import traceback

    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.inference import utils as inference_utils

    from megatron_spd.inference import GenerationConfig, generate_ids
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.parallel import compat
    from tests.megatron_lm_runs import megatron_args

    prompt, new = [5, 17, 42, 9, 3, 88], 5
    (ours,) = generate_ids(open_model(work / "ours").model, [prompt],
                           GenerationConfig(max_new_tokens=new, stop_on_eos=False))
    megatron_args(["--load", str(work / "ours"), "--use-checkpoint-args",
                   "--inference-max-seq-length", "64",
                   "--inference-dynamic-batching-buffer-size-gb", "0.01",
                   "--inference-dynamic-batching-block-size", "16",
                   "--inference-dynamic-batching-max-requests", "4",
                   "--inference-dynamic-batching-max-tokens", "64"],
                  inference_utils.add_inference_args)  # the patched one takes --spd-plan
    model = inference_utils.get_model_for_inference()
    out = {"dynamic_layers": [type(m).__name__ for m in model.decoder.layers],
           "dynamic_ours": ours.tokens}
    try:
        inference_utils.get_dynamic_inference_engine(model)
    except RuntimeError as e:  # the first CUDA-only call on this machine
        frame = traceback.extract_tb(e.__traceback__)[-1]
        out["dynamic_stock_stop"] = (f"{Path(frame.filename).name}:{frame.lineno} "
                                     f"{frame.name}: {str(e).splitlines()[0]}")
    compat.apply_dynamic_inference()
    engine = inference_utils.get_dynamic_inference_engine(model)
    engine.add_request(0, prompt, SamplingParams(num_tokens_to_generate=new, top_k=1,
                                                 termination_id=-1))
    while engine.has_unfinished_requests():
        for record in engine.step_modern()["finished_request_records"]:
            out["dynamic_tokens"] = [int(t) for t in record.merge().generated_tokens]
    return out


def _megatron_lm_copy(src: Path, dest: Path, patch: Optional[Path]) -> str:
    """A copy of the checkout's Python (patched with ``patch`` if given); its PYTHONPATH."""
    shutil.copytree(src / "megatron", dest / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "tools").mkdir()
    for f in [*src.glob("*.py"), src / "tools" / "run_text_generation_server.py"]:
        shutil.copyfile(f, dest / f.relative_to(src))
    if patch is not None:
        subprocess.run(["git", "apply", str(patch)], cwd=dest, check=True)
    deps = os.environ.get("MEGATRON_LM_DEPS", "")
    return os.pathsep.join(p for p in (str(dest), str(dest / "tools"), deps, str(ROOT)) if p)


def _run_in(path: str, module: str, call: str, work: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import megatron.training.checkpointing"],
                           env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                           text=True)
    if probe.returncode:
        pytest.skip(f"Megatron-LM's megatron.training does not import "
                    f"({probe.stderr.strip()[-300:]}); it needs {', '.join(MLM_DEPS)}: "
                    f"pip install --target DIR {' '.join(MLM_DEPS)}, MEGATRON_LM_DEPS=DIR")
    code = f"from {module} import {call} as f; f({str(work)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": path}, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def run_patched(tmp_path: Path, module: str, call: str) -> Path:
    """``module.call(work)`` in a patched copy of MEGATRON_LM_DIR; returns ``work``."""
    work = tmp_path / "work"
    work.mkdir()
    src = _megatron_lm_dir()
    _run_in(_megatron_lm_copy(src, tmp_path / "patched", _patch_for(src)), module, call, work)
    return work


def test_megatron_lm_loads_serves_and_saves_our_checkpoints_and_unpatched_refuses(tmp_path):
    src = _megatron_lm_dir()
    work = run_patched(tmp_path, "tests.test_patches", "megatron_lm_round_trip")
    out = json.loads((work / "result.json").read_text())
    plan = ROUND_TRIP_PLAN
    print(f"\nMegatron-LM vs ours max|dlogits| {out['mlm_vs_ours']:.1e}; "
          f"ours from Megatron-LM's save {out['ours_from_mlm']:.1e}; "
          f"GPTModelConfig route {out.get('config_route_vs_ours', 'n/a')}")
    assert out["restored_plan"] == plan and out["mlm_saved_plan"] == plan
    assert out["restored_fields"] == [True, 1e-6, True, 8.0]
    assert out["tokenizer_model"] == str(work / "ours" / "tokenizer")  # relative in the args
    assert out["mlm_dense_source"] == str(work / "ours")  # the teacher of a later fine-tune
    assert out["mlm_saved_config"]  # Megatron-LM's save keeps every field (eps, q/k norm, ...)
    assert out["spd_layers"] == out["plan_from_load"] == \
        ["TransformerLayer", "SPDTransformerLayer", "SPDTransformerLayer"]
    assert out["compensated"] == ["2"]
    assert out["mlm_vs_ours"] <= 1e-6 and out["ours_from_mlm"] <= 1e-6
    if "config_route_layers" in out:  # core_v0.19+
        assert out["config_route_layers"] == out["spd_layers"]
        assert out["config_route_finalize"] == "finalize_with_spd"
        assert out["config_route_vs_ours"] <= 1e-6
        assert out["dynamic_server_spd_plan"].endswith("other.json")
    assert "differs from the plan stored" in out["mismatch"]
    assert "--qk-layernorm (checkpoint True, this run False)" in out["architecture"]
    assert "\n" not in out["architecture"]
    assert out["server_spd_plan"].endswith("other.json")
    if "config_route_layers" in out:  # core_v0.19+: run_dynamic_text_generation_server.py's engine
        print(f"dynamic server engine, stock on CPU: {out.get('dynamic_stock_stop')}")
        assert out["dynamic_layers"] == out["spd_layers"]
        assert "dynamic_context.py" in out["dynamic_stock_stop"]  # past build and load
        assert out["dynamic_tokens"] == out["dynamic_ours"]

    # the same checkpoint and Megatron-LM without the patch: refused on both routes
    _run_in(_megatron_lm_copy(src, tmp_path / "unpatched", None),
            "tests.megatron_lm_runs", "megatron_lm_unpatched", work)
    refused = json.loads((work / "unpatched.json").read_text())
    print(f"unpatched Megatron-LM: {refused}")
    assert not refused["megatron_spd_imported"]
    for route in ("use_checkpoint_args", "finetune"):
        assert "megatron_spd.checkpoint.args.SPDPlanJSON" in refused[route], refused[route]


def _tool(name: str):
    import importlib

    return importlib.import_module(f"megatron_spd.cli.{name}")


def test_tools_take_megatron_lm_flag_names_and_no_abbreviations(tmp_path):
    args = _tool("evaluate").parse_args(["--load", "ck", "--tensor-model-parallel-size", "3",
                                         "--tokenizer-model", "tok.json", "--no-verify"])
    assert (args.ckpt, args.tp, args.tokenizer, args.no_verify) == ("ck", 3, "tok.json", True)
    cfg = _tool("finetune").parse_args(["--load", "ck", "--out", str(tmp_path / "o"),
                                        "--seq-length", "64", "--micro-batch-size", "2",
                                        "--train-iters", "5", "--lr-warmup-iters", "1"]).config
    assert (cfg.seq_len, cfg.micro_batch, cfg.steps, cfg.warmup_steps) == (64, 2, 5, 1)
    gen = _tool("generate").parse_args(["--prompt", "Hi", "--num-tokens-to-generate", "7"])
    assert gen.generation.max_new_tokens == 7
    conv = _tool("convert_checkpoint").parse_args(["--load", "mlm", "--out", "o"])
    assert conv.mcore == "mlm"
    with pytest.raises(SystemExit):  # an abbreviation is an error, never another flag
        _tool("generate").parse_args(["--prompts", "Hello"])
