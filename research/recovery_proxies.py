#!/usr/bin/env python
"""The cheap comparisons behind docs/recovery.md: recovery variants at 100 % SPD by perplexity.

Each call recovers SmolLM2-135M with every block SPD (G=3) one way and appends a line to
--out (JSON lines): perplexity on the first 4096 tokens of the held-out Wikipedia split and of
CoQA's non-Wikipedia stories (ctx 512), the recovery's wall/CPU time, the per-block B2B losses
and compensation fits. No task is scored here (that is research/recovery.py, for the variants
these numbers single out). Examples (the committed docs/recovery/proxies.jsonl):

    python research/recovery_proxies.py zs_c0 --strategy zs --rank 0
    python research/recovery_proxies.py hg_c0_b2b_seq --rank 0 --b2b --calib 8 --inputs spd \\
        --targets trajectory
    python research/recovery_proxies.py e2e_seq_20 --e2e-from hg_c0_b2b_seq --steps 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from recovery import coqa_stories  # research/recovery.py, beside this script

from megatron_spd.checkpoint.save import save_checkpoint
from megatron_spd.cli import logs
from megatron_spd.core.plan import SPDPlan
from megatron_spd.core.sharding import load_full_state_dict
from megatron_spd.core.spec import build_model
from megatron_spd.data.texts import calibration_batches, load_texts
from megatron_spd.evaluate import perplexity
from megatron_spd.loading.open_model import open_model
from megatron_spd.loading.run_config import RunConfig
from megatron_spd.loading.sources import load_weights
from megatron_spd.parallel import distributed
from megatron_spd.recipe import autoplan, distill
from megatron_spd.train.loop import FinetuneConfig, finetune
from paths import ROOT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="name of this variant (its line in --out, its weights file)")
    p.add_argument("--strategy", default="hg", choices=["zs", "b2b", "hg"])
    p.add_argument("--rank", type=int, default=-1, help="compensation rank (-1: none)")
    p.add_argument("--ranks", default="", help="per-block ranks, e.g. 0:16,11:16")
    p.add_argument("--comp-inputs", default="ln1", choices=["ln1", "ln1+partial"])
    p.add_argument("--b2b", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-search", default="", help="comma-separated candidate lrs")
    p.add_argument("--loss", default="mse", choices=["mse", "relative"])
    p.add_argument("--inputs", default="dense", choices=["dense", "spd"])
    p.add_argument("--targets", default="block", choices=["block", "trajectory"])
    p.add_argument("--calib", type=int, default=16, help="calibration sequences of 512 tokens")
    p.add_argument("--e2e-from", default=None,
                   help="instead: end-to-end distillation from this variant's weights")
    p.add_argument("--steps", type=int, default=20, help="end-to-end optimizer steps")
    p.add_argument("--work", default=str(ROOT / "runs" / "recovery_proxies"))
    p.add_argument("--out", default=str(ROOT / "runs" / "recovery_proxies" / "proxies.jsonl"))
    return p.parse_args(argv)


def proxies_table(records: list[dict]) -> str:
    """The markdown table of a proxies file (docs/recovery.md holds the committed one's;
    tests/test_docs.py checks it)."""
    lines = ["| variant | strategy | compensation rank | B2B (inputs, targets, epochs, lr) | "
             "calibration x 512 | ppl Wikipedia eval | ppl CoQA | recovery s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        a = r["args"]
        if "src" in a:  # end-to-end distillation from another variant
            lines.append(f"| {r['name']} | from {a['src']} | | {a['steps']} end-to-end steps | | "
                         f"{r['ppl']['wikipedia_eval']:.2f} | "
                         f"{r['ppl']['coqa_non_wikipedia']:.2f} | {r['recover_s']:.0f} |")
            continue
        comp = "-" if a["rank"] < 0 else str(a["rank"]) + (f" ({a['ranks']})" if a.get("ranks") else "")
        lr = a["lr_search"] or a["lr"]
        b2b = "-" if not a["b2b"] else (f"{a['inputs']}, {a['targets']}, {a['epochs']}, {lr}"
                                         + (", relative loss" if a.get("loss") == "relative" else ""))
        lines.append(f"| {r['name']} | {a['strategy']} | {comp} | {b2b} | {a['calib']} | "
                     f"{r['ppl']['wikipedia_eval']:.2f} | {r['ppl']['coqa_non_wikipedia']:.2f} | "
                     f"{r['recover_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    logs.setup()  # the package's own lines (as tools/*.py show them)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    distributed.init(1)
    cfg, full, tok, _ = load_weights(None, progress=False)
    L = cfg.num_layers
    t0, c0 = time.time(), time.process_time()
    record: dict = {}
    if args.e2e_from:
        src = work / f"{args.e2e_from}_ckpt"
        if not src.exists():
            saved = torch.load(work / f"{args.e2e_from}.pt", weights_only=True)
            plan = SPDPlan.from_dict(saved["plan"])
            m = build_model(cfg, plan)
            load_full_state_dict(m, {**full, **saved["full"]})
            save_checkpoint(m, src, config=cfg, plan=plan, tokenizer=tok, dense_source="default")
            del m
        ft = FinetuneConfig(steps=args.steps, seq_len=256, micro_batch=4, lr=1e-4,
                            warmup_steps=2, distill=1.0, eval_samples=8, log_interval=5)
        rep = finetune(RunConfig(str(src)), ft, out=work / f"{args.name}_ckpt", progress=False)
        record["held_out_loss"] = [rep["held_out_loss_before"], rep["held_out_loss_after"]]
        lm = open_model(work / f"{args.name}_ckpt")
        model, plan = lm.model, lm.plan
    else:
        extra = {}
        if args.rank >= 0:
            extra["compensation"] = {"blocks": list(range(L)), "rank": args.rank,
                                     "inputs": args.comp_inputs}
            if args.ranks:
                extra["compensation"]["ranks"] = {
                    k: int(v) for k, v in (kv.split(":") for kv in args.ranks.split(","))}
        plan = SPDPlan(3, [args.strategy] * L, extra)
        b2b = distill.B2BConfig(
            epochs=args.epochs, lr=args.lr, inputs=args.inputs, targets=args.targets,
            lr_search=tuple(float(x) for x in args.lr_search.split(",") if x),
            loss=args.loss) if args.b2b else None
        model, new_full, plan = autoplan.recover_with_plan(
            cfg, full, plan, calibration_batches(tok, args.calib, 512), b2b=b2b, progress=False)
        torch.save({"full": {k: v for k, v in new_full.items() if k.startswith("decoder.layers")},
                    "plan": plan.to_dict()}, work / f"{args.name}.pt")
    seconds, cpu = time.time() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        ppl = {name: perplexity(model, tok, texts, ctx=512, n_tokens=4096, desc=None)["ppl"]
               for name, texts in (("wikipedia_eval", load_texts(split="eval")),
                                   ("coqa_non_wikipedia", load_texts(coqa_stories(work))))}
    b2b_rec = (plan.extra.get("b2b") or {}).get("blocks") or {}
    record.update(
        name=args.name, args=vars(args), ppl=ppl, recover_s=round(seconds, 1),
        recover_cpu_s=round(cpu, 1),
        b2b={k: [v["mse_before"], v["mse_after"], v["lr"]] for k, v in b2b_rec.items()},
        compensation_explained={k: v["explained"] for k, v in (
            (plan.extra.get("compensation") or {}).get("fit") or {}).items()})
    print(json.dumps(record), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    distributed.shutdown()


if __name__ == "__main__":
    main()
