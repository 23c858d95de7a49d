"""What ``tools/spd.py`` runs behind its argparse: the recipe from a source model to a plan and a
recovered checkpoint, one function per subcommand.

- ``sensitivity``: load the weights, build the dense/SPD pair at the current TP, run the sweep(s)
  on calibration text, plot, report.
- ``plan``: a plan for a target SPD ratio (no model needed) or for a perplexity budget (the
  budget is measured zero-shot on calibration text, so it loads the model like ``sensitivity``).
- ``recover``: apply a plan's strategies block by block (HG, compensation fit, then B2B unless
  ``b2b`` is None; recover.py) and save a megatron-spd checkpoint with the plan, what was done,
  and the dense origin inside.

Every function runs on every rank (``torchrun``) or in one process (the T=1 emulation), sets up
and tears down the process groups itself, prints on rank 0 and writes its JSON atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.compensation import CompensationConfig
from ..data.texts import SPLITS
from ..errors import check_context, check_finite
from ..files import atomic_write_json
from ..options import option
from ..parallel import distributed
from .distill import B2BConfig


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
        from ..data.texts import calibration_batches

        check_context(self.seq_len, cfg.max_seq_length, "--seq-len")
        return calibration_batches(tokenizer, self.samples, self.seq_len, self.source,
                                   split=self.split, text_field=self.text_field)


def _say(*a: Any) -> None:
    if distributed.is_rank0():
        print(*a, flush=True)


def _finish(report: dict, json_out: Optional[str | Path]) -> dict:
    if json_out and distributed.is_rank0():
        atomic_write_json(json_out, report)
    return report


def _dense_inputs(source, calib: Calibration, groups: Optional[int], **source_options):
    """(dense model, SPD model, calibration tokens, dense block inputs); ``source_options``:
    ``load_weights``' tokenizer/verify."""
    from ..loading.sources import load_weights
    from . import activations
    from .sensitivity import build_pair

    cfg, full, tok, src_plan = load_weights(source, **source_options)
    tokens = calib.batches(tok, cfg)
    dense, spd = build_pair(cfg, full, groups or src_plan.groups)
    xs = activations.block_inputs(dense, tokens, micro_batch=calib.micro_batch)
    return dense, spd, tokens, xs


def run_sensitivity(source: str | Path | None = None, calib: Calibration = Calibration(), *,
                groups: Optional[int] = None, mode: str = "cumulative",
                tp: Optional[int] = None, json_out: Optional[str | Path] = None,
                png: Optional[str | Path] = None, tokenizer: Optional[str | Path] = None,
                verify: bool = True) -> dict:
    """Per-block sensitivity of ``source`` at G = ``groups`` (default: the source plan's) by one
    sweep ``mode`` (sensitivity.MODES) or ``"all"`` of them; the report is the sweep's dict, or
    ``{mode: dict}`` for all."""
    from . import sensitivity as sens

    modes = list(sens.MODES) if mode == "all" else [mode]
    with distributed.running(tp):
        dense, spd, tokens, xs = _dense_inputs(source, calib, groups, tokenizer=tokenizer,
                                               verify=verify)
        results = [sens.sweep(dense, spd, tokens, mode=m, dense_inputs=xs,
                              micro_batch=calib.micro_batch) for m in modes]
        report = results[0].to_dict() if len(results) == 1 else \
            {r.mode: r.to_dict() for r in results}
        check_finite(report, "the sensitivity sweep")
        for r in results:
            _say(f"{r.mode}: baseline ppl {r.baseline_ppl:.3f}; sensitivity per block:")
            _say("  " + " ".join(f"{i}:{s:.3g}" for i, s in enumerate(r.sensitivity)))
        if png and distributed.is_rank0():
            sens.plot(results, png)
        return _finish(report, json_out)


def run_plan(sensitivity_json: str | Path, out: str | Path, *, ratio: Optional[float] = None,
         max_ppl_increase: Optional[float] = None, strategy: str = "auto",
         t1: Optional[float] = None, t2: Optional[float] = None,
         compensation: CompensationConfig = CompensationConfig(),
         source: str | Path | None = None, calib: Calibration = Calibration(),
         tp: Optional[int] = None, json_out: Optional[str | Path] = None,
         tokenizer: Optional[str | Path] = None, verify: bool = True,
         overwrite: bool = False) -> dict:
    """Write the plan for a target ``ratio`` or a ``max_ppl_increase`` (exactly one) to ``out``
    (an existing plan there only with ``overwrite``, anything else never); the perplexity
    budget is measured zero-shot on ``source``'s calibration text (without compensation, which
    is fitted later). ``compensation`` goes to every SPD block."""
    from ..core.plan import PLAN_OUTPUT
    from ..files import check_output
    from . import autoplan
    from .sensitivity import Sensitivity

    if (ratio is None) == (max_ppl_increase is None):
        raise ValueError("give exactly one of ratio and max_ppl_increase")
    check_output(out, PLAN_OUTPUT, overwrite=overwrite)
    sens = Sensitivity.load(sensitivity_json)
    with distributed.running(tp):
        if ratio is not None:
            n = autoplan.n_for_ratio(sens.num_layers, ratio)
        else:
            dense, spd, tokens, xs = _dense_inputs(source, calib, sens.groups,
                                                   tokenizer=tokenizer, verify=verify)
            measure = autoplan.zs_measure(dense, spd, tokens, xs, calib.micro_batch)
            n, ppl = autoplan.n_for_max_ppl(sens, max_ppl_increase, measure)
            check_finite({"zs_calibration_ppl": ppl}, "the perplexity budget")
            _say(f"{n} SPD blocks keep zero-shot calibration ppl at {ppl:.3f} "
                 f"(baseline {sens.baseline_ppl:.3f}, allowed +{max_ppl_increase})")
        result = autoplan.make_plan(sens, n_spd=n, strategy=strategy, t1=t1, t2=t2,
                                    compensation=compensation)
        if max_ppl_increase is not None:
            result.extra["provenance"].update(max_ppl_increase=max_ppl_increase,
                                              zs_calibration_ppl=ppl)
        if distributed.is_rank0():
            result.save(out)
        _say(f"wrote {out}: SPD blocks {result.spd_blocks} ({result.spd_ratio:.0%}), strategies "
             f"{ {i: result.strategies[i] for i in result.spd_blocks} }")
        return _finish(result.to_dict(), json_out)


def run_recover(plan_json: str | Path, out: str | Path, *, source: str | Path | None = None,
            calib: Calibration = Calibration(), b2b: Optional[B2BConfig] = B2BConfig(),
            hg_mlp: Optional[str] = None, tp: Optional[int] = None,
            json_out: Optional[str | Path] = None, tokenizer: Optional[str | Path] = None,
            verify: bool = True, overwrite: bool = False) -> dict:
    """Block by block: HG on the plan's ``hg`` blocks (``hg_mlp``: headgroup.MLP_MODES, None =
    apply_plan's default), the closed-form fit of the compensation the plan gives, then (unless
    ``b2b`` is None) B2B on its ``b2b`` and ``hg`` blocks; saves the checkpoint at ``out``
    (checked first: an existing one of ours is replaced only with ``overwrite``)."""
    from ..checkpoint.store import check_output_dir, save_checkpoint
    from ..core.plan import SPDPlan
    from ..loading.sources import dense_origin, load_weights
    from . import autoplan

    check_output_dir(out, overwrite)
    with distributed.running(tp):
        cfg, full, tok, _ = load_weights(source, tokenizer=tokenizer, verify=verify)
        wanted = SPDPlan.load(plan_json)
        hg = {} if hg_mlp is None else {"hg_mlp": hg_mlp}
        tokens = calib.batches(tok, cfg)
        model, _, done = autoplan.apply_plan(cfg, full, wanted, tokens, b2b=b2b,
                                             micro_batch=calib.micro_batch, **hg)
        check_finite(done.extra, "the recovery")  # before a diverged model is saved
        save_checkpoint(model, out, config=cfg, plan=done, tokenizer=tok,
                        dense_source=dense_origin(source), overwrite=overwrite)
        _say(f"wrote {out}: {len(done.spd_blocks)}/{done.num_layers} SPD blocks, G={done.groups}")
        return _finish({"checkpoint": str(out), "plan": done.to_dict()}, json_out)
