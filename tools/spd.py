#!/usr/bin/env python
"""The SPD recipe from the command line: sensitivity -> plan -> headgroup / distill -> checkpoint.

    python tools/spd.py sensitivity [--ckpt SRC] [--groups 3] [--samples 8 --seq-len 512]
        [--calib FILE] [--mode cumulative|independent|both] --json SENS.json [--png SENS.png]
    python tools/spd.py plan --sensitivity SENS.json (--ratio 0.5 | --max-ppl-increase 2.0)
        [--strategy auto|zs|b2b|hg] [--t1 X --t2 Y] --out PLAN.json
    python tools/spd.py headgroup [--ckpt SRC] --plan PLAN.json --out CKPT_DIR [--mlp units]
    python tools/spd.py distill [--ckpt SRC] --plan PLAN.json --out CKPT_DIR [--epochs 3 --lr 1e-3
        --optimizer adamw --inputs dense|spd]
    torchrun --nproc-per-node 3 tools/spd.py sensitivity --tp 3 ...   (and distill, without hg)

``headgroup`` permutes the ``hg`` blocks of the plan (HG only); ``distill`` runs the whole plan:
HG on ``hg`` blocks, then B2B on ``b2b`` and ``hg`` blocks. Both write a megatron-spd checkpoint
with the plan inside, which ``tools/generate.py --ckpt`` and ``tools/evaluate.py --ckpt`` serve.
No --ckpt = the bundled SmolLM2-135M-Instruct. Calibration text defaults to the bundled Wikipedia
paragraphs (split ``calib``, disjoint from the evaluation split).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _common(p: argparse.ArgumentParser, calib: bool = True) -> None:
    p.add_argument("--ckpt", default=None, help="checkpoint, HF dir or .gguf (default: SmolLM2)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: world)")
    p.add_argument("--json", default=None, help="write a machine-readable report here")
    if calib:
        p.add_argument("--samples", type=int, default=8, help="calibration sequences")
        p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
        p.add_argument("--calib", default=None,
                       help="calibration .txt/.jsonl/.parquet (default: bundled Wikipedia)")
        p.add_argument("--calib-split", default="calib", choices=["all", "eval", "calib", "train"])
        p.add_argument("--text-field", default="text")
        p.add_argument("--micro-batch", type=int, default=4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sensitivity", help="per-block sensitivity sweep")
    _common(s)
    s.add_argument("--groups", type=int, default=None, help="G (default: the source plan's)")
    s.add_argument("--mode", default="cumulative",
                   choices=["cumulative", "independent", "local", "all"])
    s.add_argument("--png", default=None, help="plot sensitivity per block here")
    s = sub.add_parser("plan", help="choose SPD blocks and strategies")
    _common(s)
    s.add_argument("--sensitivity", required=True, help="JSON from the sensitivity subcommand")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--ratio", type=float, help="fraction of blocks to make SPD")
    g.add_argument("--max-ppl-increase", type=float,
                   help="largest calibration perplexity increase allowed (measured zero-shot)")
    s.add_argument("--strategy", default="auto", choices=["auto", "zs", "b2b", "hg"])
    s.add_argument("--t1", type=float, default=None)
    s.add_argument("--t2", type=float, default=None)
    s.add_argument("--out", required=True, help="plan JSON to write")
    for name, what in (("headgroup", "head grouping of the plan's hg blocks"),
                       ("distill", "HG + B2B as the plan says; writes a checkpoint")):
        s = sub.add_parser(name, help=what)
        _common(s)
        s.add_argument("--plan", required=True, help="plan JSON (tools/spd.py plan)")
        s.add_argument("--out", required=True, help="checkpoint directory to write")
        s.add_argument("--mlp", default="units", choices=["units", "match", "none"],
                       help="HG on the MLP side (recipe/headgroup.py)")
        if name == "distill":
            s.add_argument("--epochs", type=int, default=3)
            s.add_argument("--lr", type=float, default=1e-3)
            s.add_argument("--b2b-micro-batch", type=int, default=1,
                           help="sequences per B2B optimizer step")
            s.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
            s.add_argument("--inputs", default="dense", choices=["dense", "spd"])
    return p.parse_args(argv)


def _calibration(args, tok):
    from megatron_spd.data import calibration_batches

    return calibration_batches(tok, args.samples, args.seq_len, args.calib,
                               split=args.calib_split, text_field=args.text_field)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_spd import distributed
    from megatron_spd.checkpoint import dense_origin, load_weights, save_checkpoint
    from megatron_spd.io import atomic_write_json
    from megatron_spd.plan import SPDPlan
    from megatron_spd.recipe import autoplan, blocks, distill, sensitivity

    distributed.init(args.tp)
    say = print if distributed.is_rank0() else (lambda *a, **k: None)
    report: dict = {"command": args.cmd}
    if args.cmd == "plan" and args.max_ppl_increase is None:
        sens = sensitivity.Sensitivity.load(args.sensitivity)
        n = autoplan.n_for_ratio(sens.num_layers, args.ratio)
        plan = autoplan.make_plan(sens, n_spd=n, strategy=args.strategy, t1=args.t1, t2=args.t2)
    else:
        cfg, full, tok, src_plan = load_weights(args.ckpt)
        if args.cmd in ("sensitivity", "plan"):
            groups = getattr(args, "groups", None) or src_plan.groups
            sens = sensitivity.Sensitivity.load(args.sensitivity) if args.cmd == "plan" else None
            dense, spd = sensitivity.build_pair(cfg, full, sens.groups if sens else groups)
            calib = _calibration(args, tok)
            xs = blocks.block_inputs(dense, calib, micro_batch=args.micro_batch)
        if args.cmd == "sensitivity":
            modes = list(sensitivity.MODES) if args.mode == "all" else [args.mode]
            results = [sensitivity.sweep(dense, spd, calib, mode=m, dense_inputs=xs,
                                         micro_batch=args.micro_batch) for m in modes]
            for r in results:
                say(f"{r.mode}: baseline ppl {r.baseline_ppl:.3f}; sensitivity per block:")
                say("  " + " ".join(f"{i}:{s:.3g}" for i, s in enumerate(r.sensitivity)))
            if args.png and distributed.is_rank0():
                sensitivity.plot(results, args.png)
            report = results[0].to_dict() if len(results) == 1 else \
                {r.mode: r.to_dict() for r in results}
        elif args.cmd == "plan":
            measure = autoplan.zs_measure(dense, spd, calib, xs, args.micro_batch)
            n, ppl = autoplan.n_for_max_ppl(sens, args.max_ppl_increase, measure)
            say(f"{n} SPD blocks keep zero-shot calibration ppl at {ppl:.3f} "
                f"(baseline {sens.baseline_ppl:.3f}, allowed +{args.max_ppl_increase})")
            plan = autoplan.make_plan(sens, n_spd=n, strategy=args.strategy, t1=args.t1, t2=args.t2)
            plan.extra["provenance"]["max_ppl_increase"] = args.max_ppl_increase
            plan.extra["provenance"]["zs_calibration_ppl"] = ppl
        else:
            plan = SPDPlan.load(args.plan)
            calib = _calibration(args, tok)
            b2b = None if args.cmd == "headgroup" else distill.B2BConfig(
                epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, inputs=args.inputs,
                micro_batch=args.b2b_micro_batch)
            model, _, plan = autoplan.apply_plan(cfg, full, plan, calib, b2b=b2b, hg_mlp=args.mlp,
                                                 micro_batch=args.micro_batch)
            save_checkpoint(model, args.out, config=cfg, plan=plan, tokenizer=tok,
                            dense_source=dense_origin(args.ckpt))
            say(f"wrote {args.out}: {len(plan.spd_blocks)}/{plan.num_layers} SPD blocks, G={plan.groups}")
            report = {"checkpoint": str(args.out), "plan": plan.to_dict()}
    if args.cmd == "plan":
        if distributed.is_rank0():
            plan.save(args.out)
        say(f"wrote {args.out}: SPD blocks {plan.spd_blocks} "
            f"({plan.spd_ratio:.0%}), strategies {dict((i, plan.strategies[i]) for i in plan.spd_blocks)}")
        report = plan.to_dict()
    if args.json and distributed.is_rank0():
        atomic_write_json(args.json, report)
    distributed.shutdown()
    return report


if __name__ == "__main__":
    main()
