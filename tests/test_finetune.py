"""Fine-tuning through megatron-core's DDP + optimizer (megatron_spd.train, tools/finetune.py).

Tiny random models (fast): TP=2 x DP=2 on 4 ranks gives the same update as TP=2 with twice the
micro-batch; a run killed after a mid-run checkpoint and resumed continues the same loss
trajectory; the vocab-parallel distillation loss and its gradient equal the full-vocabulary
torch computation; hidden-state distillation gives the same run at TP=1, TP=2 and TP=2 with
sequence parallel, and its loss and gradient on shards equal torch's. SmolLM2 (real_model): a
short fine-tune of a 100%-SPD plan (G=3) lowers the held-out loss, emulated (T=1) and at T=3,
and the two runs agree.
"""
import math

import pytest
import torch

from megatron_spd.testing import run_ranks

from tiny import word_tokenizer, write_bigram_corpus

# fp32 tolerances. The same update computed with DP=2 or a 2x micro-batch differs only in the
# order of the float sums (DP all-reduce vs one batch mean): ~1e-7 in the gradients; Adam divides
# by sqrt(v), so parameters after two steps at lr 1e-3 agree to ~1e-6.
UPDATE_ATOL = 2e-5
LOSS_RTOL = 1e-5
# Resume replays the same float operations in the same order: bitwise equal losses expected.
RESUME_ATOL = 0.0
# T=3 vs T=1 emulation of the same G=3 model: TP sums reorder float additions (design: ~1e-6
# relative in logits); after a few Adam steps the losses agree to ~1e-4.
TP_LOSS_RTOL = 2e-3

def _tiny_cfg():
    from megatron_spd.core.config import ModelConfig

    return ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=128, max_seq_length=64)


def _ft_cfg(micro_batch, **kw):
    from megatron_spd.train import FinetuneConfig

    base = dict(steps=4, seq_len=16, micro_batch=micro_batch, lr=1e-3, warmup_steps=1,
                clip_grad=0.5, distill=0.5, temperature=2.0, eval_samples=4, log_interval=0)
    return FinetuneConfig(**{**base, **kw})


def _two_rank_checks(work: str):
    """TP=2: make the tiny checkpoint; the reference run for the DP test; kill + resume; KD."""
    from pathlib import Path

    from megatron_spd.checkpoint.save import save_checkpoint
    from megatron_spd.core.sharding import gather_tp
    from megatron_spd.core.plan import SPDPlan
    from megatron_spd.core.spec import build_model
    from megatron_spd.loading.run_config import RunConfig
    from megatron_spd.train import finetune
    from megatron_spd.train.losses import hidden_mse, kd_loss

    work = Path(work)
    cfg = _tiny_cfg()
    plan = SPDPlan(2, ["zs", "dense", "b2b"])
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg, plan), work / "tiny", config=cfg, plan=plan,
                    tokenizer=word_tokenizer())
    data = work / "corpus.txt"
    out = {}
    # Reference for the DP test (TP=2, DP=1, micro-batch 4), uninterrupted, a training
    # checkpoint after every step but the last; the default keep=2 leaves steps 2 and 3.
    tiny = RunConfig(work / "tiny")
    out["full"] = finetune(tiny, _ft_cfg(4, save_interval=1), out=work / "ft_full",
                           save_dir=work / "save_full", data=data, progress=False)
    # The same run killed after step 2 (its checkpoint), then resumed from the save directory.
    killed = finetune(tiny, _ft_cfg(4, save_interval=2), out=work / "ft_res",
                      save_dir=work / "save_res", data=data, progress=False, stop_after=2)
    out["killed_steps"] = killed["stopped_at"]
    out["resumed"] = finetune(tiny, _ft_cfg(4, save_interval=2), out=work / "ft_res",
                              save_dir=work / "save_res", data=data, progress=False)
    # Vocab-parallel KD against torch on the gathered full vocabulary.
    g = torch.Generator().manual_seed(5)
    s_full = torch.randn(2, 3, 128, generator=g, dtype=torch.float64).float()
    t_full = torch.randn(2, 3, 128, generator=g, dtype=torch.float64).float() * 2
    rank = torch.distributed.get_rank()
    s_loc = s_full.chunk(2, -1)[rank].clone().requires_grad_(True)
    loss = kd_loss(s_loc, t_full.chunk(2, -1)[rank], temperature=2.0)
    loss.backward()
    out["kd"] = (loss.item(), torch.cat(gather_tp(s_loc.grad, -1), -1))
    # Hidden-state MSE on [s, b, h]: whole on each rank, and split over the sequence (SP).
    h_s = torch.randn(6, 2, 32, generator=g, dtype=torch.float64).float()
    h_t = torch.randn(6, 2, 32, generator=g, dtype=torch.float64).float()
    out["mse"] = {}
    for sp in (False, True):
        mine = (h_s.chunk(2, 0)[rank] if sp else h_s).clone().requires_grad_(True)
        loss = hidden_mse(mine, h_t.chunk(2, 0)[rank] if sp else h_t, sequence_parallel=sp)
        loss.backward()
        out["mse"][sp] = (loss.item(), torch.cat(gather_tp(mine.grad, 0), 0) if sp else mine.grad)
    out["hidden"] = [_hidden_run(work, sp) for sp in (False, True)]
    return out


def _hidden_run(work, sequence_parallel: bool = False):
    """Distillation of the final hidden states only (distill=1), at the ranks' TP degree."""
    from megatron_spd.loading.run_config import RunConfig
    from megatron_spd.train import finetune

    tag = f"t{torch.distributed.get_world_size()}{'_sp' if sequence_parallel else ''}"
    return finetune(RunConfig(work / "tiny"), _ft_cfg(4, distill=1.0, distill_on="hidden"),
                    out=work / f"ft_hidden_{tag}", data=work / "corpus.txt", progress=False,
                    sequence_parallel=sequence_parallel)


def _one_rank_hidden(work: str):
    from pathlib import Path

    return _hidden_run(Path(work))


def _four_rank_run(work: str):
    from pathlib import Path

    from megatron_spd.loading.run_config import RunConfig
    from megatron_spd.train import finetune

    work = Path(work)
    return [finetune(RunConfig(work / "tiny"), _ft_cfg(2), out=work / f"ft_dp2{tag}",
                     data=work / "corpus.txt", progress=False, sequence_parallel=sp)
            for tag, sp in (("", False), ("_sp", True))]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("ft")
    write_bigram_corpus(work / "corpus.txt")
    return work, run_ranks(_two_rank_checks, 2, str(work), tp=2, timeout=1200)[0]


def _losses(report):
    return [h["loss"] for h in report["history"]]


def test_resume_continues_the_same_trajectory(tiny_runs):
    from megatron_spd.loading.sources import load_weights

    work, res = tiny_runs
    full, resumed = res["full"], res["resumed"]
    assert res["killed_steps"] == 2 and resumed["start_step"] == 2
    assert len(_losses(resumed)) == 4
    assert torch.allclose(torch.tensor(_losses(resumed)), torch.tensor(_losses(full)),
                          rtol=0, atol=RESUME_ATOL), (_losses(resumed), _losses(full))
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in full["history"]]
    assert resumed["held_out_loss_after"] == full["held_out_loss_after"]
    # the final checkpoints (plain megatron-spd checkpoints) hold the same weights
    _, a, _, plan_a = load_weights(work / "ft_full", progress=False)
    _, b, _, _ = load_weights(work / "ft_res", progress=False)
    assert plan_a.strategies == ["zs", "dense", "b2b"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run trained: loss changed, the training checkpoint pointer is where it should be
    assert full["held_out_loss_after"] != full["held_out_loss_before"]
    assert (work / "save_full" / "latest.json").is_file()


def test_training_checkpoints_keep_the_newest(tiny_runs, tmp_path):
    """``keep``: a run saving after steps 1, 2, 3 with keep=2 leaves steps 2 and 3, and latest
    points at 3; prune itself keeps the newest N (0 = all), never the one just written, and
    touches only directories holding trainer state."""
    from megatron_spd.train import state

    work, _ = tiny_runs
    assert sorted(p.name for p in (work / "save_full").glob("step_*")) == \
        ["step_0000002", "step_0000003"]
    assert state.latest(work / "save_full")[0] == 3
    for keep, left in ((0, [1, 2, 3, 4]), (3, [2, 3, 4]), (1, [4])):
        d = tmp_path / f"keep{keep}"
        for step in (1, 2, 3, 4):
            (state.step_dir(d, step) / state.TRAINER_DIR).mkdir(parents=True)
        (d / "step_0000000").mkdir()  # not a training checkpoint (no trainer state): kept
        state.prune(d, keep, state.step_dir(d, 4))
        assert sorted(d.iterdir()) == [d / "step_0000000", *(state.step_dir(d, s) for s in left)]


def test_vocab_parallel_distillation_matches_full_vocab(tiny_runs):
    _, res = tiny_runs
    loss, grad = res["kd"]
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 128, generator=g, dtype=torch.float64).float().requires_grad_(True)
    t = torch.randn(2, 3, 128, generator=g, dtype=torch.float64).float() * 2
    tau = 2.0
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1), torch.log_softmax(t / tau, -1),
                                     log_target=True, reduction="none").sum(-1).mean() * tau ** 2
    ref.backward()
    assert math.isclose(loss, ref.item(), rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(grad, s.grad, atol=1e-7, rtol=1e-5)


def test_hidden_state_distillation_is_exact_over_tp_and_sp(tiny_runs):
    """``hidden_mse`` on shards equals torch's MSE and gradient; a distill_on="hidden" run
    (student and teacher read by decoder hooks) gives the same losses at TP=1 (the G=2
    emulation), TP=2 and TP=2 with sequence parallel."""
    work, res = tiny_runs
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # the KD test's draws come first from the same generator
        torch.randn(2, 3, 128, generator=g, dtype=torch.float64)
    h_s = torch.randn(6, 2, 32, generator=g, dtype=torch.float64).float().requires_grad_(True)
    h_t = torch.randn(6, 2, 32, generator=g, dtype=torch.float64).float()
    ref = torch.nn.functional.mse_loss(h_s, h_t)
    ref.backward()
    for sp in (False, True):
        loss, grad = res["mse"][sp]
        assert math.isclose(loss, ref.item(), rel_tol=1e-6), sp
        assert torch.allclose(grad, h_s.grad, rtol=1e-6, atol=1e-9), sp
    t1 = run_ranks(_one_rank_hidden, 1, str(work), tp=1, timeout=600)[0]
    kd = [torch.tensor([h["kd_loss"] for h in r["history"]]) for r in (t1, *res["hidden"])]
    for other in kd[1:]:
        assert torch.allclose(other, kd[0], rtol=LOSS_RTOL), kd
    assert (kd[0] > 0).all(), kd[0]  # the SPD blocks move the hidden states off the teacher's
    for r in (t1, *res["hidden"]):
        assert r["config"]["distill_on"] == "hidden"


def test_dp2_tp2_equals_tp2_with_twice_the_batch(tiny_runs):
    """Also with sequence parallel: the DP=2 x TP=2 + SP run must give the same update too."""
    from megatron_spd.loading.sources import load_weights

    work, res = tiny_runs
    runs = run_ranks(_four_rank_run, 4, str(work), tp=2, timeout=1200)[0]
    ref = res["full"]
    _, b, _, _ = load_weights(work / "ft_full", progress=False)
    for dp, tag in zip(runs, ("", "_sp")):
        assert dp["dp"] == 2 and ref["dp"] == 1
        assert torch.allclose(torch.tensor(_losses(dp)), torch.tensor(_losses(ref)),
                              rtol=LOSS_RTOL), tag
        # the gradient norm before clipping sees the DP average (Adam would hide a scale error)
        norms = [torch.tensor([h["grad_norm"] for h in r["history"]]) for r in (dp, ref)]
        assert torch.allclose(*norms, rtol=LOSS_RTOL), (tag, norms)
        assert math.isclose(dp["held_out_loss_after"], ref["held_out_loss_after"],
                            rel_tol=LOSS_RTOL), tag
        _, a, _, _ = load_weights(work / f"ft_dp2{tag}", progress=False)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < UPDATE_ATOL, (tag, worst)


# ----- SmolLM2 ----------------------------------------------------------------------------

def _smollm2_finetune(work: str):
    from pathlib import Path

    from megatron_spd.core.plan import SPDPlan
    from megatron_spd.loading.run_config import RunConfig
    from megatron_spd.train import FinetuneConfig, finetune

    cfg = FinetuneConfig(steps=3, seq_len=32, micro_batch=2, lr=1e-4, clip_grad=1.0,
                         eval_samples=4, log_interval=0)
    plan = SPDPlan.from_spd_blocks(30, 3, range(30))
    tp = torch.distributed.get_world_size()
    return finetune(RunConfig(plan=plan), cfg, out=Path(work) / f"ft_t{tp}", progress=False)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_full_spd_finetune_lowers_held_out_loss(tmp_path):
    emulated = run_ranks(_smollm2_finetune, 1, str(tmp_path), tp=1, timeout=1500)[0]
    real_tp = run_ranks(_smollm2_finetune, 3, str(tmp_path), tp=3, timeout=1500)[0]
    for r in (emulated, real_tp):
        assert r["plan_spd_ratio"] == 1.0
        assert r["held_out_loss_after"] < r["held_out_loss_before"] - 0.1, r["evals"]
    assert math.isclose(emulated["held_out_loss_before"], real_tp["held_out_loss_before"],
                        rel_tol=1e-5)
    assert torch.allclose(torch.tensor(_losses(real_tp)), torch.tensor(_losses(emulated)),
                          rtol=TP_LOSS_RTOL)
    assert math.isclose(emulated["held_out_loss_after"], real_tp["held_out_loss_after"],
                        rel_tol=TP_LOSS_RTOL)
