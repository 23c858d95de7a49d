#!/usr/bin/env bash
# What full fine-tuning adds to B2B at 100% SPD on SmolLM2-135M (G=3): the number issue 7 asks for.
#
#   examples/finetune_vs_b2b.sh            # from the repo root (or anywhere)
#
# Steps, each a real tool (every step is skipped when its output exists, so a rerun resumes):
#   1. plan: every block SPD, each to be distilled (tools/spd.py sensitivity + plan);
#   2. B2B of all 30 blocks on the calibration split (tools/spd.py distill) -> $OUT/b2b;
#   3. fine-tune that checkpoint through megatron-core (tools/finetune.py): LM loss plus logit
#      distillation from the original dense SmolLM2 (TEACHER; new B2B checkpoints record it, so
#      this is also the default), on the train split -> $OUT/b2b_ft;
#   4. evaluate both on the same items (tools/evaluate.py; the second with --baseline, which
#      reports the 6-task change with its paired standard error) and print the comparison.
# Runs in the one-process emulation of G=3 (fastest on a 2-core CPU); prefix the tools with
# `torchrun --nproc-per-node 3 ... --tp 3` for the distributed run (same numbers, tested).
# Knobs: OUT, LIMIT (items per task), STEPS, SEQ_LEN, MICRO_BATCH, LR, DISTILL, TEACHER.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ft_vs_b2b}
LIMIT=${LIMIT:-100}
STEPS=${STEPS:-40}
export PYTHONWARNINGS=ignore
mkdir -p "$OUT"

step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

if [[ ! -f $OUT/plan.json ]]; then
  step "1. plan: 100% SPD, every block distilled"
  "$PY" tools/spd.py sensitivity --samples 2 --seq-len 128 --json "$OUT/sensitivity.json"
  "$PY" tools/spd.py plan --sensitivity "$OUT/sensitivity.json" --ratio 1 --strategy b2b \
    --out "$OUT/plan.json"
fi
if [[ ! -d $OUT/b2b ]]; then
  step "2. B2B of every block (4 x 512 calibration tokens, 2 epochs)"
  "$PY" tools/spd.py distill --plan "$OUT/plan.json" --samples 4 --seq-len 512 --epochs 2 \
    --lr 1e-3 --out "$OUT/b2b" --json "$OUT/b2b.json"
fi
if [[ ! -d $OUT/b2b_ft ]]; then
  step "3. fine-tune the B2B checkpoint ($STEPS steps)"
  "$PY" tools/finetune.py --ckpt "$OUT/b2b" --steps "$STEPS" --seq-len "${SEQ_LEN:-256}" \
    --micro-batch "${MICRO_BATCH:-4}" --lr "${LR:-1e-4}" --warmup-steps 2 \
    --distill "${DISTILL:-0.5}" --teacher "${TEACHER:-default}" --eval-samples 16 --eval-interval 10 --log-interval 5 \
    --out "$OUT/b2b_ft" --save "$OUT/b2b_ft.train" --save-interval 10 \
    --json "$OUT/b2b_ft.json" --plot "$OUT/b2b_ft.png"
fi
EVAL=(--limit "$LIMIT" --ppl-split eval --ppl-tokens 8192)
if [[ ! -f $OUT/eval_b2b.json ]]; then
  step "4a. evaluate B2B alone"
  "$PY" tools/evaluate.py --ckpt "$OUT/b2b" "${EVAL[@]}" --json "$OUT/eval_b2b.json"
fi
step "4b. evaluate B2B + fine-tune, paired with 4a"
"$PY" tools/evaluate.py --ckpt "$OUT/b2b_ft" "${EVAL[@]}" --baseline "$OUT/eval_b2b.json" \
  --json "$OUT/eval_b2b_ft.json"
