#!/usr/bin/env python
"""Does the one command, ``tools/spd.py recover``, reproduce the rows research/recovery.py reports?

    python tools/spd.py recover --work rec100/                       # the one command (defaults)
    .venv/bin/python research/recover_reproduce.py rec100/ runs/recovery200 \\
        --out docs/recovery/items200/recover_reproduce.json
    python tools/spd.py recover --work rec75/ --ratio 0.75 --e2e-tokens 0   # sweep + block-wise
    .venv/bin/python research/recover_reproduce.py rec75/ runs/recovery200 --ratio 0.75 \\
        --out docs/recovery/items200/recover_reproduce75.json

Both run the same package functions, so the models should be the same bit for bit. Per stage the
command ran (``blockwise``, ``end-to-end``) this compares its checkpoint with research/recovery.py's
at the same ratio (``ckpt/recipe@<r>``, ``ckpt/recipe_e2e_long@<r>``): the plan, every tensor's
largest absolute difference, and the closeness that ``recover.json`` recorded with the one
research/recovery.py measured on the same held-out Wikipedia tokens (``eval/<key>.closeness.json``,
where it exists); below 100 % also the sensitivity sweeps the plans came from. It writes them as
JSON with the command's own record (settings, seconds per stage).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_spd.checkpoint.read import read_checkpoint, read_full_state_dict
from megatron_spd.files import atomic_write_json

#: the command's stage -> the research/recovery.py method with the same settings
STAGES = {"blockwise": "recipe", "end-to-end": "recipe_e2e_long"}


def compare(a: Path, b: Path) -> dict:
    """Plan equality and the largest absolute weight difference of two megatron-spd checkpoints."""
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    wa, wb = read_full_state_dict(ca), read_full_state_dict(cb)
    if set(wa) != set(wb):
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(set(wa) ^ set(wb))[:5]}")
    diffs = {k: (wa[k].double() - wb[k].double()).abs().max().item() for k in wa}
    worst = max(diffs, key=diffs.get)
    return {"same_plan": ca.plan.strategies == cb.plan.strategies
            and ca.plan.extra.get("compensation") == cb.plan.extra.get("compensation"),
            "tensors": len(diffs), "identical_tensors": sum(d == 0 for d in diffs.values()),
            "max_abs_diff": diffs[worst], "worst_tensor": worst}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recover_work", help="the --work directory of tools/spd.py recover")
    p.add_argument("research_work", help="research/recovery.py's --work directory")
    p.add_argument("--ratio", type=float, default=1.0, help="the command's --ratio")
    p.add_argument("--out", required=True, help="JSON to write")
    args = p.parse_args(argv)
    rec, res = Path(args.recover_work), Path(args.research_work)
    state = json.loads((rec / "recover.json").read_text())
    # the work directories as given here (recover.json holds its own as an absolute path)
    command = (state.get("command") or "").replace(str(rec.resolve()), args.recover_work)
    out = {"command": command, "stages": {}}
    if args.ratio < 1:
        sweeps = [json.loads(p.read_text()) for p in (rec / "sensitivity.json",
                                                      res / "sensitivity.json")]
        out["same_sensitivity"] = sweeps[0]["sensitivity"] == sweeps[1]["sensitivity"]
    for stage, method in STAGES.items():
        if stage not in state["stages"]:
            continue
        key = f"{method}@{args.ratio:g}"
        got = compare(rec / stage, res / "ckpt" / key)
        got["research_row"] = key
        got["recover_seconds"] = state["stages"][stage]["seconds"]
        got["recover_closeness"] = state["stages"][stage]["result"]
        research = res / "eval" / f"{key}.closeness.json"
        if research.exists():
            got["research_closeness"] = json.loads(research.read_text())["wikipedia_eval"]
        out["stages"][stage] = got
        print(f"{stage} vs {key}: {got['identical_tensors']}/{got['tensors']} tensors identical, "
              f"max |diff| {got['max_abs_diff']:.3g} ({got['worst_tensor']})")
    out["sources"] = {"recover_work": args.recover_work, "research_work": args.research_work}
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
