"""A dense checkpoint saved by Megatron-LM with ``--transformer-impl transformer_engine`` (the
default on GPUs) opens in our tools, dense and with an SPD plan given at load.

Transformer Engine does not install on a CPU machine, so the TE model is built here the way
Megatron-LM builds it, with TE's own modules replaced by CPU stand-ins and everything else real:

- the layer spec is megatron-core's own ``get_gpt_layer_with_transformer_engine_spec``, built with
  megatron-core's own ``TESpecProvider`` (both import without TE: megatron then puts a MagicMock
  in place of each TE class); every TE class in that spec is swapped for its stand-in below, and a
  TE class without one fails the test;
- the final norm is the stand-in for ``TENorm``, which TransformerBlock uses when TE is installed
  (transformer_block.py, ``LayerNormImpl = TENorm``);
- GPTModel, TransformerBlock, TransformerLayer, SelfAttention, MLP and their sharded_state_dict
  (layers stacked under ``decoder.layers.*`` on a leading axis) are megatron-core's.

What a stand-in takes from TE, and where it comes from:

- parameter names: ``LayerNormLinear`` holds ``layer_norm_weight`` (+ ``layer_norm_bias`` for
  LayerNorm) beside ``weight``/``bias``; ``LayerNorm``/``RMSNorm`` hold ``weight`` (+ ``bias``);
- sharded_state_dict: megatron-core's TE wrappers (extensions/transformer_engine.py,
  ``TELayerNormColumnParallelLinear``, ``TEColumnParallelLinear``, ``TERowParallelLinear``,
  ``TEDotProductAttention``) shard exactly as the local ``ColumnParallelLinear``,
  ``RowParallelLinear`` and ``DotProductAttention`` do, which the stand-ins inherit;
  ``test_stand_ins_shard_as_megatron_core_te_wrappers`` reads the wrappers' source and fails if
  that ever changes. ``TEDotProductAttention`` saves nothing unless its softmax is learnable, so a
  TE checkpoint has no ``core_attention._extra_state``; ``TENorm`` has no sharded_state_dict of
  its own, so megatron's default one saves its ``_extra_state`` too;
- ``_extra_state``: TE 2.x modules and ops store a uint8 tensor (``pickle.dumps`` of their FP8
  metadata: ``{}`` or ``None`` without fp8); TE 1.x stored an ``io.BytesIO`` of ``torch.save``.
  Both are tested, with a payload whose unpickling would run code: our reader loads the payload
  as data and never unpickles it.

The checkpoint is written as Megatron-LM's ``save_checkpoint`` writes torch_dist (iter_*, args
with ``transformer_impl="transformer_engine"``, optimizer tensors, RNG state) at TP=2, and read
at TP=2 and TP=1. Tolerances (fp32): the same TP degree, logits bit-identical to the TE model's;
TP=1 against the TE model at TP=2, tests/tiny.py LOGIT_TOL (1e-5).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import pickle
from pathlib import Path
from unittest import mock

import pytest
import torch

from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks
from tests.reference import random_full_state_dict
from tests.test_checkpoint import _reinit, save_like_megatron_lm, write_tokenizer
from tests.tiny import LLAMA, LOGIT_TOL

CFG = dataclasses.replace(LLAMA, qk_layernorm=True)  # Qwen3-like: TENorm q/k norms too
PLAN = SPDPlan.from_spd_blocks(3, 2, [1, 2], "zs")
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
# where the full (local) state dict's per-layer names live in a TE model
TE_PARAM = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


class _Evil:
    """A pickle that would leave a mark if anything unpickled it."""

    def __reduce__(self):
        return (Path("/nonexistent-te-extra-state-was-unpickled").mkdir, ())


def te2_extra_state(state=None) -> torch.Tensor:
    """TE 2.x ``get_extra_state``: the pickled FP8 metadata as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def te1_extra_state(state=None) -> io.BytesIO:
    """TE 1.x ``get_extra_state`` (outside ONNX export): ``torch.save`` into a BytesIO."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf


EXTRA_STATE = {"te2": lambda: te2_extra_state(None), "te1": lambda: te1_extra_state(None),
               "evil": lambda: te2_extra_state(_Evil())}
_PAYLOAD = ["te2"]  # which EXTRA_STATE the stand-ins store (set per rank job)


class _TEExtraState:
    def get_extra_state(self):
        return EXTRA_STATE[_PAYLOAD[0]]()

    def set_extra_state(self, state) -> None:
        pass


def _norm(x, weight, bias, config):
    if config.normalization == "RMSNorm":  # what torch.nn.RMSNorm (WrappedTorchNorm) runs
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, config.layernorm_epsilon)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias,
                                          config.layernorm_epsilon)


def stand_ins() -> dict[str, type]:
    """TE class name (megatron.core.extensions.transformer_engine) -> CPU stand-in."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
    )
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class TELayerNormColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
            if config.normalization == "LayerNorm":
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size))
            self._norm_config = config

        def forward(self, x, *args, **kwargs):
            x = _norm(x, self.layer_norm_weight, getattr(self, "layer_norm_bias", None),
                      self._norm_config)
            return super().forward(x, *args, **kwargs)

    class TEColumnParallelLinear(_TEExtraState, ColumnParallelLinear):
        pass

    class TERowParallelLinear(_TEExtraState, RowParallelLinear):
        pass

    class TEDotProductAttention(_TEExtraState, DotProductAttention):
        pass

    class TENorm(_TEExtraState, torch.nn.Module):
        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__()
            self.config = config
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            if config.normalization == "LayerNorm":
                self.bias = torch.nn.Parameter(torch.zeros(hidden_size))

        def forward(self, x):
            return _norm(x, self.weight, getattr(self, "bias", None), self.config)

    return {c.__name__: c for c in (TELayerNormColumnParallelLinear, TEColumnParallelLinear,
                                    TERowParallelLinear, TEDotProductAttention, TENorm)}


def _swap(node, table: dict[int, type]):
    """``node`` (a ModuleSpec tree: specs, submodule dataclasses, partials) with each TE class
    replaced from ``table`` (by identity); a leftover MagicMock is a TE class we lack."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if id(node) in table:
        return table[id(node)]
    if isinstance(node, mock.Mock):
        raise TypeError(f"the TE spec uses a TE class with no stand-in: {node!r}")
    if isinstance(node, ModuleSpec):
        node.module = _swap(node.module, table)
        node.submodules = _swap(node.submodules, table)
        return node
    if isinstance(node, functools.partial):  # megatron-core 0.19 builds the MLP through one
        return functools.partial(_swap(node.func, table),
                                 *[_swap(a, table) for a in node.args],
                                 **{k: _swap(v, table) for k, v in node.keywords.items()})
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _swap(getattr(node, f.name), table))
    return node


def te_layer_spec(qk_layernorm: bool):
    """megatron-core's TE GPT layer spec, TE classes swapped for the stand-ins."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    table = {id(getattr(te_ext, name)): cls for name, cls in stand_ins().items()}
    # TE >= 1.9 (which uses TENorm for q/k norms) is what megatron-core 0.16+ runs with
    with mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider,
                              create=True), \
            mock.patch.object(provider, "is_te_min_version", lambda *a, **k: True):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=qk_layernorm)
    return _swap(spec, table)


def build_te_model(cfg):
    """GPTModel as Megatron-LM builds it with --transformer-impl transformer_engine (stand-ins)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    tcfg = cfg.transformer_config(parallel_state.get_tensor_model_parallel_world_size())
    block = TransformerBlockSubmodules(layer_specs=[te_layer_spec(cfg.qk_layernorm)]
                                       * cfg.num_layers, layer_norm=stand_ins()["TENorm"])
    return GPTModel(config=tcfg, transformer_layer_spec=block, vocab_size=cfg.vocab_size,
                    max_sequence_length=cfg.max_seq_length,
                    share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                    position_embedding_type=cfg.position_embedding_type,
                    rotary_base=cfg.rope_theta, rotary_percent=1.0)


def _te_name(local: str) -> str:
    for plain, te in TE_PARAM.items():
        if local.endswith("." + plain):
            return local[:-len(plain)] + te
    return local


def _logits(model):
    from megatron_spd.core.sharding import forward_logits

    with torch.no_grad():
        return forward_logits(model, TOKENS)


def _te_checkpoint_roundtrip(full, tok_path, tmp, payload):
    """world 2: the TE model at TP=2 saved as Megatron-LM does; opened at TP=2 and TP=1, dense
    and with PLAN; the SPD model built from the same weights directly."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    from megatron_spd.checkpoint.args import args_from_config
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.loading.open_model import open_model

    _PAYLOAD[0] = payload
    tmp = Path(tmp)
    out = {}
    local = build_model(CFG)  # the weights, sliced for this rank, in local names
    load_full_state_dict(local, full)
    te = build_te_model(CFG)
    state = {_te_name(k): v for k, v in local.state_dict().items()}
    state.update({k: v for k, v in te.state_dict().items() if k.endswith("_extra_state")})
    te.load_state_dict(state, strict=True)  # every TE parameter set, no name left over
    out["te_tp2"], out["local_tp2"] = _logits(te), _logits(local)
    sd = te.sharded_state_dict()
    out["keys"] = sorted({(v.key, type(v).__name__) for v in sd.values()
                          if isinstance(v, (ShardedTensor, ShardedObject, ShardedTensorFactory))})
    args = args_from_config(CFG, None, tp=2)
    args.transformer_impl = "transformer_engine"  # Megatron-LM's default
    save_like_megatron_lm(te, tmp / "te", args, iteration=5)

    out["open_tp2"] = _logits(open_model(tmp / "te", tokenizer=tok_path).model)
    _reinit(1)
    out["open_tp1"] = _logits(open_model(tmp / "te", tokenizer=tok_path).model)
    spd = open_model(tmp / "te" / "iter_0000005", plan=PLAN, tokenizer=tok_path)
    out["spd_plan"], out["spd_open"] = spd.plan.to_dict(), _logits(spd.model)
    direct = build_model(CFG, PLAN)
    load_full_state_dict(direct, full)
    out["spd_direct"] = _logits(direct)
    return out


@pytest.fixture(scope="module")
def te_saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("te")
    full = random_full_state_dict(CFG, seed=11)
    tok_path = write_tokenizer(tmp / "tok")
    out = run_ranks(_te_checkpoint_roundtrip, 2, full, tok_path, str(tmp), "evil")
    return tmp, tok_path, out


def _expected_te_keys(cfg) -> set[tuple[str, str]]:
    """What a Megatron-LM TE run of ``cfg`` (RMSNorm, no biases) stores, by megatron-core's
    sharded_state_dict of the TE wrappers listed in the module docstring."""
    layer = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
             "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight",
             "mlp.linear_fc2.weight"}
    if cfg.qk_layernorm:
        layer |= {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}
    objects = {"self_attention.linear_qkv._extra_state", "self_attention.linear_proj._extra_state",
               "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state"}
    if cfg.qk_layernorm:
        objects |= {"self_attention.q_layernorm._extra_state",
                    "self_attention.k_layernorm._extra_state"}
    keys = {(f"decoder.layers.{k}", "ShardedTensor") for k in layer}
    keys |= {(f"decoder.layers.{k}", "ShardedObject") for k in objects}
    # SwiGLU: MLP.sharded_state_dict stores fc1 as its W and V halves (a factory)
    keys.add(("decoder.layers.mlp.linear_fc1.weight", "ShardedTensorFactory"))
    keys |= {("embedding.word_embeddings.weight", "ShardedTensor"),
             ("decoder.final_layernorm.weight", "ShardedTensor"),
             ("decoder.final_layernorm._extra_state", "ShardedObject"),
             ("output_layer.weight", "ShardedTensor")}
    return keys


def test_te_checkpoint_has_te_keys_and_opens_exactly(te_saved):
    _, _, (r0, r1) = te_saved
    got, want = set(r0["keys"]), _expected_te_keys(CFG)
    assert got == want, (sorted(got - want), sorted(want - got))
    assert not Path("/nonexistent-te-extra-state-was-unpickled").exists()
    for r in (r0, r1):
        # the stand-ins compute what the local spec computes (same ops): bit-identical
        torch.testing.assert_close(r["te_tp2"], r["local_tp2"], atol=0, rtol=0)
        torch.testing.assert_close(r["open_tp2"], r["te_tp2"], atol=0, rtol=0)
        torch.testing.assert_close(r["open_tp1"], r["te_tp2"], **LOGIT_TOL)
        assert r["spd_plan"] == PLAN.to_dict()
        torch.testing.assert_close(r["spd_open"], r["spd_direct"], atol=0, rtol=0)
    # the SPD blocks really change the function (the comparison above is not dense vs dense)
    assert (r0["spd_open"] - r0["open_tp1"]).abs().max() > 1e-3


@pytest.mark.parametrize("payload", ["te1", "te2"])
def test_each_te_extra_state_form_loads(payload, tmp_path):
    """TE 1.x's BytesIO and TE 2.x's uint8 tensor, both read as data."""
    out = run_ranks(_te_checkpoint_roundtrip, 2, random_full_state_dict(CFG, seed=12),
                    write_tokenizer(tmp_path / "tok"), str(tmp_path), payload)
    torch.testing.assert_close(out[0]["open_tp1"], out[0]["te_tp2"], **LOGIT_TOL)


def _axis_maps(source: str) -> dict[str, object]:
    """class name -> the axis map its sharded_state_dict passes to
    make_sharded_tensors_for_checkpoint (third positional argument), from source text."""
    out = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef) and fn.name == "sharded_state_dict":
                for call in ast.walk(fn):
                    if isinstance(call, ast.Call) and getattr(call.func, "id", "") == \
                            "make_sharded_tensors_for_checkpoint":
                        out[cls.name] = ast.literal_eval(call.args[2])
    return out


def test_stand_ins_shard_as_megatron_core_te_wrappers():
    """The TE wrappers' sharded_state_dict (megatron-core's extensions/transformer_engine.py,
    read as text since it cannot be imported without TE) uses the axis maps of the local
    classes the stand-ins inherit theirs from."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.transformer.dot_product_attention as dpa
    from megatron.core.tensor_parallel import layers

    te = _axis_maps(inspect.getsource(te_ext))
    local = {**_axis_maps(inspect.getsource(layers)), **_axis_maps(inspect.getsource(dpa))}
    assert te["TELayerNormColumnParallelLinear"] == local["ColumnParallelLinear"] \
        == {"weight": 0, "bias": 0}
    assert te["TEColumnParallelLinear"] == local["ColumnParallelLinear"]
    assert te["TERowParallelLinear"] == local["RowParallelLinear"] == {"weight": 1}
    assert te["TEDotProductAttention"] == local["DotProductAttention"] == {"softmax_offset": 0}
    # TEDotProductAttention saves its state only with a learnable softmax, like the local one
    src = inspect.getsource(te_ext)
    body = src[src.index("class TEDotProductAttention"):]
    body = body[body.index("def sharded_state_dict"):][:800]
    assert 'softmax_type == "learnable"' in body and "state_dict = {}" in body
    assert "sharded_state_dict" not in inspect.getsource(te_ext.TENorm)  # megatron's default


def test_te_args_read_and_what_is_refused():
    """A run's transformer_impl changes no weight: transformer_engine args read as any others.
    What such a run can set that our model cannot express (TE's --window-size) is refused in one
    line; what our tools write says local, which SPD blocks need in Megatron-LM."""
    from megatron_spd.checkpoint.args import args_from_config, config_from_args

    args = args_from_config(CFG, PLAN, tp=2)
    assert args.transformer_impl == "local"
    args.transformer_impl = "transformer_engine"
    assert config_from_args(args, "ckpt") == CFG
    args.window_size = (16, 0)
    with pytest.raises(ValueError, match=r"ckpt: .*--window-size sliding-window attention is "
                                         r"not supported \(window_size=\(16, 0\)\)"):
        config_from_args(args, "ckpt")


@pytest.mark.parametrize("name,value,flag", [
    ("softmax_type", "learnable", "--softmax-type"), ("qk_l2_norm", True, "--qk-l2-norm"),
    ("attention_output_gate", True, "--attention-output-gate"),
    ("no_rope_freq", [0, 1, 0, 1], "--no-rope-freq"),
    ("apply_residual_connection_post_layernorm", True,
     "--apply-residual-connection-post-layernorm"), ("use_mup", True, "--use-mup")])
def test_model_changing_megatron_lm_arguments_are_refused(name, value, flag):
    """Architecture arguments of Megatron-LM 0.19 (built from TransformerConfig fields) that our
    model cannot express: a checkpoint carrying one is refused naming the flag, never read as
    the plain model; their defaults (what older checkpoints lack) read as before."""
    from megatron_spd.checkpoint.args import args_from_config, config_from_args

    args = args_from_config(CFG, PLAN, tp=2)
    assert config_from_args(args, "ckpt") == CFG
    setattr(args, name, value)
    with pytest.raises(ValueError, match=f"ckpt: .*{flag}.*{name}="):
        config_from_args(args, "ckpt")


def test_spd_under_transformer_engine_says_what_to_pass():
    """Megatron-LM with --spd-plan and --transformer-impl transformer_engine is refused at
    start-up, naming the flag and that a TE-trained dense checkpoint loads under it."""
    from megatron_spd.integrations.megatron_lm import _unsupported

    args = args_from_config_for_mlm(transformer_impl="transformer_engine")
    (problem,) = _unsupported(args)
    assert problem.startswith("pass --transformer-impl local: ")
    assert "dense checkpoint trained with --transformer-impl transformer_engine loads" in problem
    assert _unsupported(args_from_config_for_mlm(transformer_impl="local")) == []


def args_from_config_for_mlm(**kw):
    from megatron_spd.checkpoint.args import args_from_config

    args = args_from_config(CFG, PLAN, tp=2)
    vars(args).update(context_parallel_size=1, **kw)
    return args


def megatron_lm_env_first() -> None:
    from tests.megatron_lm_runs import megatron_lm_env

    megatron_lm_env()


def megatron_lm_loads_te_checkpoint(work: str) -> None:
    """Run in a subprocess whose path starts with the patched Megatron-LM copy: a dense TE
    checkpoint (TP=1) loaded by Megatron-LM with --use-checkpoint-args --transformer-impl local
    --spd-plan, against the SPD model built from the same weights. Results: work/te.json."""
    import json

    megatron_lm_env_first()
    import pretrain_gpt
    from megatron.training import checkpointing

    from megatron_spd.checkpoint.args import args_from_config
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.integrations.megatron_lm import add_arguments
    from megatron_spd.parallel import distributed
    from tests.megatron_lm_runs import build_with_gpt_builder, megatron_args

    work = Path(work)
    distributed.init(1)
    cfg = dataclasses.replace(CFG, tie_word_embeddings=False)  # Megatron-LM's usual --untie
    full = random_full_state_dict(cfg, seed=13)
    local = build_model(cfg)
    load_full_state_dict(local, full)
    te = build_te_model(cfg)
    state = {_te_name(k): v for k, v in local.state_dict().items()}
    state.update({k: v for k, v in te.state_dict().items() if k.endswith("_extra_state")})
    te.load_state_dict(state, strict=True)
    args = args_from_config(cfg, None, tp=1)
    args.transformer_impl = "transformer_engine"
    save_like_megatron_lm(te, work / "te", args, iteration=3)
    PLAN.save(work / "plan.json")
    direct = build_model(cfg, PLAN)
    load_full_state_dict(direct, full)

    mlm = megatron_args(["--load", str(work / "te"), "--use-checkpoint-args", "--finetune",
                         "--spd-plan", str(work / "plan.json")],
                         getattr(pretrain_gpt, "extra_args_provider", add_arguments))
    model = build_with_gpt_builder(mlm)
    checkpointing.load_checkpoint([model], None, None, strict=True)
    out = {"layers": [type(m).__name__ for m in model.decoder.layers],
           "impl": mlm.transformer_impl,
           "vs_direct": (_logits(model) - _logits(direct)).abs().max().item(),
           "spd_vs_dense": (_logits(direct) - _logits(te)).abs().max().item()}
    (work / "te.json").write_text(json.dumps(out))


def test_patched_megatron_lm_loads_te_checkpoint_with_spd_plan(tmp_path):
    """MEGATRON_LM_DIR only (tests/test_patches.py): patched Megatron-LM opens the dense TE
    checkpoint under --transformer-impl local with a plan; logits equal the SPD model built
    from the same weights (fp32, |d| <= 1e-6)."""
    import json

    from tests.test_patches import run_patched

    work = run_patched(tmp_path, "tests.test_te_checkpoint", "megatron_lm_loads_te_checkpoint")
    out = json.loads((work / "te.json").read_text())
    print(f"\nMegatron-LM (TE checkpoint, --spd-plan) vs SPD built directly: {out['vs_direct']:.1e}")
    assert out["impl"] == "local"
    assert out["layers"] == ["TransformerLayer", "SPDTransformerLayer", "SPDTransformerLayer"]
    assert out["vs_direct"] <= 1e-6 and out["spd_vs_dense"] > 1e-3
