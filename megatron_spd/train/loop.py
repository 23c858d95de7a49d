"""Fine-tune an SPD checkpoint end to end: open, train, evaluate, checkpoint, resume, report.

``finetune(source, out=...)`` is what ``tools/finetune.py`` runs on every rank:
1. If ``save_dir`` holds a training checkpoint, resume from it (model from that checkpoint,
   optimizer/schedule/RNG from its trainer files, data order from the step number); otherwise
   open ``source`` with its own plan (or ``plan``).
2. Optionally open the teacher: the source's dense origin (``sources.dense_origin``: the
   model itself, or the original a B2B/HG/fine-tuned checkpoint records) with a dense plan of
   the same G (the issue's "logit distillation from the dense teacher").
3. Text through ``megatron_spd.data.texts`` (bundled Wikipedia paragraphs or a local file): the
   ``train`` split is cut into [N, seq_len + 1] blocks, held-out loss is measured on the
   ``eval`` split, which never overlaps it.
4. Train with tqdm on rank 0 (loss, lr, tokens/s) and a log line every ``log_interval`` steps;
   held-out loss every ``eval_interval`` steps; a resumable checkpoint every ``save_interval``.
5. Save the fine-tuned model as a plain megatron-spd checkpoint at ``out`` (serves unchanged
   with tools/generate.py and tools/evaluate.py), the report JSON and the loss-curve PNG.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from ..checkpoint.store import check_output_dir, save_checkpoint
from ..core.plan import SPDPlan
from ..data import texts as data
from ..errors import InputError, MetricError, check_context, check_finite
from ..files import atomic_write_json
from ..loading.open_model import open_model
from ..loading.sources import dense_origin
from ..options import option
from ..parallel import distributed
from ..parallel.distributed import dp_rank_size, is_rank0
from . import state
from .batches import SampleOrder
from .optim import OptimConfig
from .trainer import StepConfig, Trainer


@dataclass
class FinetuneConfig(StepConfig, OptimConfig):
    """Everything a fine-tuning run is configured by, flat (one field per command-line option of
    tools/finetune.py): the step fields come from ``StepConfig``, the optimizer and lr schedule
    fields from ``OptimConfig``."""

    steps: int = option(200, "optimizer steps")
    seq_len: int = option(256, "tokens per training sequence")
    seed: int = option(1234, "seed of the data order (and of the model's RNG)")
    eval_samples: int = option(32, "held-out sequences of seq_len + 1 tokens")
    eval_interval: int = option(0, "steps between held-out evaluations (0 = only before and "
                                   "after training)")
    save_interval: int = option(0, "steps between training checkpoints (0 = none in between)")
    log_interval: int = option(10, "steps between log lines")
    keep: int = option(2, "training checkpoints kept in the save directory (0 = all)")

    def __post_init__(self) -> None:
        StepConfig.__post_init__(self)
        OptimConfig.__post_init__(self)
        if self.steps < 1 or self.seq_len < 2:
            raise ValueError(f"need steps >= 1 and seq_len >= 2, got {self.steps}, {self.seq_len}")
        if self.eval_samples < 1 or min(self.eval_interval, self.save_interval,
                                        self.log_interval, self.keep) < 0:
            raise ValueError("need --eval-samples >= 1 and --eval-interval, --save-interval, "
                             "--log-interval, --keep >= 0")

    def optim(self) -> OptimConfig:
        return _part(self, OptimConfig)

    def step_config(self) -> StepConfig:
        return _part(self, StepConfig)


def _part(cfg: FinetuneConfig, cls: type):
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def token_blocks(tokenizer, source, split: str, seq_len: int, limit: Optional[int] = None,
                 text_field: str = "text") -> torch.Tensor:
    """Non-overlapping [N, seq_len + 1] blocks of a split's token stream (N <= ``limit``)."""
    texts = data.load_texts(source, split=split, text_field=text_field)
    n_tokens = None if limit is None else limit * (seq_len + 1)
    try:
        stream = data.token_stream(tokenizer, texts, n_tokens)
    except ValueError:
        stream = data.token_stream(tokenizer, texts)
    n = stream.numel() // (seq_len + 1)
    if n < 1:
        raise InputError(f"split {split!r} of {source or 'the default corpus'} has "
                         f"{stream.numel()} tokens, fewer than one {seq_len + 1}-token block; "
                         "use more text or a shorter --seq-len")
    return stream[:n * (seq_len + 1)].view(n, seq_len + 1)


def _settings(cfg: FinetuneConfig, source, data_source, teacher_source) -> dict[str, Any]:
    _, dp = dp_rank_size()
    return {"config": dataclasses.asdict(cfg), "source": None if source is None else str(source),
            "data": None if data_source is None else str(data_source),
            "teacher": None if teacher_source is None else str(teacher_source),
            "tp": parallel_state.get_tensor_model_parallel_world_size(), "dp": dp}


def _check_resume(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The run settings that change the trajectory must match the resumed run's."""
    fields = ("seq_len", "micro_batch", "grad_accum", "lr", "min_lr", "warmup_steps",
              "decay_style", "steps", "distill", "temperature", "seed", "weight_decay", "clip_grad")
    diff = [f"{k}: saved {saved['config'][k]} vs now {now['config'][k]}" for k in fields
            if saved["config"][k] != now["config"][k]]
    diff += [f"{k}: saved {saved[k]} vs now {now[k]}" for k in ("data", "teacher", "dp")
             if saved[k] != now[k]]
    if diff:
        raise state.ResumeError("the save directory holds a run with other settings ("
                                + "; ".join(diff) + "); pass the same settings to resume, or "
                                "use a new --save directory to start over")


def finetune(source: str | Path | None, *, out: str | Path, cfg: FinetuneConfig,
             save_dir: str | Path | None = None, plan: SPDPlan | str | Path | None = None,
             teacher_source: str | Path | None = None, data_source: str | Path | None = None,
             text_field: str = "text", sequence_parallel: bool = False,
             json_out: str | Path | None = None, plot: str | Path | None = None,
             progress: bool = True, stop_after: Optional[int] = None,
             tokenizer: str | Path | None = None, verify: bool = True,
             overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune ``source`` (None = SmolLM2) and save it at ``out``; every rank calls it.
    ``tokenizer``/``verify``: how ``open_model`` reads the source and the teacher. ``out`` is
    checked first: an existing checkpoint of ours there is replaced only with ``overwrite``.

    ``stop_after`` ends the run after that many steps as if killed (after any checkpoint due);
    tests use it to check that a resume continues the same trajectory. Returns the report.
    """
    check_output_dir(out, overwrite)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel and tp > 1 and cfg.seq_len % tp:
        raise InputError(f"sequence parallel needs --seq-len divisible by TP={tp}, got "
                         f"{cfg.seq_len}")
    resume = state.latest(save_dir)
    origin = str(teacher_source) if teacher_source else dense_origin(source)  # recorded in `out`
    teacher_source = origin
    settings = _settings(cfg, source, data_source, teacher_source if cfg.distill > 0 else None)
    if resume is not None:
        start, ckpt = resume
        loaded = open_model(ckpt, sequence_parallel=sequence_parallel, verify=verify)
        if plan is not None:
            want = plan if isinstance(plan, SPDPlan) else SPDPlan.load(plan)
            if want.strategies != loaded.plan.strategies or want.groups != loaded.plan.groups:
                raise state.ResumeError(f"{ckpt} was trained with another plan than --plan; "
                                        "drop --plan to resume, or use a new --save directory")
    else:
        start, ckpt = 0, None
        loaded = open_model(source, plan=plan, sequence_parallel=sequence_parallel,
                            tokenizer=tokenizer, verify=verify)
    check_context(cfg.seq_len, loaded.config.max_seq_length, "--seq-len")
    loaded.dense_source = origin  # the fine-tuned weights serve SPD; record what they came from
    teacher = None
    if cfg.distill > 0:
        dense = SPDPlan.dense(loaded.config.num_layers, loaded.plan.groups)
        teacher = open_model(teacher_source, plan=dense, sequence_parallel=sequence_parallel,
                             tokenizer=tokenizer, verify=verify).model
    train = token_blocks(loaded.tokenizer, data_source, "train", cfg.seq_len, None, text_field)
    held_out = token_blocks(loaded.tokenizer, data_source, "eval", cfg.seq_len,
                            cfg.eval_samples, text_field)
    trainer = Trainer(loaded.model, cfg.step_config(), cfg.optim(), cfg.steps, teacher)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if ckpt is not None:
        saved = state.load(ckpt, trainer)
        _check_resume(saved, settings)
        history, evals = saved["history"], saved["evals"]
    else:
        evals.append({"step": 0, "loss": trainer.evaluate(held_out)})
    order = SampleOrder(train, seed=cfg.seed)
    _, dp = dp_rank_size()
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * dp * cfg.seq_len
    _log(f"fine-tuning {cfg.steps} steps from step {start}: {train.shape[0]} train blocks x "
         f"{cfg.seq_len} tokens, {tokens_per_step} tokens/step, plan {loaded.plan.spd_ratio:.0%} "
         f"SPD (G={loaded.plan.groups}), TP={settings['tp']} DP={dp}, distill={cfg.distill}; "
         f"held-out loss {evals[0]['loss']:.4f}")
    bar = distributed.progress(total=cfg.steps, initial=start, desc="fine-tune", unit="step",
                               enabled=progress)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        m = trainer.train_step(order, step)
        m.update(step=step + 1, tokens_per_s=tokens_per_step / (time.perf_counter() - t0))
        if not math.isfinite(m["loss"]):
            raise MetricError(f"loss is {m['loss']} at step {step + 1}; lower --lr")
        history.append(m)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                        tok_s=f"{m['tokens_per_s']:.0f}")
        n = step + 1
        if cfg.log_interval and n % cfg.log_interval == 0:
            _log(f"step {n}/{cfg.steps} loss {m['loss']:.4f} (lm {m['lm_loss']:.4f} kd "
                 f"{m['kd_loss']:.4f}) grad-norm {m['grad_norm']:.3f} lr {m['lr']:.3e} "
                 f"{m['tokens_per_s']:.0f} tokens/s", bar)
        if cfg.eval_interval and n % cfg.eval_interval == 0 and n < cfg.steps:
            evals.append({"step": n, "loss": trainer.evaluate(held_out)})
            _log(f"step {n}: held-out loss {evals[-1]['loss']:.4f}", bar)
        if save_dir is not None and cfg.save_interval and n % cfg.save_interval == 0 \
                and n < cfg.steps:
            state.save(save_dir, n, loaded=loaded, trainer=trainer, keep=cfg.keep,
                       state={**settings, "history": history, "evals": evals})
    bar.close()
    report: dict[str, Any] = {**settings, "plan_spd_ratio": loaded.plan.spd_ratio,
                              "start_step": start, "history": history, "evals": evals}
    if end < cfg.steps:
        return {**report, "stopped_at": end}
    evals.append({"step": cfg.steps, "loss": trainer.evaluate(held_out)})
    check_finite(evals, "the held-out evaluation")  # before a diverged model is saved
    save_checkpoint(loaded.model, out, config=loaded.config, plan=loaded.plan,
                    tokenizer=loaded.tokenizer, dense_source=origin, overwrite=overwrite)
    report.update(out=str(out), held_out_loss_before=evals[0]["loss"],
                  held_out_loss_after=evals[-1]["loss"],
                  held_out_ppl_before=math.exp(evals[0]["loss"]),
                  held_out_ppl_after=math.exp(evals[-1]["loss"]))
    _log(f"done: held-out loss {evals[0]['loss']:.4f} -> {evals[-1]['loss']:.4f} (ppl "
         f"{report['held_out_ppl_before']:.2f} -> {report['held_out_ppl_after']:.2f}); saved {out}")
    if is_rank0():
        if json_out is not None:
            atomic_write_json(json_out, report)
        if plot is not None:
            from .plots import plot_curves

            plot_curves(history, evals, plot)
    return report


def _log(msg: str, bar=None) -> None:
    if not is_rank0():
        return
    if bar is not None:
        bar.write(f"[finetune] {msg}")
    else:
        print(f"[finetune] {msg}", flush=True)
