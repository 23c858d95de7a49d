#!/usr/bin/env python
"""Fine-tune an SPD model (its plan is inside the checkpoint) on text, at any TP x DP.

    torchrun --nproc-per-node 4 tools/finetune.py --tp 2 --ckpt CKPT --out FT_CKPT \
        --steps 200 --distill 0.5 --save FT_CKPT.train --save-interval 50 --json ft.json

World size / TP = data-parallel degree. Without --ckpt the default SmolLM2-135M is used; --plan
applies a plan to it first (e.g. 100% SPD without any recovery). A run whose --save directory
already holds a checkpoint resumes from it. The result at --out serves unchanged with
tools/generate.py and tools/evaluate.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_spd.train.loop import FinetuneConfig

    d = FinetuneConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="megatron-spd checkpoint, HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--plan", help="plan JSON to apply instead of the checkpoint's own")
    p.add_argument("--out", required=True, help="where the fine-tuned checkpoint is written")
    p.add_argument("--save", help="training-checkpoint directory (resumes from it if it holds one)")
    p.add_argument("--save-interval", type=int, default=d.save_interval, help="steps between training checkpoints")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: world size)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--data", help="local .txt/.jsonl/.parquet (default: bundled Wikipedia paragraphs)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per DP rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--lr-decay-style", default=d.decay_style, choices=["constant", "linear", "cosine"])
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="0 = no clipping")
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight of logit distillation from the dense teacher (0..1)")
    p.add_argument("--teacher",
                   help="teacher source, run with a dense plan (default: the dense model --ckpt "
                        "was derived from, as its checkpoint records; else --ckpt itself)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out blocks")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--log-interval", type=int, default=d.log_interval)
    p.add_argument("--keep", type=int, default=d.keep, help="training checkpoints to keep (0 = all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", help="write the report (loss curve, held-out loss) here")
    p.add_argument("--plot", help="write the loss-curve PNG here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron_spd import distributed
    from megatron_spd.train.loop import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        steps=args.steps, seq_len=args.seq_len, micro_batch=args.micro_batch,
        grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, decay_style=args.lr_decay_style,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, distill=args.distill,
        temperature=args.temperature, seed=args.seed, eval_samples=args.eval_samples,
        eval_interval=args.eval_interval, save_interval=args.save_interval,
        log_interval=args.log_interval, keep=args.keep)
    distributed.init(args.tp, seed=args.seed)
    try:
        finetune(args.ckpt, out=args.out, cfg=cfg, save_dir=args.save, plan=args.plan,
                 teacher_source=args.teacher, data_source=args.data, text_field=args.text_field,
                 sequence_parallel=args.sequence_parallel, json_out=args.json, plot=args.plot)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
