"""Zero-shot accuracy (lm-eval conventions) and perplexity of a model under an SPD plan.

    python tools/evaluate.py [--ckpt DIR] [--plan PLAN.json] [--tasks hellaswag,piqa,...]
        [--limit N] [--ppl-text FILE --ppl-ctx 512 --ppl-tokens N] --json OUT.json
    torchrun --nproc-per-node 3 tools/evaluate.py --tp 3 ...

No --ckpt = the bundled SmolLM2-135M-Instruct; --plan overrides the checkpoint's plan. Tasks:
hellaswag, piqa, arc_easy, arc_challenge, winogrande, lambada, sciq ("all" = these, "none" = no
tasks). Perplexity defaults to the first 50k tokens of the bundled Wikipedia paragraphs in
non-overlapping 512-token windows (--ppl-tokens 0 skips it). The JSON holds per-task numbers, the
paper's 6-task average, ``ppl``/``bpb`` and the plan used. --baseline OTHER.json (a report of
another model on the same or a larger --limit) adds the 6-task change versus it with its paired
standard error (per-item differences), key ``vs_baseline``, and, when the baseline was made with
--reference-topk K (its X.reference.safetensors: the top-K next-token log-probs on the perplexity
text), the mean per-token KL(baseline || this model), top-1 agreement and perplexity ratio on the
same text with their standard errors, key ``closeness`` (evaluate/closeness.py). The work is
megatron_spd.evaluate.run; this file parses the command line and prints the summary.
"""
from __future__ import annotations

import logging

from ..evaluate.baseline import BaselineError, open_baseline
from ..evaluate.run import EvalConfig, evaluate_source, summary
from . import common as cli

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    cli.add_source(p)
    cli.add_plan(p, help="SPD plan JSON overriding the checkpoint's plan")
    cli.add_tp(p)
    cli.add_json(p)
    p.add_argument("--baseline", default=None,
                   help="report JSON of another model on the same items: also report the change "
                        "of the 6-task average versus it (paired standard error)")
    cli.add_config(p, EvalConfig, attr="eval", title="what to score (evaluate.run.EvalConfig)")
    args = p.parse_args(argv)
    if args.baseline:
        try:  # fail now, not after the evaluation
            open_baseline(args.baseline, args.eval)
        except BaselineError as e:
            p.error(str(e))
    return args


@cli.entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    report = evaluate_source(cli.run_config(args), args.eval, baseline=args.baseline)
    if cli.rank0():
        print(summary(report))
        if args.json:
            log.info(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
