"""Latency of SPD plans: time to first token and time per output token against the SPD ratio,
the link simulator, and the analytic projection to LLaMA-2 shapes (docs/latency.md).

    torchrun --nproc-per-node 3 tools/benchmark.py measure --link pcie --link-scale auto \\
        --json out/smollm2.json            # SmolLM2-135M, ratios 0..100%, + stock megatron
    torchrun --nproc-per-node 2 tools/benchmark.py measure --model llama-s --json out/s.json
    python tools/benchmark.py project --json out/projection.json      # analytic, no ranks
    python tools/benchmark.py report --measured out/*.json --projection out/projection.json \\
        --out docs/latency.md

--model: a random-weight preset (tiny, llama-s, llama-m), `default` (SmolLM2-135M-Instruct), or a
checkpoint / HF directory / .gguf. --link: nvlink | internode | pcie | ALPHA_US:GBPS; with
--link-scale auto the link is slowed by (this machine's compute time / the analytic model's
compute time on --device) per phase, so communication keeps the share it has on that device.
A PNG is written next to every --json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("measure", help="time every SPD ratio on this process's ranks")
    m.add_argument("--model", "--ckpt", dest="model", default="default",
                   help="preset (tiny, llama-s, llama-m), 'default' (SmolLM2) or a checkpoint")
    m.add_argument("--tp", type=int, default=None, help="TP degree (default: world size)")
    m.add_argument("--groups", type=int, default=None,
                   help="SPD groups G (default: the model's plan, or TP for presets)")
    m.add_argument("--ratios", type=_floats, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill length)")
    m.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per visit")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--no-stock", action="store_true", help="skip the stock megatron-core model")
    m.add_argument("--link", default=None, help="simulated link profile (default: none)")
    m.add_argument("--link-scale", default="1", help="a factor, or 'auto'")
    m.add_argument("--device", default="a100", help="device the auto scale refers to")
    m.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per rank (default: cores / local ranks, at least 1)")
    m.add_argument("--timeout-s", type=float, default=600.0)
    m.add_argument("--json", default=None, help="write the report here (and a PNG beside it)")

    j = sub.add_parser("project", help="analytic projection for LLaMA-2 7B/13B/70B")
    j.add_argument("--models", nargs="*", default=None)
    j.add_argument("--tp", type=_ints, default=(4, 8))
    j.add_argument("--links", type=lambda s: tuple(s.split(",")), default=("nvlink", "internode", "pcie"))
    j.add_argument("--device", default="a100")
    j.add_argument("--batch", type=_ints, default=(1, 16))
    j.add_argument("--prompt", type=int, default=1024)
    j.add_argument("--new-tokens", type=int, default=128)
    j.add_argument("--json", default=None)

    r = sub.add_parser("report", help="write docs/latency.md from measured and projection JSON")
    r.add_argument("--measured", nargs="+", required=True)
    r.add_argument("--projection", required=True)
    r.add_argument("--out", default="docs/latency.md")
    r.add_argument("--command", default=None, help="the command line to cite in the document")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_spd.bench import report, runner
    from megatron_spd.bench.latency import LinkSetting, Workload

    if args.cmd == "measure":
        wl = Workload(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens,
                      repeats=args.repeats, warmup=args.warmup, ratios=args.ratios,
                      stock=not args.no_stock)
        out = runner.measure(args.model, wl, LinkSetting(args.link, args.link_scale, args.device),
                             tp=args.tp, groups=args.groups, threads=args.threads,
                             json_out=args.json, png_out=runner.default_paths(args.json),
                             timeout_s=args.timeout_s)
        if out is not None:
            print(report.summary(out))
    elif args.cmd == "project":
        out = runner.project(models=args.models, tps=args.tp, links=args.links,
                             device=args.device, batches=args.batch, prompt=args.prompt,
                             new_tokens=args.new_tokens, json_out=args.json,
                             png_out=runner.default_paths(args.json))
        print(report.projection_summary(out))
    else:
        report.write_markdown(args.measured, args.projection, args.out, command=args.command)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
