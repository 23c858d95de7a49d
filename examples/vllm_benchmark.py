"""Dense vs SPD decode latency in vLLM at the same TP degree (issue 27): what the dropped sync
points save where people serve.

Run it with the vLLM virtualenv's python (.ci/vllm-venv; on GPU machines any env with vLLM and
megatron-spd installed):

    python examples/vllm_benchmark.py --dense DENSE_HF_DIR --spd SPD_HF_DIR --tp 3 \\
        --batch 1,8 --new-tokens 64 --repeats 5 --json out.json

DENSE_HF_DIR is the dense model (``tools/convert_checkpoint.py --to hf`` of the dense checkpoint),
SPD_HF_DIR its SPD export. Each model gets one engine; per batch size the script times
``max_tokens=N`` and ``max_tokens=1`` generations of the same prompts (greedy, EOS ignored) and
reports the time per output token as their difference over N - 1 decode steps (prefill cancels
out), the median over ``--repeats``. It prints what it measured and writes it as JSON with the
machine and versions; it never fills in a number it did not measure. On CPU the all-reduce is an
in-memory copy on one socket, so little is to be saved there: read a CPU result as "no
difference beyond noise" unless the repeats say otherwise. On GPU, leave CUDA graphs on (the
default; ``--enforce-eager`` turns them off) — SPD shows only once the step is near its bound.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True, help="dense Hugging Face directory")
    p.add_argument("--spd", required=True, help="SPD Hugging Face directory (its export)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size for both")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto: the checkpoint's; float32 "
                   "on CPU runs everywhere)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def _time(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0


def measure(model: str, args) -> dict:
    """One engine: per batch size, median time per output token and time to first token (ms)."""
    from vllm import LLM

    llm = LLM(model=model, tensor_parallel_size=args.tp, dtype=args.dtype, seed=0,
              enforce_eager=args.enforce_eager, max_num_seqs=max(args.batch),
              max_model_len=args.prompt_tokens + args.new_tokens + 8)
    vocab = llm.get_tokenizer().vocab_size
    out = {}
    for b in args.batch:
        prompts = [[(7 + 13 * i + 31 * j) % (vocab - 10) + 5 for j in range(args.prompt_tokens)]
                   for i in range(b)]
        _time(llm, prompts, 2)  # warm-up at this batch size
        ttft, full = [], []
        for _ in range(args.repeats):
            ttft.append(_time(llm, prompts, 1))
            full.append(_time(llm, prompts, args.new_tokens))
        steps = args.new_tokens - 1
        tpot = [(f - t) / steps for f, t in zip(full, ttft)]
        out[str(b)] = {"tpot_ms_median": 1e3 * statistics.median(tpot),
                       "tpot_ms": [round(1e3 * x, 3) for x in tpot],
                       "ttft_ms_median": 1e3 * statistics.median(ttft)}
    del llm
    return out


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv=None) -> None:
    args = parse_args(argv)
    import vllm

    results = {"dense": measure(args.dense, args), "spd": measure(args.spd, args)}
    report = {"device": _device(), "vllm": vllm.__version__, "tp": args.tp,
              "load_average_1m": os.getloadavg()[0],  # other work on the machine skews times
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "enforce_eager": args.enforce_eager,
              "dense": args.dense, "spd": args.spd, "results": results}
    print(f"vLLM {vllm.__version__} on {report['device']}, TP={args.tp}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}, "
          f"load average {report['load_average_1m']:.1f}")
    print(f"{'batch':>5} {'dense ms/tok':>13} {'SPD ms/tok':>11} {'SPD/dense':>10}  spread (dense | SPD)")
    for b in map(str, args.batch):
        d, s = results["dense"][b], results["spd"][b]
        ratio = s["tpot_ms_median"] / d["tpot_ms_median"]
        report.setdefault("spd_over_dense", {})[b] = ratio
        print(f"{b:>5} {d['tpot_ms_median']:13.2f} {s['tpot_ms_median']:11.2f} {ratio:10.3f}  "
              f"{min(d['tpot_ms']):.1f}-{max(d['tpot_ms']):.1f} | "
              f"{min(s['tpot_ms']):.1f}-{max(s['tpot_ms']):.1f}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
