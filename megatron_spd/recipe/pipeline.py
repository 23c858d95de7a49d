"""The whole recovery as one resumable run (``tools/spd.py recover``): from a dense model to the
best SPD model docs/recovery.md reports, measuring closeness to dense after every stage.

Stages, each writing into one work directory:

1. ``reference``: the dense model's top-k next-token log-probabilities on held-out text
   (``dense.json`` + ``dense.reference.safetensors``, evaluate/closeness.py);
2. ``sensitivity``: the per-block sweep (``sensitivity.json``, ``sensitivity.png``), only when
   it decides something: below 100 % SPD or with strategy ``auto``;
3. ``plan``: the plan for the SPD ratio (``plan.json``);
4. ``zero-shot``: closeness of that plan on the dense weights, before any recovery;
5. ``blockwise``: HG, the compensation fit and sequential B2B block by block (``blockwise/``);
6. ``end-to-end``: logit distillation of the whole model from the dense teacher, the loop of
   tools/finetune.py (``end-to-end/``; training checkpoints in ``end-to-end.train/``).

After each model stage: KL(dense || model), top-1 agreement and perplexity ratio with their
standard errors on the held-out text (one forward pass), printed and added to ``recover.json``;
``recover.png`` plots them per stage. A stage whose record in ``recover.json`` has the same
settings (its own and every earlier stage's) and whose outputs exist is skipped, so a rerun after
an interruption continues at the first unfinished stage; the end-to-end stage also continues from
its last training checkpoint. Changing a setting reruns the stage it belongs to and every later
one. The defaults are the measured best of docs/recovery.md (``RecoverConfig``, with
``Calibration``, ``B2BConfig`` and ``CompensationConfig`` for the recipe's own steps).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.plan import SPDPlan
from ..errors import InputError
from ..evaluate.closeness import line
from ..evaluate.run import EvalConfig, evaluate_source
from ..files import atomic_write_json, read_json_object, save_figure
from ..loading.run_config import RunConfig
from ..options import option
from ..parallel import distributed
from ..train.loop import FinetuneConfig, finetune
from . import run as recipe
from .autoplan import CompensationConfig
from .distill import B2BConfig
from .run import Calibration

STATE = "recover.json"
log = logging.getLogger(__name__)


@dataclass
class RecoverConfig:
    """What ``tools/spd.py recover`` does beyond the recipe's own settings. Defaults: the best
    rows of docs/recovery.md (strategy hg for every SPD block; end-to-end distillation of 120
    steps x 4 x 256 tokens at lr 5e-5 with 6 warm-up steps, which measured closer to dense than
    40 steps at lr 1e-4 by 0.013 +/- 0.001 nats of KL on held-out Wikipedia; the 75 % row's
    4-sequence sweep)."""

    ratio: float = option(1.0, "fraction of blocks to make SPD (the least sensitive ones)")
    strategy: str = option("hg", "strategy of every SPD block ('auto': classify by sensitivity)",
                           choices=("auto", "zs", "b2b", "hg"))
    sensitivity_samples: int = option(4, "calibration sequences of the sensitivity sweep (at "
                                         "32, tools/spd.py sensitivity's default, the sweep is "
                                         "the slowest step: up to 15 min on 2 cores)")
    e2e_tokens: int = option(120 * 4 * 256, "token budget of the end-to-end distillation "
                                           "(steps = tokens / (micro-batch x seq-len); 0 skips "
                                           "the stage)")
    e2e_seq_len: int = option(256, "tokens per end-to-end training sequence")
    e2e_micro_batch: int = option(4, "sequences per end-to-end step")
    e2e_lr: float = option(5e-5, "peak learning rate of the end-to-end stage")
    e2e_warmup_steps: int = option(6, "its linear warm-up steps")
    e2e_save_interval: int = option(10, "steps between its training checkpoints (resume points)")
    eval_text: Optional[str] = option(None, "held-out text for KL / top-1 after each stage: its "
                                            "eval split (default: the calibration source's)",
                                      type=str, metavar="FILE")
    eval_tokens: int = option(8192, "held-out tokens (eval split) for KL / top-1 after each stage")
    eval_ctx: int = option(512, "window of that evaluation")
    topk: int = option(64, "dense top-k kept per token for KL (closeness.py)")

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"--ratio must be in (0, 1], got {self.ratio}")
        if min(self.sensitivity_samples, self.e2e_seq_len, self.e2e_micro_batch,
               self.eval_tokens, self.eval_ctx, self.topk) < 1 or self.e2e_tokens < 0:
            raise ValueError("--sensitivity-samples, --e2e-seq-len, --e2e-micro-batch, "
                             "--eval-tokens, --eval-ctx and --topk must be >= 1, --e2e-tokens "
                             ">= 0")

    @property
    def e2e_steps(self) -> int:
        return self.e2e_tokens // (self.e2e_micro_batch * self.e2e_seq_len)

    def finetune_config(self):
        """The end-to-end stage as tools/finetune.py's config (docs/recovery.md's flags)."""
        return FinetuneConfig(steps=self.e2e_steps, seq_len=self.e2e_seq_len,
                              micro_batch=self.e2e_micro_batch, lr=self.e2e_lr,
                              warmup_steps=self.e2e_warmup_steps, distill=1.0, eval_samples=8,
                              save_interval=self.e2e_save_interval)

    def eval_config(self, calib: Calibration):
        return EvalConfig(tasks="none", ppl_source=self.eval_text or calib.source,
                          ppl_split="eval", text_field=calib.text_field,
                          ppl_tokens=self.eval_tokens, ppl_ctx=self.eval_ctx)


def _say(msg: str) -> None:
    log.info(f"[recover] {msg}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """The work directory's record: per stage its settings digest (chained through the earlier
    stages), outputs, result and seconds, rewritten atomically after every stage."""

    def __init__(self, work: Path) -> None:
        self.work = work
        path = work / STATE
        self.state = read_json_object(path, "a recover.json of tools/spd.py recover") \
            if path.is_file() else {"stages": {}}
        self.chain = ""
        self.seen: list[str] = []

    def run(self, name: str, settings: dict[str, Any], outputs: list[str],
            body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        settings = json.loads(json.dumps(settings, default=str))  # as recover.json holds it
        self.chain = _digest([self.chain, name, settings])
        self.seen.append(name)
        old = self.state["stages"].get(name)
        if old and old["digest"] == self.chain and all((self.work / o).exists() for o in outputs):
            _say(f"{name}: done before, skipped ({_brief(old['result'])})")
            return old["result"]
        _say(f"{name}: running")
        t0 = time.perf_counter()
        result = json.loads(json.dumps(body(), default=str))
        self.state["stages"][name] = {"digest": self.chain, "settings": settings,
                                      "outputs": outputs, "result": result,
                                      "seconds": round(time.perf_counter() - t0, 1)}
        self.save()
        _say(f"{name}: done in {self.state['stages'][name]['seconds']:.0f} s ({_brief(result)})")
        return result


    def finish(self, command: Optional[str]) -> None:
        """Drop the records of stages this run did not have (another configuration's), total
        the stage times (skipped stages count with their recorded time) and save."""
        self.state["stages"] = {n: self.state["stages"][n] for n in self.seen}
        self.state["total_minutes"] = round(
            sum(s["seconds"] for s in self.state["stages"].values()) / 60, 1)
        if command is not None:
            self.state["command"] = command
        self.save()

    def save(self) -> None:
        if distributed.is_rank0():
            atomic_write_json(self.work / STATE, self.state)


def _brief(result: dict[str, Any]) -> str:
    c = result.get("closeness")
    if c:
        return line(c)
    return ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float, str)))


def _closeness(work: Path, run: RunConfig, ev, name: str) -> dict[str, Any]:
    """Closeness of ``run``'s model (source and plan) to the dense reference."""
    report = evaluate_source(run.replace(json_out=work / f"{name}.eval.json"), ev,
                             baseline=work / "dense.json")
    return {"closeness": report["closeness"], "ppl": report["ppl"]}


def plot(state: dict[str, Any], path: str | Path) -> None:
    """KL and top-1 agreement (with s.e. bars) after each model stage, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, s["result"]["closeness"]) for n, s in state["stages"].items()
            if "closeness" in s["result"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = range(len(rows))
    a.errorbar(x, [c["kl"] for _, c in rows], yerr=[c["kl_se"] for _, c in rows], fmt="o-")
    a.set_yscale("log")
    a.set_ylabel("KL(dense || model), nats/token")
    b.errorbar(x, [100 * c["top1"] for _, c in rows], yerr=[100 * c["top1_se"] for _, c in rows],
               fmt="o-")
    b.set_ylabel("top-1 agreement with dense, %")
    for ax in (a, b):
        ax.set_xticks(list(x), [n for n, _ in rows])
        ax.grid(alpha=0.3)
    fig.suptitle("closeness to dense after each recovery stage (held-out text)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def recover_all(work: str | Path, cfg: RecoverConfig = RecoverConfig(),
                run: RunConfig = RunConfig(), calib: Calibration = Calibration(), *,
                b2b: B2BConfig = B2BConfig(),
                compensation: CompensationConfig = CompensationConfig(),
                command: Optional[str] = None) -> dict[str, Any]:
    """Every stage (module docstring) into ``work``; returns the record of ``recover.json``
    (also written to ``run.json_out``; with ``command``, the command line that ran it, when
    given). ``run.source`` (None: SmolLM2-135M) must be the dense model; ``run.plan`` is not
    used (the stages make theirs)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    dense = run.replace(plan=None, json_out=None, overwrite=True)
    stages = _Stages(work)
    origin = {"source": None if run.source is None else str(Path(run.source).resolve()),
              "tokenizer": None if run.tokenizer is None else str(run.tokenizer),
              "verify": run.verify}
    ev = cfg.eval_config(calib)
    stages.run("reference", {**origin, "eval": dataclasses.asdict(ev), "topk": cfg.topk},
               ["dense.json", "dense.reference.safetensors"],
               lambda: _reference(work, dense, dataclasses.replace(ev, reference_topk=cfg.topk)))
    plan_settings = {"ratio": cfg.ratio, "strategy": cfg.strategy,
                     "compensation": dataclasses.asdict(compensation)}
    if cfg.ratio < 1 or cfg.strategy == "auto":  # the sweep chooses blocks or strategies
        sens_calib = dataclasses.replace(calib, samples=cfg.sensitivity_samples)
        stages.run("sensitivity", {"calib": dataclasses.asdict(sens_calib)},
                   ["sensitivity.json"], lambda: _summary(recipe.run_sensitivity(
                       dense.replace(json_out=work / "sensitivity.json"), sens_calib,
                       png=work / "sensitivity.png"), ("baseline_ppl", "seconds")))
        stages.run("plan", plan_settings, ["plan.json"], lambda: _summary(recipe.run_plan(
            work / "sensitivity.json", work / "plan.json", dense, calib, ratio=cfg.ratio,
            strategy=cfg.strategy, compensation=compensation), ("groups",)))
    else:
        stages.run("plan", plan_settings, ["plan.json"],
                   lambda: _every_block(work, cfg.strategy, compensation))
    stages.run("zero-shot", {}, ["zero-shot.eval.json"],
               lambda: _closeness(work, dense.replace(plan=work / "plan.json"), ev, "zero-shot"))
    stages.run("blockwise", {"calib": dataclasses.asdict(calib), "b2b": dataclasses.asdict(b2b)},
               ["blockwise"], lambda: _blockwise(work, dense, calib, b2b, ev))
    if cfg.e2e_steps:
        stages.run("end-to-end", {"finetune": dataclasses.asdict(cfg.finetune_config()),
                                  "data": calib.source},
                   ["end-to-end"], lambda: _end_to_end(work, dense, cfg, calib, ev,
                                                       stages.chain))
    stages.finish(command)
    if distributed.is_rank0():
        plot(stages.state, work / "recover.png")
    run.write_report(stages.state)
    best = "end-to-end" if cfg.e2e_steps else "blockwise"
    _say(f"the recovered model is {work / best}; closeness per stage in {work / STATE}, "
         f"plotted in {work / 'recover.png'}")
    return stages.state


def _summary(report: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: report[k] for k in keys if k in report}


def _every_block(work: Path, strategy: str, compensation: CompensationConfig) -> dict[str, Any]:
    """The plan with every block SPD by ``strategy``: no sweep needed (the dense model's L and G
    from the reference stage's report)."""

    dense = SPDPlan.from_dict(read_json_object(work / "dense.json", "the reference report")
                              ["plan"])
    blocks = list(range(dense.num_layers))
    comp = compensation.plan_entry(blocks)
    plan = SPDPlan(dense.groups, [strategy] * dense.num_layers, {
        **({"compensation": comp} if comp else {}),
        "provenance": {"tool": "megatron_spd.recipe.pipeline", "strategy": strategy,
                       "n_spd": len(blocks)}})
    if distributed.is_rank0():
        plan.save(work / "plan.json")
    _say(f"wrote {work / 'plan.json'}: every block {strategy} (no sensitivity sweep needed)")
    return {"groups": plan.groups}


def _reference(work: Path, dense: RunConfig, ev) -> dict[str, Any]:
    report = evaluate_source(dense.replace(json_out=work / "dense.json"), ev)
    if report["spd_ratio"] != 0:
        raise InputError(f"the source's own plan is {report['spd_ratio']:.0%} SPD; recover "
                         "starts from a dense model (--ckpt of a dense checkpoint)")
    return {"ppl": report["ppl"]}


def _blockwise(work: Path, dense: RunConfig, calib: Calibration, b2b: B2BConfig, ev
               ) -> dict[str, Any]:
    recipe.run_recover(work / "plan.json", work / "blockwise", dense, calib, b2b=b2b)
    return _closeness(work, dense.replace(source=work / "blockwise"), ev, "blockwise")


def _end_to_end(work: Path, dense: RunConfig, cfg: RecoverConfig, calib: Calibration, ev,
                digest: str) -> dict[str, Any]:
    """The fine-tune resumes from its training checkpoints in a directory named by the stage's
    digest, so a run from other settings or another block-wise model never resumes them. It
    trains on the calibration source's ``train`` split."""
    ft = cfg.finetune_config()
    start = dense.replace(source=work / "blockwise",
                          json_out=work / "end-to-end.finetune.json")
    with start.running(seed=ft.seed):
        report = finetune(start, ft, out=work / "end-to-end",
                          save_dir=work / "end-to-end.train" / digest, data=calib.source,
                          text_field=calib.text_field)
    return {**_closeness(work, dense.replace(source=work / "end-to-end"), ev, "end-to-end"),
            "held_out_loss_after": report["held_out_loss_after"]}
