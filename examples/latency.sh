#!/usr/bin/env bash
# One command for docs/latency.md: measured SPD latency sweeps on this machine (SmolLM2-135M at
# TP=3, random-weight LLaMA shapes at TP=2 and 4; every SPD ratio plus stock megatron-core in the
# same run) and the analytic projection to LLaMA-2 7B/13B/70B. JSON and PNG land in
# docs/latency/. About 5 minutes on 2 idle cores (much longer on a busy one); REPEATS=2 for a
# quick look.
#
#   examples/latency.sh            # from the repo root (or anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-docs/latency}
REPEATS=${REPEATS:-4}
export PYTHONWARNINGS=ignore

measure() {  # measure NPROC NAME ARGS...: one tools/benchmark.py sweep under torchrun
  local nproc=$1 name=$2
  shift 2
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" tools/benchmark.py \
    measure --repeats "$REPEATS" --json "$OUT/$name.json" "$@"
}

# SmolLM2-135M (G=3): the link time-dilated to an A100's compute share, then gloo as is.
measure 3 smollm2_tp3_pcie --model default --prompt 32 --new-tokens 8 --link pcie --link-scale auto
measure 3 smollm2_tp3_gloo --model default --prompt 32 --new-tokens 8
# Random-weight LLaMA shape (8 layers, hidden 512) at TP=2 and TP=4 (4 ranks on 2 cores).
measure 2 llama-s_tp2_pcie --model llama-s --prompt 64 --new-tokens 8 --link pcie --link-scale auto
measure 4 llama-s_tp4_pcie --model llama-s --prompt 64 --new-tokens 8 --link pcie --link-scale auto

"$PY" tools/benchmark.py project --json "$OUT/projection.json"
"$PY" tools/benchmark.py report --projection "$OUT/projection.json" --out docs/latency.md \
  --command examples/latency.sh \
  --measured "$OUT/smollm2_tp3_pcie.json" "$OUT/smollm2_tp3_gloo.json" \
  "$OUT/llama-s_tp2_pcie.json" "$OUT/llama-s_tp4_pcie.json"
