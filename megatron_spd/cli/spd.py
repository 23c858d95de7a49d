"""The SPD recipe from the command line: sensitivity -> plan -> headgroup / distill -> checkpoint.

    python tools/spd.py sensitivity [--ckpt SRC] [--groups 3] [--samples 4 --seq-len 512]
        [--calib FILE] [--mode cumulative|independent|local|all] --json SENS.json [--png SENS.png]
    python tools/spd.py plan --sensitivity SENS.json (--ratio 0.5 | --max-ppl-increase 2.0)
        [--strategy auto|zs|b2b|hg] [--t1 X --t2 Y] [--no-compensation | --compensation-rank R] --out PLAN.json
    python tools/spd.py headgroup [--ckpt SRC] --plan PLAN.json --out CKPT_DIR [--mlp units]
    python tools/spd.py distill [--ckpt SRC] --plan PLAN.json --out CKPT_DIR [--epochs 2 --lr 1e-3
        --optimizer adamw --inputs dense|spd]
    python tools/spd.py recover --work DIR [--ratio 1] [--strategy hg] [--e2e-tokens 40960]
    torchrun --nproc-per-node 3 tools/spd.py sensitivity --tp 3 ...   (and distill, without hg)

``plan`` gives every SPD block rank-local compensation unless ``--no-compensation``.
``headgroup`` permutes the ``hg`` blocks of the plan (HG only); ``distill`` runs the whole plan
block by block: HG on ``hg`` blocks, the closed-form compensation fit, B2B on ``b2b`` and
``hg`` blocks. Both write a megatron-spd checkpoint
with the plan inside, which ``tools/generate.py --ckpt`` and ``tools/evaluate.py --ckpt`` serve.
``recover`` runs all of it and the end-to-end distillation of tools/finetune.py in one resumable
run, with KL / top-1 agreement to dense after each stage (recipe/pipeline.py; defaults
recipe.pipeline.RecoverConfig); the recovered model is DIR/end-to-end.
No --ckpt = the bundled SmolLM2-135M-Instruct. Calibration text defaults to the bundled Wikipedia
paragraphs (split ``calib``, disjoint from the evaluation split). Defaults (recipe.run.Calibration,
recipe.distill.B2BConfig) are those of the published numbers in docs/recipe.md. The work is
megatron_spd.recipe.run; this file only parses the command line.
"""
from __future__ import annotations

import shlex
import sys

from ..checkpoint.save import CHECKPOINT_OUTPUT
from ..core.plan import PLAN_OUTPUT
from ..recipe import autoplan, classify, headgroup, run, sensitivity
from ..recipe.autoplan import CompensationConfig
from ..recipe.distill import B2BConfig
from ..recipe.pipeline import RecoverConfig, recover_all
from ..recipe.run import Calibration
from . import common as cli


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    sub = cli.subcommands(p)

    def common(s) -> None:
        cli.add_source(s)
        cli.add_tp(s)
        cli.add_json(s)
        cli.add_config(s, Calibration, attr="calib", title="calibration text")

    s = sub.add_parser("sensitivity", help="per-block sensitivity sweep")
    common(s)
    s.add_argument("--groups", type=cli.positive_int, default=None,
                   help="G (default: the source plan's)")
    s.add_argument("--mode", default=cli.default_of(run.run_sensitivity, "mode"),
                   choices=[*sensitivity.MODES, "all"], help="sweep mode; 'all' runs every mode")
    cli.add_png(s, "--png", "the plot of sensitivity per block")
    s = sub.add_parser("plan", help="choose SPD blocks and strategies")
    common(s)
    s.add_argument("--sensitivity", required=True, help="JSON from the sensitivity subcommand")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of blocks to make SPD")
    g.add_argument("--max-ppl-increase", type=float,
                   help="largest calibration perplexity increase allowed (measured zero-shot)")
    s.add_argument("--strategy", default=cli.default_of(run.run_plan, "strategy"),
                   choices=["auto", *classify.CLASSES],
                   help="'auto': classify each SPD block by its sensitivity")
    s.add_argument("--t1", type=float, default=None, help="classification threshold zs/b2b")
    s.add_argument("--t2", type=float, default=None, help="classification threshold b2b/hg")
    cli.add_out(s, PLAN_OUTPUT, "plan JSON to write", metavar="PLAN.json")
    cli.add_config(s, CompensationConfig, attr="compensation",
                   title="rank-local compensation (recipe.autoplan.CompensationConfig)")
    for name, what in (("headgroup", "head grouping of the plan's hg blocks"),
                       ("distill", "HG + B2B as the plan says; writes a checkpoint")):
        s = sub.add_parser(name, help=what)
        common(s)
        cli.add_plan(s, required=True, help="plan JSON (tools/spd.py plan)")
        cli.add_out(s, CHECKPOINT_OUTPUT, "checkpoint directory to write", metavar="DIR")
        s.add_argument("--mlp", default=cli.default_of(autoplan.recover_with_plan, "hg_mlp"),
                       choices=headgroup.MLP_MODES, help="HG on the MLP side (recipe/headgroup.py)")
        if name == "distill":
            cli.add_config(s, B2BConfig, attr="b2b", dests={"micro_batch": "b2b_micro_batch"},
                           title="block-to-block distillation (recipe.distill.B2BConfig)")
    s = sub.add_parser("recover", help="the whole recovery, resumable, with KL / top-1 to dense "
                                       "after each stage (recipe/pipeline.py)")
    common(s)
    cli.add_dir(s, "--work", "work directory of the stages (a rerun skips the finished ones)")
    cli.add_config(s, RecoverConfig, attr="recover", title="stages (recipe.pipeline.RecoverConfig)")
    cli.add_config(s, B2BConfig, attr="b2b", dests={"micro_batch": "b2b_micro_batch"},
                   title="block-to-block distillation (recipe.distill.B2BConfig)")
    cli.add_config(s, CompensationConfig, attr="compensation",
                   dests={"inputs": "compensation_inputs"},
                   title="rank-local compensation (recipe.autoplan.CompensationConfig)")
    args = p.parse_args(argv)
    if args.cmd == "recover" and not args.work:
        p.error("recover needs --work DIR")
    return args


@cli.entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    config = cli.run_config(args, plan=None)  # the recipe's --plan is what it applies
    if args.cmd == "recover":
        command = shlex.join(["tools/spd.py", *(sys.argv[1:] if argv is None else argv)])
        return recover_all(args.work, args.recover, config, args.calib, b2b=args.b2b,
                           compensation=args.compensation, command=command)
    if args.cmd == "sensitivity":
        return run.run_sensitivity(config, args.calib, groups=args.groups, mode=args.mode,
                                   png=args.png)
    if args.cmd == "plan":
        return run.run_plan(args.sensitivity, args.out, config, args.calib, ratio=args.ratio,
                            max_ppl_increase=args.max_ppl_increase, strategy=args.strategy,
                            t1=args.t1, t2=args.t2, compensation=args.compensation)
    b2b = args.b2b if args.cmd == "distill" else None  # headgroup: HG only
    return run.run_recover(args.plan, args.out, config, args.calib, b2b=b2b, hg_mlp=args.mlp)


if __name__ == "__main__":
    main()
