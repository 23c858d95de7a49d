"""Recovery methods of issue 13: rank-local compensation (closed-form fit, serving at any T dividing
G with unchanged communication, checkpoints), sequential B2B, B2B learning-rate search.

Tolerances (fp32): the closed-form fit of an exactly linear relation reproduces it to 1e-4
relative (float64 solve, ridge 1e-9); T=G against the T=1 emulation: logits atol = rtol = 1e-5,
gradients atol 1e-6 * max(1, max|g|), rtol 1e-4 (as tests/test_foundation.py).
"""
from __future__ import annotations

import pytest
import torch

from megatron_spd.core.config import ModelConfig
from megatron_spd.core.plan import PlanError, SPDPlan
from megatron_spd.testing import run_ranks

from reference import random_full_state_dict
from test_checkpoint import write_tokenizer

CFG = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                  ffn_hidden_size=128, vocab_size=96, max_seq_length=32, rope_theta=10000.0)
TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))


def _plan(groups: int, rank: int, inputs: str = "ln1+partial", comp_blocks=(0, 2)) -> SPDPlan:
    return SPDPlan(groups, ["zs", "dense", "zs"],
                   {"compensation": {"blocks": list(comp_blocks), "rank": rank, "inputs": inputs}})


def _full_with_compensation(plan: SPDPlan, seed: int = 5) -> dict:
    """Random weights, including non-zero compensation for the plan's compensated blocks."""
    from megatron_spd.core.compensation import zero_entries

    full = random_full_state_dict(CFG, 3)
    g = torch.Generator().manual_seed(seed)
    full.update({k: 0.3 * torch.randn(v.shape, generator=g)
                 for k, v in zero_entries(CFG, plan).items()})
    return full


# ----- the closed-form fit ---------------------------------------------------------------------

def _planted(t=600, h=24, groups=3, rank=4, seed=0):
    """ln1 and per-group partials such that each group's missing term is exactly
    c_g + M_g ln1, M_g of rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    ln1 = torch.randn(t, h, generator=g, dtype=torch.float64)
    maps = [torch.randn(h, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, h, generator=g, dtype=torch.float64) / h for _ in range(groups)]
    cs = torch.randn(groups, h, generator=g, dtype=torch.float64)
    # solve for partials P with sum_{j!=g} P_j = c_g + M_g ln1 (+ K_g own_g): with S = sum_j P_j,
    # P_g = S - missing_g; summing over g gives S = sum_g missing_g / (G - 1).
    missing = torch.stack([cs[k] + ln1 @ maps[k].t() for k in range(groups)], 1)
    total = missing.sum(1) / (groups - 1)
    return ln1, total[:, None] - missing, missing


def test_fit_recovers_planted_linear_relation():
    from megatron_spd.recipe.compensation_fit import apply_groups, fit_groups

    ln1, partials, missing = _planted(rank=4)
    w = fit_groups(ln1.float(), partials.float(), rank=4, inputs="ln1", ridge=1e-9)
    assert w["weight_in"].shape == (3, 4, 24) and w["weight_out"].shape == (3, 24, 4)
    got = apply_groups(w, ln1.float(), partials.float(), "ln1").double()
    assert (got - missing).norm() <= 1e-4 * missing.norm()
    # one rank too few cannot reproduce it (the test can fail) ...
    w3 = fit_groups(ln1.float(), partials.float(), rank=3, inputs="ln1", ridge=1e-9)
    got3 = apply_groups(w3, ln1.float(), partials.float(), "ln1").double()
    assert (got3 - missing).norm() > 1e-2 * missing.norm()
    # ... and rank 0 is the weighted mean of the missing term
    weights = torch.rand(ln1.shape[0], generator=torch.Generator().manual_seed(1))
    w0 = fit_groups(ln1.float(), partials.float(), rank=0, weights=weights)
    assert set(w0) == {"bias"}
    expect = (weights.double()[:, None, None] * missing).sum(0) / weights.double().sum()
    torch.testing.assert_close(w0["bias"].double(), expect, atol=1e-5, rtol=1e-5)


def test_fit_uses_own_partial_when_asked():
    """A missing term that depends on the group's own partial: only ``ln1+partial`` fits it."""
    from megatron_spd.recipe.compensation_fit import apply_groups, fit_groups

    g = torch.Generator().manual_seed(3)
    t, h = 500, 16
    ln1 = torch.randn(t, h, generator=g)
    a0 = torch.randn(t, h, generator=g)
    m = torch.linalg.qr(torch.randn(h, h, generator=g))[0]  # orthogonal: well conditioned
    a1 = a0 @ m.t() + 0.5                       # missing term of group 0 = A_1 = f(A_0)
    # and group 1's missing term A_0 = (A_1 - 0.5) m is a linear function of its own A_1
    partials = torch.stack([a0, a1], 1)
    missing = torch.stack([a1, a0], 1)
    for inputs, exact in (("ln1+partial", True), ("ln1", False)):
        w = fit_groups(ln1, partials, rank=h, inputs=inputs, ridge=1e-9)
        err = (apply_groups(w, ln1, partials, inputs) - missing).norm() / missing.norm()
        assert (err < 1e-3) == exact, (inputs, float(err))


# ----- the plan key and the model built from it -------------------------------------------------

def test_plan_compensation_key_checked():
    plan = _plan(2, 4)
    assert plan.compensation_for(0) == {"rank": 4, "inputs": "ln1+partial"}
    assert plan.compensation_for(1) is None and plan.compensation_for(2) is not None
    assert SPDPlan.from_dict(plan.to_dict()).compensation_for(2) == plan.compensation_for(2)
    with pytest.raises(PlanError, match=r"block\(s\) \[1\] that are not SPD"):
        _plan(2, 4, comp_blocks=(0, 1))
    with pytest.raises(PlanError, match="rank must be an integer >= 0"):
        _plan(2, -1)
    with pytest.raises(PlanError, match="inputs 'x' is unknown"):
        _plan(2, 4, inputs="x")
    mixed = SPDPlan(2, ["zs", "dense", "zs"], {"compensation": {"blocks": [0, 2], "rank": 0,
                                                                "ranks": {"2": 8}}})
    assert mixed.compensation_for(0)["rank"] == 0 and mixed.compensation_for(2)["rank"] == 8
    with pytest.raises(PlanError, match=r"ranks names block\(s\) \['1'\]"):
        SPDPlan(2, ["zs", "dense", "zs"], {"compensation": {"blocks": [0, 2], "rank": 0,
                                                            "ranks": {"1": 8}}})


def _run(plan_dict: dict, full: dict, sp: bool = False):
    """Logits, full gradients and block-0 collectives of the plan's model at the current TP."""
    from megatron_spd.parallel.collectives import CollectiveCounter
    from megatron_spd.core.grads import reduce_tp_partial_grads
    from megatron_spd.core.sharding import (causal_mask, forward_logits, gather_full_state_dict,
                                    load_full_state_dict, model_params)
    from megatron_spd.core.spec import build_model

    plan = SPDPlan.from_dict(plan_dict)
    model = build_model(CFG, plan, sequence_parallel=sp)
    load_full_state_dict(model, full)
    logits = forward_logits(model, TOKENS)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * w).sum().backward()
    reduce_tp_partial_grads(model)
    grads = gather_full_state_dict(model, grads=True)
    model.zero_grad(set_to_none=True)
    s = 8
    x = torch.randn(s // (2 if sp else 1), 2, CFG.hidden_size, requires_grad=True)
    with CollectiveCounter() as c:
        out, _ = model.decoder.layers[0](hidden_states=x, attention_mask=causal_mask(s),
                                         rotary_pos_emb=model.rotary_pos_emb(s))
        fwd = dict(c.calls)
        c.reset()
        out.sum().backward()
        bwd = dict(c.calls)
    return logits.detach(), grads, (fwd, bwd), sorted(model_params(model))


def _runs(cases):
    return {key: _run(plan.to_dict(), full, sp) for key, (plan, full, sp) in cases.items()}


def _cases(world: int):
    out = {}
    for groups in (2, 4):
        for inputs in ("ln1", "ln1+partial"):
            plan = _plan(groups, 3, inputs)
            full = _full_with_compensation(plan)
            out[(groups, inputs, False)] = (plan, full, False)
            if world > 1:
                out[(groups, inputs, True)] = (plan, full, True)
        plain = SPDPlan(groups, ["zs", "dense", "zs"])
        out[(groups, "none", False)] = (plain, random_full_state_dict(CFG, 3), False)
    return out


@pytest.fixture(scope="module")
def served():
    return {1: run_ranks(_runs, 1, _cases(1))[0], 2: run_ranks(_runs, 2, _cases(2))}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        scale = max(1.0, b[1][k].abs().max().item())
        torch.testing.assert_close(a[1][k], b[1][k], atol=1e-6 * scale, rtol=1e-4,
                                   msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("sp", [False, True])
def test_compensation_serves_identically_at_tp(served, sp):
    """G=2 at T=2 (one group per rank) and G=4 at T=2 (two per rank) equal the T=1 emulation,
    logits and gradients, with and without sequence parallel."""
    for rank_result in served[2]:
        for groups in (2, 4):
            for inputs in ("ln1", "ln1+partial"):
                _assert_same(rank_result[(groups, inputs, sp)], served[1][(groups, inputs, False)])


def test_compensation_changes_the_block_not_the_communication(served):
    r1 = served[1]
    for groups in (2, 4):
        comp, plain = r1[(groups, "ln1+partial", False)], r1[(groups, "none", False)]
        assert (comp[0] - plain[0]).abs().max() > 1e-3  # it does act
        # stock names for everything stock; the extra parameters only on compensated blocks
        extra = sorted(set(comp[3]) - set(plain[3]))
        assert set(plain[3]) <= set(comp[3])
        assert extra == [f"decoder.layers.{i}.spd_compensation.{p}" for i in (0, 2)
                         for p in ("bias", "weight_in", "weight_out")]
        for key in comp[1]:
            if "spd_compensation" in key:
                assert comp[1][key].abs().max() > 0, f"{key} gets no gradient"
    for rank_result in served[2]:
        for groups in (2, 4):
            for inputs in ("ln1", "ln1+partial"):
                assert rank_result[(groups, inputs, False)][2] == \
                    rank_result[(groups, "none", False)][2] == \
                    ({"all_reduce": 1}, {"all_reduce": 1})
                assert rank_result[(groups, inputs, True)][2] == \
                    ({"all_gather": 1, "reduce_scatter": 1}, {"all_gather": 1, "reduce_scatter": 1})


def _save(plan_dict: dict, full: dict, out: str, tok_path: str):
    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.core.sharding import load_full_state_dict
    from megatron_spd.core.spec import build_model
    from megatron_spd.data.tokenizer import load_tokenizer

    plan = SPDPlan.from_dict(plan_dict)
    model = build_model(CFG, plan)
    load_full_state_dict(model, full)
    save_checkpoint(model, out, config=CFG, plan=plan, tokenizer=load_tokenizer(tok_path))


def test_compensated_checkpoint_reshards(tmp_path):
    """Saved at T=2 (dist_checkpointing, the groups' parameters sharded), read back at T=1 with
    the plan from the checkpoint: the same weights and logits."""
    from megatron_spd.parallel import distributed
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.loading.sources import load_weights
    from megatron_spd.core.sharding import forward_logits

    plan = _plan(4, 3)
    full = _full_with_compensation(plan)
    run_ranks(_save, 2, plan.to_dict(), full, str(tmp_path / "ckpt"),
              write_tokenizer(tmp_path / "tok"))
    _, loaded, _, loaded_plan = load_weights(tmp_path / "ckpt")
    assert loaded_plan.compensation_for(2) == plan.compensation_for(2)
    assert loaded.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(loaded[k], full[k], atol=0, rtol=0)
    distributed.init(1)
    try:
        lm = open_model(tmp_path / "ckpt")
        ref = _run(plan.to_dict(), full)[0]
        with torch.no_grad():
            torch.testing.assert_close(forward_logits(lm.model, TOKENS), ref, atol=1e-5, rtol=1e-5)
    finally:
        distributed.shutdown()


def test_open_model_with_another_compensation(tmp_path, caplog):
    """A plan whose compensation the checkpoint does not hold: what it lacks starts at zero (the
    block is plain SPD: the logits of the plan without compensation) and what the plan does not
    give is left out (the logits of that plan); each is said on rank 0, never silently."""
    from megatron_spd.parallel import distributed
    from megatron_spd.loading.open_model import open_model
    from megatron_spd.core.sharding import forward_logits

    plan = _plan(4, 3)
    bare = SPDPlan(4, plan.strategies)
    full = _full_with_compensation(plan)
    base = {k: v for k, v in full.items() if "spd_compensation" not in k}
    tok = write_tokenizer(tmp_path / "tok")
    run_ranks(_save, 1, plan.to_dict(), full, str(tmp_path / "with"), tok)
    run_ranks(_save, 1, bare.to_dict(), base, str(tmp_path / "without"), tok)
    def said() -> str:  # what megatron_spd logged (torch's own debug records aside)
        return "\n".join(r.getMessage() for r in caplog.records
                         if r.name.startswith("megatron_spd"))

    distributed.init(1)
    try:
        ref = _run(bare.to_dict(), base)[0]
        for ckpt, given, says in (("with", bare, "is not used"), ("without", plan, "starts at zero")):
            caplog.clear()
            lm = open_model(tmp_path / ckpt, plan=given)
            with torch.no_grad():
                torch.testing.assert_close(forward_logits(lm.model, TOKENS), ref,
                                           atol=1e-5, rtol=1e-5)
            assert says in said()
        caplog.clear()
        lm = open_model(tmp_path / "with")  # its own plan: loaded as stored, nothing to say
        assert said() == ""
    finally:
        distributed.shutdown()


# ----- sequential B2B, lr search, HG with compensation --------------------------------------------

def _scaled_full(seed: int = 0) -> dict:
    """Random weights scaled up so that SPD visibly changes the function (as test_recipe.py)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {k: (4 * v + 0.3 * torch.randn(v.shape, generator=g)) if v.dim() == 1 else 3 * v
            for k, v in random_full_state_dict(CFG, seed).items()}


def _recovered(full, toks, plan, steps, b2b):
    from megatron_spd.core.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_spd.recipe import recover
    from megatron_spd.core.spec import build_model

    dense = build_model(CFG, SPDPlan.dense(CFG.num_layers, plan.groups))
    load_full_state_dict(dense, full)
    model = build_model(CFG, plan)
    load_full_state_dict(model, full)
    done = recover.recover(model, dense, toks, steps, CFG, b2b=b2b, progress=False)
    return gather_full_state_dict(model), done


@pytest.fixture()
def single():
    from megatron_spd.parallel import distributed

    distributed.init(1)
    yield
    distributed.shutdown()


def test_sequential_b2b_changes_only_its_blocks(single):
    """Blocks 1 and 2 SPD (block 0 dense): every variant changes only blocks 1 and 2; block 1's
    inputs and targets are the same in all of them (block 0 is dense), so it trains to the same
    weights; block 2 sees the recovered block 1's outputs when sequential, so it differs."""
    from megatron_spd.recipe import distill, recover

    full = _scaled_full()
    toks = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(2))
    plan = SPDPlan(2, ["dense", "zs", "zs"])
    steps = {1: recover.BlockSteps(b2b=True), 2: recover.BlockSteps(b2b=True)}
    runs = {}
    for inputs, targets in (("dense", "block"), ("spd", "block"), ("spd", "trajectory")):
        cfg = distill.B2BConfig(epochs=3, lr=2e-3, micro_batch=2, inputs=inputs, targets=targets)
        after, done = _recovered(full, toks, plan, steps, cfg)
        changed = {k.split(".")[2] for k in full if not torch.equal(full[k], after[k])}
        assert changed == {"1", "2"}, (inputs, targets, changed)
        assert all(r.mse_after < r.mse_before for r in done.b2b)
        runs[(inputs, targets)] = after
    ind, seq, traj = runs[("dense", "block")], runs[("spd", "block")], runs[("spd", "trajectory")]
    for k in full:
        if k.startswith("decoder.layers.1."):
            torch.testing.assert_close(seq[k], ind[k], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(traj[k], ind[k], atol=1e-6, rtol=1e-5)
    w = "decoder.layers.2.mlp.linear_fc1.weight"
    assert (seq[w] - ind[w]).abs().max() > 1e-4 and (traj[w] - seq[w]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="targets must be one of"):
        distill.B2BConfig(targets="teacher")


def test_b2b_lr_search_picks_the_best_probe(single):
    from megatron_spd.recipe import distill, recover

    full = _scaled_full()
    toks = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = distill.B2BConfig(epochs=2, micro_batch=2, lr_search=(1e-6, 3e-3, 30.0), probe_steps=2)
    _, done = _recovered(full, toks, SPDPlan(2, ["zs", "dense", "dense"]),
                         {0: recover.BlockSteps(b2b=True)}, cfg)
    (r,) = done.b2b
    assert set(r.probes) == {"1e-06", "0.003", "30"}
    assert r.lr == 3e-3 == float(min(r.probes, key=r.probes.get))
    assert r.mse_after < r.mse_before and r.steps == 3 * 2 + 4


def test_b2b_budget_per_block(single):
    """A block's B2BBudget (recover_with_plan's b2b_budget): its own epochs, and B2B on only the
    first k calibration sequences. Bit for bit the block's weights from the same B2BConfig with
    those epochs on those sequences alone; the default budget changes nothing; the plan records
    the budget; a budget beyond the calibration sequences is refused, naming the block."""
    from dataclasses import replace

    from megatron_spd.recipe import autoplan, distill
    from megatron_spd.recipe.recover import B2BBudget

    full = _scaled_full()
    toks = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(2))
    plan = SPDPlan(2, ["dense", "b2b", "dense"])
    cfg = distill.B2BConfig(epochs=2, lr=2e-3, micro_batch=2)

    def recovered(tokens, b2b, budget=None):
        return autoplan.recover_with_plan(CFG, full, plan, tokens, b2b=b2b, b2b_budget=budget,
                                          progress=False)

    _, plain, plain_plan = recovered(toks, cfg)
    _, same, _ = recovered(toks, cfg, {1: B2BBudget(epochs=2, sequences=6)})
    assert all(torch.equal(plain[k], same[k]) for k in full)
    _, cut, cut_plan = recovered(toks, cfg, {1: B2BBudget(epochs=3, sequences=4)})
    _, want, _ = recovered(toks[:4], replace(cfg, epochs=3))
    assert all(torch.equal(cut[k], want[k]) for k in full)
    w = "decoder.layers.1.mlp.linear_fc1.weight"
    assert not torch.equal(cut[w], plain[w])
    assert cut_plan.extra["b2b"]["budget"] == {"1": {"epochs": 3, "sequences": 4}}
    assert cut_plan.extra["b2b"]["blocks"]["1"]["steps"] == 3 * 4 // 2
    assert "budget" not in plain_plan.extra["b2b"]
    with pytest.raises(ValueError, match="block 1: a B2B budget of 7 sequences needs 1 to 6"):
        recovered(toks, cfg, {1: B2BBudget(sequences=7)})


def test_headgrouping_with_compensation(single):
    """HG + compensation through recover_with_plan: the dense function of the permuted weights is
    unchanged, the fitted compensation is in the weights, and the SPD block's calibration
    output error is lower than with HG alone."""
    from megatron_spd.core.sharding import forward_logits, load_full_state_dict
    from megatron_spd.recipe import activations, autoplan
    from megatron_spd.core.spec import build_model

    full = _scaled_full()
    toks = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(2))
    errors = {}
    for comp in (False, True):
        extra = {"compensation": {"blocks": [0], "rank": 4, "inputs": "ln1"}} if comp else {}
        plan = SPDPlan(2, ["hg", "dense", "dense"], extra)
        model, new_full, out_plan = autoplan.recover_with_plan(CFG, full, plan, toks, progress=False)
        assert "head_grouping" in out_plan.extra
        dense = build_model(CFG)
        load_full_state_dict(dense, {k: v for k, v in new_full.items() if "compensation" not in k})
        ref = build_model(CFG)
        load_full_state_dict(ref, full)
        with torch.no_grad():
            torch.testing.assert_close(forward_logits(dense, toks), forward_logits(ref, toks),
                                       atol=1e-4, rtol=1e-4)
            ctx = activations.context(model, toks.shape[1])
            x = activations.embed(ref, toks)
            y = activations.run_layers([ref.decoder.layers[0]], x, ctx)
            errors[comp] = float((activations.run_layers([model.decoder.layers[0]], x, ctx) - y)
                                 .pow(2).mean())
        if comp:
            assert new_full["decoder.layers.0.spd_compensation.weight_in"].abs().max() > 0
            assert 0 < out_plan.extra["compensation"]["fit"]["0"]["explained"] <= 1
    assert errors[True] < errors[False], errors


def test_make_plan_gives_spd_blocks_compensation():
    from megatron_spd.core.compensation import plan_cost
    from megatron_spd.recipe.autoplan import CompensationConfig
    from megatron_spd.recipe import autoplan
    from megatron_spd.recipe.sensitivity import Sensitivity

    sens = Sensitivity(mode="cumulative", groups=2, baseline_ppl=10.0, ppl=[0.0] * 3,
                       sensitivity=[3.0, 1.0, 2.0], n_samples=1, seq_len=8)
    plan = autoplan.make_plan(sens, n_spd=2, strategy="hg", compensation=CompensationConfig())
    assert plan.spd_blocks == [1, 2] and plan.extra["compensation"]["blocks"] == [1, 2]
    assert plan.compensation_for(0) is None and plan.compensation_for(2)["rank"] == 0
    assert plan_cost(CFG, plan) == {"params": 2 * 2 * 64, "flops_per_token": 2 * 2 * 64}
    ranked = autoplan.make_plan(sens, n_spd=2, compensation=CompensationConfig(rank=4))
    assert plan_cost(CFG, ranked)["params"] == 2 * 2 * (64 + 4 * (64 + 64))
    assert "compensation" not in autoplan.make_plan(
        sens, n_spd=2, compensation=CompensationConfig(enabled=False)).extra
    with pytest.raises(ValueError, match="rank must be >= 0"):
        CompensationConfig(rank=-1)
