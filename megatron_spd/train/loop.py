"""Fine-tune an SPD checkpoint end to end: open, train, evaluate, checkpoint, resume, report.

``finetune(run, cfg, out=...)`` is what ``tools/finetune.py`` runs on every rank. Its parts are
the methods of ``FinetuneJob``, in the manner of torchtitan's ``Trainer``: the constructor sets
up (steps 1-3), ``train_step`` is one step, ``train`` the loop (step 4), ``state_dict`` what a
resumable checkpoint holds, ``finalize`` step 5. ``FinetuneConfig`` is the one source of the
run's defaults.
1. If ``save_dir`` holds a training checkpoint, resume from it (model from that checkpoint,
   optimizer/schedule/RNG from its trainer files, data order from the step number); otherwise
   open ``run.source`` with its own plan (or ``run.plan``).
2. Optionally open the teacher: the source's dense origin (``sources.dense_origin``: the
   model itself, or the original a B2B/HG/fine-tuned checkpoint records) with a dense plan of
   the same G (the issue's "logit distillation from the dense teacher").
3. Text through ``megatron_spd.data.texts`` (bundled Wikipedia paragraphs or a local file): the
   ``train`` split is cut into [N, seq_len + 1] blocks, held-out loss is measured on the
   ``eval`` split, which never overlaps it.
4. Train with tqdm on rank 0 (loss, lr, tokens/s) and a log line every ``log_interval`` steps
   (``logging``; the command's handler writes around the bar);
   held-out loss every ``eval_interval`` steps; a resumable checkpoint every ``save_interval``.
5. Save the fine-tuned model as a plain megatron-spd checkpoint at ``out`` (serves unchanged
   with tools/generate.py and tools/evaluate.py), the report JSON and the loss-curve PNG.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from ..checkpoint.save import check_output_dir, save_checkpoint
from ..core.plan import SPDPlan
from ..data import texts as data
from ..errors import InputError, MetricError, check_context, check_finite
from ..files import write_report
from ..loading.run_config import RunConfig
from ..loading.sources import dense_origin
from ..options import option
from ..parallel import distributed
from ..parallel.distributed import dp_rank_size, is_rank0
from . import state
from .batches import SampleOrder
from .optim import OptimConfig
from .plots import plot_curves
from .trainer import StepConfig, Trainer

log = logging.getLogger(__name__)


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
              "decay_style", "steps", "distill", "temperature", "distill_on", "seed",
              "weight_decay", "clip_grad")
    # a save from before a field existed ran with that field's default
    was = {**dataclasses.asdict(FinetuneConfig()), **saved["config"]}
    diff = [f"{k}: saved {was[k]} vs now {now['config'][k]}" for k in fields
            if was[k] != now["config"][k]]
    diff += [f"{k}: saved {saved[k]} vs now {now[k]}" for k in ("data", "teacher", "dp")
             if saved[k] != now[k]]
    if diff:
        raise state.ResumeError("the save directory holds a run with other settings ("
                                + "; ".join(diff) + "); pass the same settings to resume, or "
                                "use a new --save directory to start over")


class FinetuneJob:
    """One fine-tuning run on every rank (inside the process groups): the constructor opens the
    model (or resumes), the teacher and the data; ``train`` runs the steps; ``finalize`` saves.

    ``out`` is checked first: an existing checkpoint of ours there is replaced only with
    ``run.overwrite``. ``run.tokenizer``/``run.verify``: how the source and the teacher are read.
    ``teacher``: the distillation teacher's source (default: the source's dense origin).
    ``data``: the training/evaluation text (default: the bundled Wikipedia paragraphs).
    """

    def __init__(self, run: RunConfig, cfg: FinetuneConfig, *, out: str | Path,
                 save_dir: str | Path | None = None, teacher: str | Path | None = None,
                 data: str | Path | None = None, text_field: str = "text",
                 sequence_parallel: bool = False, progress: bool = True) -> None:
        check_output_dir(out, run.overwrite)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if sequence_parallel and tp > 1 and cfg.seq_len % tp:
            raise InputError(f"sequence parallel needs --seq-len divisible by TP={tp}, got "
                             f"{cfg.seq_len}")
        self.run, self.cfg, self.out, self.save_dir = run, cfg, out, save_dir
        self.progress = progress
        resume = state.latest(save_dir)
        self.origin = str(teacher) if teacher else dense_origin(run.source)  # recorded in `out`
        self.settings = _settings(cfg, run.source, data, self.origin if cfg.distill > 0 else None)
        self.start, ckpt = resume if resume is not None else (0, None)
        self.loaded = self._open(ckpt, sequence_parallel)
        check_context(cfg.seq_len, self.loaded.config.max_seq_length, "--seq-len")
        self.loaded.dense_source = self.origin  # the fine-tuned weights serve SPD: their origin
        teacher_model = None
        if cfg.distill > 0:
            dense = SPDPlan.dense(self.loaded.config.num_layers, self.loaded.plan.groups)
            teacher_model = run.replace(source=self.origin).open_model(
                plan=dense, sequence_parallel=sequence_parallel).model
        tok = self.loaded.tokenizer
        self.order = SampleOrder(token_blocks(tok, data, "train", cfg.seq_len, None, text_field),
                                 seed=cfg.seed)
        self.held_out = token_blocks(tok, data, "eval", cfg.seq_len, cfg.eval_samples, text_field)
        self.trainer = Trainer(self.loaded.model, cfg.step_config(), cfg.optim(), cfg.steps,
                               teacher_model)
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        if ckpt is not None:
            saved = state.load(ckpt, self.trainer)
            _check_resume(saved, self.settings)
            self.history, self.evals = saved["history"], saved["evals"]
        else:
            self.evals.append({"step": 0, "loss": self.trainer.evaluate(self.held_out)})
        _, dp = dp_rank_size()
        self.tokens_per_step = cfg.micro_batch * cfg.grad_accum * dp * cfg.seq_len

    def _open(self, ckpt: Optional[Path], sequence_parallel: bool):
        """The model: from the training checkpoint being resumed (whose plan ``run.plan``, if
        given, must be), else from the source."""
        if ckpt is None:
            return self.run.open_model(sequence_parallel=sequence_parallel)
        loaded = self.run.replace(source=ckpt, tokenizer=None).open_model(
            plan=None, sequence_parallel=sequence_parallel)
        if self.run.plan is not None:
            plan = self.run.plan
            want = plan if isinstance(plan, SPDPlan) else SPDPlan.load(plan)
            if want.strategies != loaded.plan.strategies or want.groups != loaded.plan.groups:
                raise state.ResumeError(f"{ckpt} was trained with another plan than --plan; "
                                        "drop --plan to resume, or use a new --save directory")
        return loaded

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based): its metrics, appended to the history."""
        t0 = time.perf_counter()
        m = self.trainer.train_step(self.order, step)
        m.update(step=step + 1, tokens_per_s=self.tokens_per_step / (time.perf_counter() - t0))
        if not math.isfinite(m["loss"]):
            raise MetricError(f"loss is {m['loss']} at step {step + 1}; lower --lr")
        self.history.append(m)
        return m

    def state_dict(self) -> dict[str, Any]:
        """The run's settings and curves: what a training checkpoint stores beside the model
        and the optimizer, and what a resume checks and continues."""
        return {**self.settings, "history": self.history, "evals": self.evals}

    def train(self, stop_after: Optional[int] = None) -> int:
        """The steps from the start (or resumed) step to ``cfg.steps``, with the progress bar, a
        log line every ``log_interval``, held-out loss every ``eval_interval`` and a training
        checkpoint every ``save_interval`` steps. ``stop_after``: end after that many steps as
        if killed (after any checkpoint due; tests check that a resume continues the same
        trajectory). Returns the step it ended after."""
        cfg, loaded = self.cfg, self.loaded
        _, dp = dp_rank_size()
        log.info(f"[finetune] fine-tuning {cfg.steps} steps from step {self.start}: "
                 f"{self.order.samples.shape[0]} train blocks x {cfg.seq_len} tokens, "
                 f"{self.tokens_per_step} tokens/step, plan {loaded.plan.spd_ratio:.0%} SPD "
                 f"(G={loaded.plan.groups}), TP={self.settings['tp']} DP={dp}, "
                 f"distill={cfg.distill}; held-out loss {self.evals[0]['loss']:.4f}")
        bar = distributed.progress(total=cfg.steps, initial=self.start, desc="fine-tune",
                                   unit="step", enabled=self.progress)
        end = cfg.steps if stop_after is None else min(cfg.steps, self.start + stop_after)
        for step in range(self.start, end):
            m = self.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            n = step + 1
            if cfg.log_interval and n % cfg.log_interval == 0:
                log.info(f"[finetune] step {n}/{cfg.steps} loss {m['loss']:.4f} (lm "
                         f"{m['lm_loss']:.4f} kd {m['kd_loss']:.4f}) grad-norm "
                         f"{m['grad_norm']:.3f} lr {m['lr']:.3e} {m['tokens_per_s']:.0f} "
                         "tokens/s")
            if cfg.eval_interval and n % cfg.eval_interval == 0 and n < cfg.steps:
                self.evals.append({"step": n, "loss": self.trainer.evaluate(self.held_out)})
                log.info(f"[finetune] step {n}: held-out loss {self.evals[-1]['loss']:.4f}")
            if self.save_dir is not None and cfg.save_interval and n % cfg.save_interval == 0 \
                    and n < cfg.steps:
                state.save(self.save_dir, n, loaded=loaded, trainer=self.trainer, keep=cfg.keep,
                           state=self.state_dict())
        bar.close()
        return end

    def report(self) -> dict[str, Any]:
        return {**self.settings, "plan_spd_ratio": self.loaded.plan.spd_ratio,
                "start_step": self.start, "history": self.history, "evals": self.evals}

    def finalize(self, plot: str | Path | None = None) -> dict[str, Any]:
        """After the last step: the final held-out loss (finite, or nothing is saved), the
        fine-tuned checkpoint at ``out``, the report (to ``run.json_out``) and the loss-curve
        PNG ``plot``, both on rank 0. Returns the report."""
        cfg, loaded, out, evals = self.cfg, self.loaded, self.out, self.evals
        evals.append({"step": cfg.steps, "loss": self.trainer.evaluate(self.held_out)})
        check_finite(evals, "the held-out evaluation")  # before a diverged model is saved
        save_checkpoint(loaded.model, out, config=loaded.config, plan=loaded.plan,
                        tokenizer=loaded.tokenizer, dense_source=self.origin,
                        overwrite=self.run.overwrite)
        report = self.report()
        report.update(out=str(out), held_out_loss_before=evals[0]["loss"],
                      held_out_loss_after=evals[-1]["loss"],
                      held_out_ppl_before=math.exp(evals[0]["loss"]),
                      held_out_ppl_after=math.exp(evals[-1]["loss"]))
        log.info(f"[finetune] done: held-out loss {evals[0]['loss']:.4f} -> "
                 f"{evals[-1]['loss']:.4f} (ppl {report['held_out_ppl_before']:.2f} -> "
                 f"{report['held_out_ppl_after']:.2f}); saved {out}")
        if is_rank0():
            if self.run.json_out is not None:
                write_report(self.run.json_out, report)
            if plot is not None:
                plot_curves(self.history, evals, plot)
        return report


def finetune(run: RunConfig, cfg: FinetuneConfig, *, out: str | Path,
             save_dir: str | Path | None = None, teacher: str | Path | None = None,
             data: str | Path | None = None, text_field: str = "text",
             sequence_parallel: bool = False, plot: str | Path | None = None,
             progress: bool = True, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Fine-tune ``run.source`` (None = SmolLM2) and save it at ``out``; every rank calls it,
    inside the process groups (``run.running``). The arguments are ``FinetuneJob``'s;
    ``stop_after``: ``FinetuneJob.train``'s (the report then says ``stopped_at`` and nothing is
    saved). Returns the report."""
    job = FinetuneJob(run, cfg, out=out, save_dir=save_dir, teacher=teacher, data=data,
                      text_field=text_field, sequence_parallel=sequence_parallel,
                      progress=progress)
    end = job.train(stop_after)
    if end < cfg.steps:
        return {**job.report(), "stopped_at": end}
    return job.finalize(plot)
