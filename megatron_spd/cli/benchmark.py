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
A PNG is written next to every --json. The work is megatron_spd.bench.run; this file parses
the command line and prints the summaries.
"""
from __future__ import annotations

from ..bench import analytic, markdown, run
from ..bench.latency import LinkSetting, Workload
from ..files import MARKDOWN_DOC
from . import common as cli


def parse_args(argv=None):
    p = cli.parser(__doc__)
    sub = cli.subcommands(p)

    m = sub.add_parser("measure", help="time every SPD ratio on this process's ranks")
    m.add_argument("--model", "--ckpt", dest="model", default="default",
                   help="preset (tiny, llama-s, llama-m), 'default' (SmolLM2) or a checkpoint")
    cli.add_tp(m)
    m.add_argument("--groups", type=cli.positive_int, default=None,
                   help="SPD groups G (default: the model's plan, or TP for presets)")
    m.add_argument("--threads", type=cli.positive_int, default=None,
                   help="intra-op threads per rank (default: cores / local ranks, at least 1)")
    cli.add_timeout(m)
    cli.add_json(m, "the report (and a PNG beside it)", beside=run.png_path)
    cli.add_config(m, Workload, attr="workload", title="workload (bench.latency.Workload)")
    cli.add_config(m, LinkSetting, attr="links", exclude=("factors", "calibration"),
                   title="simulated link (bench.latency.LinkSetting)")

    j = sub.add_parser("project", help="analytic projection for LLaMA-2 7B/13B/70B")
    cli.add_json(j, "the projection (and a PNG beside it)", beside=run.png_path)
    cli.add_config(j, analytic.Projection, attr="projection",
                   title="what to project (bench.analytic.Projection)")

    r = sub.add_parser("report", help="write docs/latency.md from measured and projection JSON")
    r.add_argument("--measured", nargs="+", required=True)
    r.add_argument("--projection", required=True)
    r.add_argument("--out", default=cli.default_of(run.write_doc, "out"),
                   help="the Markdown document to write")
    r.add_output("out", "--out", MARKDOWN_DOC)
    r.add_argument("--command", default=None, help="the command line to cite in the document")
    return p.parse_args(argv)


@cli.entry
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.cmd == "measure":
        report = run.measure(cli.run_config(args, source=args.model), args.workload, args.links,
                             groups=args.groups, threads=args.threads)
        if report is not None:
            print(markdown.summary(report))
    elif args.cmd == "project":
        print(markdown.projection_summary(run.project(args.projection, json_out=args.json)))
    else:
        run.write_doc(args.measured, args.projection, args.out, command=args.command)


if __name__ == "__main__":
    main()
