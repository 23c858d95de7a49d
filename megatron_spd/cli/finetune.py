"""Fine-tune an SPD model (its plan is inside the checkpoint) on text, at any TP x DP.

    torchrun --nproc-per-node 4 tools/finetune.py --tp 2 --ckpt CKPT --out FT_CKPT \\
        --steps 200 --distill 0.5 --save FT_CKPT.train --save-interval 50 --json ft.json

World size / TP = data-parallel degree. Without --ckpt the default SmolLM2-135M is used; --plan
applies a plan to it first (e.g. 100% SPD without any recovery). A run whose --save directory
already holds a checkpoint resumes from it. The result at --out serves unchanged with
tools/generate.py and tools/evaluate.py.
"""
from __future__ import annotations

from ..checkpoint.save import CHECKPOINT_OUTPUT
from ..train.loop import FinetuneConfig, finetune
from . import common as cli


def parse_args(argv=None):
    p = cli.parser(__doc__)
    cli.add_source(p)
    cli.add_plan(p, help="plan JSON to apply instead of the checkpoint's own")
    cli.add_out(p, CHECKPOINT_OUTPUT, "where the fine-tuned checkpoint is written")
    cli.add_dir(p, "--save", "training-checkpoint directory (resumes from it if it holds one)")
    cli.add_tp(p)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--data", help="local .txt/.jsonl/.parquet (default: bundled Wikipedia paragraphs)")
    cli.add_text_field(p)
    p.add_argument("--teacher",
                   help="teacher source, run with a dense plan (default: the dense model --ckpt "
                        "was derived from, as its checkpoint records; else --ckpt itself)")
    cli.add_json(p, "the report (loss curve, held-out loss)")
    cli.add_png(p, "--plot", "the loss curve")
    cli.add_config(p, FinetuneConfig, attr="config", title="training (train.FinetuneConfig)")
    return p.parse_args(argv)


@cli.entry
def main(argv=None) -> None:
    args = parse_args(argv)
    run = cli.run_config(args)
    with run.running(seed=args.config.seed):
        finetune(run, args.config, out=args.out, save_dir=args.save, teacher=args.teacher,
                 data=args.data, text_field=args.text_field,
                 sequence_parallel=args.sequence_parallel, plot=args.plot)


if __name__ == "__main__":
    main()
