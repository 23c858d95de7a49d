"""What ``tools/spd.py`` runs behind its argparse: the recipe from a source model to a plan and a
recovered checkpoint, one function per subcommand.

- ``run_sensitivity``: load the weights, build the dense/SPD pair at the current TP, run the
  sweep(s) on calibration text, plot, report.
- ``run_plan``: a plan for a target SPD ratio (no model needed) or for a perplexity budget (the
  budget is measured zero-shot on calibration text, so it loads the model like
  ``run_sensitivity``).
- ``run_recover``: apply a plan's strategies block by block (HG, compensation fit, then B2B unless
  ``b2b`` is None; recover.py) and save a megatron-spd checkpoint with the plan, what was done,
  and the dense origin inside; ``recover_and_save`` is that step on weights already in memory
  (the research scripts call it), with the same check that the result is finite.

Every ``run_*`` function takes the run's ``RunConfig`` (source, TP, JSON report, overwrite), runs
on every rank (``torchrun``) or in one process (the T=1 emulation), sets up and tears down the
process groups itself, logs (rank 0 shows it) and writes its JSON atomically.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.save import check_output_dir, save_checkpoint
from ..core.config import ModelConfig
from ..core.plan import PLAN_OUTPUT, SPDPlan
from ..data.texts import SPLITS, calibration_batches
from ..errors import check_context, check_finite
from ..files import check_output
from ..loading.run_config import RunConfig
from ..loading.sources import dense_origin
from ..options import option
from ..parallel import distributed
from . import activations, autoplan
from . import sensitivity as sens
from .autoplan import CompensationConfig
from .distill import B2BConfig
from .recover import B2BBudget

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """The calibration text every recipe step sees (sensitivity sweep, perplexity budget, HG
    statistics, compensation fit, B2B); the defaults are the recovery recipe's
    (docs/recovery.md; docs/recipe.md's sweep and table used 4 samples)."""

    samples: int = option(32, "calibration sequences")
    seq_len: int = option(512, "tokens per calibration sequence")
    source: Optional[str] = option(None, "calibration .txt/.jsonl/.parquet (default: the bundled "
                                         "Wikipedia paragraphs)", flag="--calib", type=str,
                                   metavar="FILE")
    split: str = option("calib", "document split of the calibration text (data.SPLITS; "
                                 "disjoint from the evaluation split)",
                        flag="--calib-split", choices=tuple(SPLITS))
    text_field: str = option("text", "document field of a .jsonl/.parquet file")
    micro_batch: int = option(4, "sequences per forward pass of the sweep and of the HG "
                                 "statistics (memory vs speed; results do not depend on it)")

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2 or self.micro_batch < 1:
            raise ValueError(f"need --samples >= 1, --seq-len >= 2 and --micro-batch >= 1, got "
                             f"{self.samples}, {self.seq_len} and {self.micro_batch}")

    def batches(self, tokenizer, cfg):
        """``[samples, seq_len]`` token ids (data.calibration_batches) for the model of ``cfg``
        (ContextError first if ``seq_len`` exceeds its context)."""
        check_context(self.seq_len, cfg.max_seq_length, "--seq-len")
        return calibration_batches(tokenizer, self.samples, self.seq_len, self.source,
                                   split=self.split, text_field=self.text_field)


def _dense_inputs(run: RunConfig, calib: Calibration, groups: Optional[int]):
    """(dense model, SPD model, calibration tokens, dense block inputs) of ``run.source``."""
    cfg, full, tok, src_plan = run.load_weights()
    tokens = calib.batches(tok, cfg)
    dense, spd = sens.build_pair(cfg, full, groups or src_plan.groups)
    xs = activations.block_inputs(dense, tokens, micro_batch=calib.micro_batch)
    return dense, spd, tokens, xs


def run_sensitivity(run: RunConfig = RunConfig(), calib: Calibration = Calibration(), *,
                    groups: Optional[int] = None, mode: str = "cumulative",
                    png: Optional[str | Path] = None) -> dict:
    """Per-block sensitivity of ``run.source`` at G = ``groups`` (default: the source plan's) by
    one sweep ``mode`` (sensitivity.MODES) or ``"all"`` of them; the report is the sweep's dict,
    or ``{mode: dict}`` for all."""
    modes = list(sens.MODES) if mode == "all" else [mode]
    with run.running():
        dense, spd, tokens, xs = _dense_inputs(run, calib, groups)
        results = [sens.sweep(dense, spd, tokens, mode=m, dense_inputs=xs,
                              micro_batch=calib.micro_batch) for m in modes]
        report = results[0].to_dict() if len(results) == 1 else \
            {r.mode: r.to_dict() for r in results}
        check_finite(report, "the sensitivity sweep")
        for r in results:
            log.info(f"{r.mode}: baseline ppl {r.baseline_ppl:.3f}; sensitivity per block:")
            log.info("  " + " ".join(f"{i}:{s:.3g}" for i, s in enumerate(r.sensitivity)))
        if png and distributed.is_rank0():
            sens.plot(results, png)
        return run.write_report(report)


def run_plan(sensitivity_json: str | Path, out: str | Path, run: RunConfig = RunConfig(),
             calib: Calibration = Calibration(), *, ratio: Optional[float] = None,
             max_ppl_increase: Optional[float] = None, strategy: str = "auto",
             t1: Optional[float] = None, t2: Optional[float] = None,
             compensation: CompensationConfig = CompensationConfig()) -> dict:
    """Write the plan for a target ``ratio`` or a ``max_ppl_increase`` (exactly one) to ``out``
    (an existing plan there only with ``run.overwrite``, anything else never); the perplexity
    budget is measured zero-shot on ``run.source``'s calibration text (without compensation,
    which is fitted later). ``compensation`` goes to every SPD block."""
    if (ratio is None) == (max_ppl_increase is None):
        raise ValueError("give exactly one of ratio and max_ppl_increase")
    check_output(out, PLAN_OUTPUT, overwrite=run.overwrite)
    sensitivity = sens.Sensitivity.load(sensitivity_json)
    with run.running():
        if ratio is not None:
            n = autoplan.n_for_ratio(sensitivity.num_layers, ratio)
        else:
            dense, spd, tokens, xs = _dense_inputs(run, calib, sensitivity.groups)
            measure = autoplan.zs_measure(dense, spd, tokens, xs, calib.micro_batch)
            n, ppl = autoplan.n_for_max_ppl(sensitivity, max_ppl_increase, measure)
            check_finite({"zs_calibration_ppl": ppl}, "the perplexity budget")
            log.info(f"{n} SPD blocks keep zero-shot calibration ppl at {ppl:.3f} "
                     f"(baseline {sensitivity.baseline_ppl:.3f}, allowed +{max_ppl_increase})")
        result = autoplan.make_plan(sensitivity, n_spd=n, strategy=strategy, t1=t1, t2=t2,
                                    compensation=compensation)
        if max_ppl_increase is not None:
            result.extra["provenance"].update(max_ppl_increase=max_ppl_increase,
                                              zs_calibration_ppl=ppl)
        if distributed.is_rank0():
            result.save(out)
        log.info(f"wrote {out}: SPD blocks {result.spd_blocks} ({result.spd_ratio:.0%}), "
                 f"strategies { {i: result.strategies[i] for i in result.spd_blocks} }")
        return run.write_report(result.to_dict())


def recover_and_save(cfg: ModelConfig, full, tokenizer, plan: SPDPlan, tokens: torch.Tensor,
                     out: str | Path, *, b2b: Optional[B2BConfig] = B2BConfig(),
                     hg_mlp: Optional[str] = None,
                     micro_batch: int = Calibration().micro_batch,
                     dense_source: Optional[str] = None, overwrite: bool = False,
                     b2b_budget: Optional[dict[int, B2BBudget]] = None) -> SPDPlan:
    """``autoplan.recover_with_plan`` of ``plan`` to the full weights on calibration ``tokens``
    (``hg_mlp``: headgroup.MLP_MODES, None = recover_with_plan's default; ``b2b_budget``: the
    blocks with their own B2B budget), refused if any record is not finite (before a diverged
    model is saved), then saved at ``out`` with ``dense_source`` as its origin; returns the plan
    with what was done. Every rank calls it, inside the process groups."""
    hg = {} if hg_mlp is None else {"hg_mlp": hg_mlp}
    model, _, done = autoplan.recover_with_plan(cfg, full, plan, tokens, b2b=b2b,
                                         micro_batch=micro_batch, b2b_budget=b2b_budget, **hg)
    check_finite(done.extra, "the recovery")
    save_checkpoint(model, out, config=cfg, plan=done, tokenizer=tokenizer,
                    dense_source=dense_source, overwrite=overwrite)
    return done


def run_recover(plan_json: str | Path, out: str | Path, run: RunConfig = RunConfig(),
                calib: Calibration = Calibration(), *, b2b: Optional[B2BConfig] = B2BConfig(),
                hg_mlp: Optional[str] = None) -> dict:
    """Block by block: HG on the plan's ``hg`` blocks, the closed-form fit of the compensation
    the plan gives, then (unless ``b2b`` is None) B2B on its ``b2b`` and ``hg`` blocks
    (``recover_and_save``); saves the checkpoint at ``out`` (checked first: an existing one of
    ours is replaced only with ``run.overwrite``)."""
    check_output_dir(out, run.overwrite)
    with run.running():
        cfg, full, tok, _ = run.load_weights()
        tokens = calib.batches(tok, cfg)
        done = recover_and_save(cfg, full, tok, SPDPlan.load(plan_json), tokens, out, b2b=b2b,
                                hg_mlp=hg_mlp, micro_batch=calib.micro_batch,
                                dense_source=dense_origin(run.source), overwrite=run.overwrite)
        log.info(f"wrote {out}: {len(done.spd_blocks)}/{done.num_layers} SPD blocks, "
                 f"G={done.groups}")
        return run.write_report({"checkpoint": str(out), "plan": done.to_dict()})
