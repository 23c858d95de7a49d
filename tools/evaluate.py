#!/usr/bin/env python
"""Zero-shot accuracy (lm-eval conventions) and perplexity of a model under an SPD plan.

    python tools/evaluate.py [--ckpt DIR] [--plan PLAN.json] [--tasks hellaswag,piqa,...]
        [--limit N] [--ppl-text FILE --ppl-ctx 512 --ppl-tokens N] --json OUT.json
    torchrun --nproc-per-node 3 tools/evaluate.py --tp 3 ...

No --ckpt = the bundled SmolLM2-135M-Instruct; --plan overrides the checkpoint's plan. Tasks:
hellaswag, piqa, arc_easy, arc_challenge, winogrande, lambada, sciq ("all" = these, "none" = no
tasks). Perplexity defaults to the first 50k tokens of the bundled Wikipedia paragraphs in
non-overlapping 512-token windows (--ppl-tokens 0 skips it). The JSON holds per-task numbers, the
paper's 6-task average, ``ppl``/``bpb`` and the plan used. --baseline OTHER.json (a report of
another model on the same or a larger --limit) adds the 6-task change versus it with its paired standard error
(per-item differences), key ``vs_baseline``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None,
                   help="megatron-spd checkpoint, HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--plan", default=None, help="SPD plan JSON overriding the checkpoint's plan")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: world)")
    p.add_argument("--tasks", default="all",
                   help="comma-separated task names, 'all' or 'none' (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--ppl-text", default=None,
                   help=".txt/.jsonl/.parquet for perplexity (default: bundled Wikipedia)")
    p.add_argument("--text-field", default="text", help="document field of a .jsonl/.parquet")
    p.add_argument("--ppl-split", default="all", choices=["all", "eval", "calib", "train"],
                   help="document split of the perplexity text (megatron_spd.data.SPLITS)")
    p.add_argument("--ppl-ctx", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--ppl-stride", type=int, default=None,
                   help="window stride (default: --ppl-ctx, non-overlapping)")
    p.add_argument("--ppl-tokens", type=int, default=50_000,
                   help="score the first N tokens (0: skip perplexity)")
    p.add_argument("--batch-tokens", type=int, default=2048,
                   help="padded tokens per forward (memory vs. speed)")
    p.add_argument("--json", default=None, help="write the report here (atomically)")
    p.add_argument("--baseline", default=None,
                   help="report JSON of another model on the same items: also report the change "
                        "of the 6-task average versus it (paired standard error)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.ppl_tokens < 0:
        p.error("--ppl-tokens must be >= 0")
    if args.baseline:
        import json

        try:
            base = json.loads(Path(args.baseline).read_text())
            paired = all("correct" in r for r in base["tasks"].values()) and base["tasks"]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            p.error(f"--baseline {args.baseline}: not a readable tools/evaluate.py report ({e})")
        if not paired:
            p.error(f"--baseline {args.baseline} has no per-item results (made by an older "
                    "version or with --tasks none); re-evaluate the baseline")
        if not _covers(base.get("limit"), args.limit):  # fail now, not after the evaluation
            p.error(f"--baseline {args.baseline} was scored with --limit {base.get('limit')}, "
                    f"this run asks for {args.limit}; the baseline needs at least as many items")
    from megatron_spd.evaluate import TaskError, parse_task_list

    try:
        args.tasks = [] if args.tasks.strip() == "none" else parse_task_list(args.tasks)
    except TaskError as e:
        p.error(str(e))
    return args


def _covers(base_limit, limit) -> bool:
    """Whether a baseline scored on the first ``base_limit`` items (None = all) covers ``limit``."""
    return (base_limit or math.inf) >= (limit or math.inf)


def compare(baseline_path: str, report: dict) -> dict:
    """``paired_difference`` of this report's tasks versus the baseline report's."""
    import json

    from megatron_spd.evaluate import paired_difference

    base = json.loads(Path(baseline_path).read_text())
    limit, base_limit = report["limit"], base.get("limit")
    if not _covers(base_limit, limit):
        raise SystemExit(f"--baseline {baseline_path} was scored with --limit {base_limit}, this "
                         f"run with {limit}; the baseline needs at least as many items")
    # tasks take their first --limit items, so a baseline scored on more items pairs on a prefix
    tasks = {t: {**r, "correct": r["correct"][:report["tasks"][t]["n"]]}
             for t, r in base["tasks"].items() if t in report["tasks"]}
    return {"baseline": baseline_path, **paired_difference(tasks, report["tasks"])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_spd import distributed
    from megatron_spd.checkpoint import open_model
    from megatron_spd.evaluate.report import run_evaluation, summary
    from megatron_spd.io import atomic_write_json

    distributed.init(args.tp)
    try:
        lm = open_model(args.ckpt, plan=args.plan)
        header = {"ckpt": args.ckpt or "default (SmolLM2-135M-Instruct)",
                  "plan": lm.plan.to_dict(), "spd_ratio": lm.plan.spd_ratio}

        def save(report: dict) -> None:
            if args.json and distributed.is_rank0():
                atomic_write_json(args.json, {**report, **header})

        report = run_evaluation(lm.model, lm.tokenizer, tasks=args.tasks, limit=args.limit,
                                ppl_source=args.ppl_text, ppl_split=args.ppl_split,
                                ppl_text_field=args.text_field, ppl_ctx=args.ppl_ctx,
                                ppl_tokens=args.ppl_tokens, ppl_stride=args.ppl_stride,
                                batch_tokens=args.batch_tokens, on_progress=save)
        report.update(header)
        if args.baseline:
            report["vs_baseline"] = compare(args.baseline, report)
        save(report)
        if distributed.is_rank0():
            print(summary(report))
            if "vs_baseline" in report:
                d = report["vs_baseline"]
                print(f"6-task average vs {d['baseline']}: {100 * d['delta']:+.2f} points "
                      f"(paired s.e. {100 * d['se']:.2f})")
            if args.json:
                print(f"wrote {args.json}")
        return report
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
