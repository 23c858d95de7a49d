#!/usr/bin/env python
"""The end-to-end demo on the embedded defaults (SmolLM2-135M + bundled Wikipedia/benchmark data).

Runs the four user tasks with the real command-line tools, exactly as a user would, and prints
a summary at the end:
  1. convert the bundled GGUF to a megatron-core checkpoint (TP-agnostic, plan inside);
  2. measure per-block SPD sensitivity (G = 3) and write a plan for 50% SPD;
  3. recover accuracy: the plan's closed-form compensation, then block-to-block distillation
     (tools/spd.py also does head grouping);
  4. serve it: evaluate dense / zero-shot SPD / recovered SPD on the same items, generate with
     the sync points really dropped over 3 torchrun ranks, and time decode on a simulated link.
Everything lands in runs/demo/ (JSON + PNG). Sizes are small so the demo takes minutes on a
2-core CPU; the README shows the full-size commands.

Accuracy is reported only as what it can support: the SPD models' change of the 6-task average
versus dense on the same items, with its paired standard error (tools/evaluate.py --baseline);
with fewer than MIN_ITEMS items per task no change is resolvable and the demo reports perplexity
alone (and skips the tasks). Library warnings (megatron's missing apex/TE notices and the like)
are silenced in the tools' processes so the output is the tools' own lines.

    python examples/demo.py [--out runs/demo] [--ratio 0.5] [--limit 20] [--ppl-tokens 2048]
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from megatron_spd.cli import common as cli
from megatron_spd.data.defaults import default_gguf_path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone"]
TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada,sciq"
MIN_ITEMS = 20  # below this many items per task the paired s.e. is several points: ppl only
# the tools' own output only: no library warnings; torchrun's OMP_NUM_THREADS notice neither
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], step: str) -> float:
    print(f"\n=== {step}\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=ENV)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of blocks made SPD")
    p.add_argument("--limit", type=int, default=MIN_ITEMS,
                   help=f"items per zero-shot task (below {MIN_ITEMS}: perplexity only)")
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, sens, plan, spd = out / "dense_ckpt", out / "sensitivity.json", out / "plan.json", out / "spd_ckpt"
    calib = ["--samples", str(args.calib_samples), "--seq-len", "128"]
    tasks = args.limit >= MIN_ITEMS
    ev = ["--tasks", TASKS if tasks else "none", "--ppl-tokens", str(args.ppl_tokens),
          *(["--limit", str(args.limit)] if tasks else [])]
    times = {}
    times["convert"] = run([PY, "tools/convert_checkpoint.py", "--gguf", _default_gguf(),
                            "--out", str(ckpt), "--overwrite"],  # a rerun replaces its outputs
                           "1. convert the bundled GGUF to megatron-core")
    times["sensitivity"] = run([PY, "tools/spd.py", "sensitivity", "--ckpt", str(ckpt), *calib,
                                "--json", str(sens), "--png", str(out / "sensitivity.png")],
                               "2a. per-block sensitivity (T=1 emulation of G=3)")
    times["plan"] = run([PY, "tools/spd.py", "plan", "--sensitivity", str(sens),
                         "--ratio", str(args.ratio), "--strategy", "b2b", "--out", str(plan),
                         "--overwrite"],
                        "2b. plan: the least sensitive blocks, each to be distilled")
    times["recover"] = run([PY, "tools/spd.py", "distill", "--ckpt", str(ckpt), "--plan", str(plan),
                            *calib, "--epochs", "1", "--out", str(spd), "--overwrite"],
                           "3. recover: compensation fit + block-to-block distillation (B2B) of every SPD block")
    evals = {}
    dense_json = out / "eval_dense.json"
    for name, extra in (("dense", ["--ckpt", str(ckpt)]),
                        ("spd_zero_shot", ["--ckpt", str(ckpt), "--plan", str(plan)]),
                        ("spd_recovered", ["--ckpt", str(spd)])):
        path = out / f"eval_{name}.json"
        paired = ["--baseline", str(dense_json)] if tasks and name != "dense" else []
        times[f"eval_{name}"] = run([PY, "tools/evaluate.py", *extra, *ev, *paired,
                                     "--json", str(path)], f"4a. evaluate {name}")
        evals[name] = json.loads(path.read_text())
    times["generate"] = run([*TORCHRUN, "--nproc-per-node", "3", "tools/generate.py", "--ckpt",
                             str(spd), "--prompt", "The capital of France is", "--max-new-tokens",
                             "24", "--json", str(out / "generate.json")],
                            "4b. generate over 3 ranks with the sync points dropped")
    times["latency"] = run([*TORCHRUN, "--nproc-per-node", "3", "tools/benchmark.py", "measure",
                            "--model", str(ckpt), "--ratios", f"0,{args.ratio},1", "--prompt", "32",
                            "--new-tokens", "8", "--repeats", "3", "--link", "pcie", "--no-stock",
                            "--json", str(out / "latency.json")],
                           "4c. decode latency vs SPD ratio on a simulated 10 GB/s link")
    _summary(out, evals, times)


def _default_gguf() -> str:
    return str(default_gguf_path())


def _summary(out: Path, evals: dict, times: dict) -> None:
    print("\n=== summary")
    limit = evals["dense"].get("limit")
    print(f"{'model':16s} {'ppl':>8s}  6-task accuracy vs dense (points, paired s.e.)")
    for name, r in evals.items():
        d = r.get("vs_baseline")
        if name == "dense":
            change = "(the baseline)" if r["tasks"] else ""
        elif d is None:
            change = f"not measured: fewer than {MIN_ITEMS} items per task (--limit)"
        else:
            resolved = abs(d["delta"]) >= 2 * d["se"]
            change = (f"{100 * d['delta']:+.2f} +/- {100 * d['se']:.2f} on {limit} items per task"
                      + ("" if resolved else " (within noise)"))
        print(f"{name:16s} {r['ppl']:8.2f}  {change}")
    print(f"generation (3 ranks, SPD): {out / 'generate.json'}")
    print(f"latency vs SPD ratio: {out / 'latency.json'} (+ PNG beside it)")
    print("step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
