"""Generate text with a (dense or SPD) model over tensor parallelism, streaming on rank 0.

    torchrun --nproc-per-node 3 tools/generate.py --prompt "The capital of France is"
    torchrun --nproc-per-node 3 tools/generate.py --ckpt CKPT --prompts-file prompts.txt \\
        --temperature 0.8 --top-p 0.95 --json out.json
    python tools/generate.py --prompt "Hello"                      # one process (TP=1)

Without --ckpt the default SmolLM2-135M-Instruct is used. Multi-node: standard torchrun
rendezvous arguments (examples/generate_2nodes.sh); ranks beyond --tp form data-parallel replicas
that share the prompts. Prints time to first token and time per output token.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="megatron-spd checkpoint, HF directory or .gguf "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--plan", default=None, help="SPD plan JSON to use instead of the model's own")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: world size)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line (\\n for a newline), or .jsonl with a \"prompt\" field")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--no-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--no-stream", action="store_true",
                   help="do not stream the first prompt's output as it is generated")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="torch.distributed timeout: how long ranks wait for a dead or stuck peer")
    p.add_argument("--json", default=None, help="write results and timings here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_spd import distributed
    from megatron_spd.checkpoint import open_model
    from megatron_spd.inference import GenerationConfig, GenerationError
    from megatron_spd.inference.serve import generate_sharded, read_prompts, summary
    from megatron_spd.io import atomic_write_json

    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                  max_batch_size=args.batch_size, stop_on_eos=not args.no_eos)
    except (GenerationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.init(args.tp, timeout_s=args.timeout_s)
    rank0 = distributed.is_rank0()
    try:
        lm = open_model(args.ckpt, plan=args.plan)
        if rank0:
            print(f"model: {args.ckpt or 'SmolLM2-135M-Instruct (default)'}, TP={distributed.tp_size()}, "
                  f"SPD blocks {len(lm.plan.spd_blocks)}/{lm.config.num_layers} (G={lm.plan.groups})",
                  flush=True)
        stream = None if args.no_stream else _printer()
        if stream is not None and rank0:
            print(f"[0] {prompts[0]}", end="", flush=True)
        results = generate_sharded(lm.model, lm.tokenizer, prompts, config, stream=stream)
    except (GenerationError, ValueError, FileNotFoundError) as e:
        print(f"error (rank {_rank()}): {e}", file=sys.stderr, flush=True)
        return 1
    if results is not None:
        if stream is not None:
            print(flush=True)
        for i, r in enumerate(results):
            print(f"--- [{i}] {r.prompt!r} -> ({len(r.tokens)} tokens, {r.finish_reason}, "
                  f"ttft {r.ttft_s * 1e3:.1f} ms, tpot "
                  f"{'-' if r.tpot_s is None else f'{r.tpot_s * 1e3:.1f} ms'})\n{r.text}")
        stats = summary(results)
        print(f"summary: {stats}")
        if args.json:
            atomic_write_json(args.json, {"tp": distributed.tp_size(), "ckpt": args.ckpt,
                                          "plan": lm.plan.strategies, "config": vars(config),
                                          "summary": stats,
                                          "results": [r.to_dict() for r in results]})
    distributed.shutdown()
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _printer():
    """Stream the first prompt's text as it arrives (a batch's rows would interleave token by
    token); every output is listed in full at the end."""
    def show(index: int, text: str) -> None:
        if index == 0:
            print(text, end="", flush=True)

    return show


if __name__ == "__main__":
    sys.exit(main())
