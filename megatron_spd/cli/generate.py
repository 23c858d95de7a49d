"""Generate text with a (dense or SPD) model over tensor parallelism, streaming on rank 0.

    torchrun --nproc-per-node 3 tools/generate.py --prompt "The capital of France is"
    torchrun --nproc-per-node 3 tools/generate.py --ckpt CKPT --prompts-file prompts.txt \\
        --temperature 0.8 --top-p 0.95 --json out.json
    python tools/generate.py --prompt "Hello"                      # one process (TP=1)

Without --ckpt the default SmolLM2-135M-Instruct is used. Multi-node: standard torchrun
rendezvous arguments (examples/generate_2nodes.sh); ranks beyond --tp form data-parallel replicas
that share the prompts. Prints time to first token and time per output token. The work is
megatron_spd.inference.run; this file only parses the command line.
"""
from __future__ import annotations

from . import common as cli


def parse_args(argv=None):
    from ..inference import GenerationConfig, GenerationError
    from ..inference.run import read_prompts

    p = cli.parser(__doc__)
    cli.add_source(p)
    cli.add_plan(p)
    cli.add_tp(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line (\\n for a newline), or .jsonl with a \"prompt\" field")
    p.add_argument("--no-stream", action="store_true",
                   help="do not stream the first prompt's output as it is generated")
    cli.add_timeout(p)
    cli.add_json(p, "results and timings")
    cli.add_config(p, GenerationConfig, attr="generation", exclude=("add_bos",),
                   title="generation (inference.GenerationConfig)")
    args = p.parse_args(argv)
    try:
        args.prompts = read_prompts(args.prompt, args.prompts_file)
    except GenerationError as e:
        p.error(str(e))
    return args


@cli.entry
def main(argv=None) -> None:
    args = parse_args(argv)
    from ..inference.run import generate_source

    run = cli.run_config(args)
    generate_source(run.source, args.prompts, args.generation, plan=run.plan, tp=run.tp,
                    stream=not args.no_stream, timeout_s=run.timeout_s, json_out=run.json_out,
                    tokenizer=run.tokenizer, verify=run.verify)


if __name__ == "__main__":
    main()
