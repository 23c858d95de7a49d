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
    from ..inference.run import generate_source, summary

    stream = None if args.no_stream else _FirstPromptStream(args.prompts[0])
    results = generate_source(cli.run_config(args), args.prompts, args.generation, stream=stream)
    if results is None:  # not global rank 0
        return
    if stream is not None:
        print(flush=True)
    for i, r in enumerate(results):
        print(f"--- [{i}] {r.prompt!r} -> ({len(r.tokens)} tokens, {r.finish_reason}, "
              f"ttft {r.ttft_s * 1e3:.1f} ms, tpot "
              f"{'-' if r.tpot_s is None else f'{r.tpot_s * 1e3:.1f} ms'})\n{r.text}")
    print(f"summary: {summary(results)}")


class _FirstPromptStream:
    """Streams the first prompt and its text as it arrives (a batch's rows would interleave
    token by token); every output is listed in full at the end."""

    def __init__(self, prompt: str) -> None:
        self.prompt, self.started = prompt, False

    def __call__(self, index: int, text: str) -> None:
        if index != 0:
            return
        if not self.started:
            print(f"[0] {self.prompt}", end="", flush=True)
            self.started = True
        print(text, end="", flush=True)


if __name__ == "__main__":
    main()
