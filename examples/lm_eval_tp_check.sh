#!/usr/bin/env bash
# lm-eval's command line with the megatron-spd backend: a torchrun TP=3 run of an SPD plan against
# the same plan's TP=1 emulation, item by item (SmolLM2-135M has G=3, so T=3; no network).
#   bash examples/lm_eval_tp_check.sh PLAN.json OUT_DIR [LIMIT]
set -euo pipefail
plan=$1 out=$2 limit=${3:-2}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
args=(--model megatron-spd --tasks spd_paper --include_path megatron_spd/integrations/lm_eval_tasks
      --limit "$limit" --log_samples)
python tools/lm_eval_spd.py "${args[@]}" --model_args "plan=$plan" --output_path "$out/tp1"
torchrun --nproc-per-node 3 tools/lm_eval_spd.py "${args[@]}" --model_args "plan=$plan,tp=3" \
  --output_path "$out/tp3"
python - "$out" <<'PY'
import sys
from megatron_spd.integrations.lm_eval_agreement import compare, logged_items
tp1, tp3 = (logged_items(f"{sys.argv[1]}/{t}") for t in ("tp1", "tp3"))
assert sorted(tp1) == sorted(tp3), (sorted(tp1), sorted(tp3))
for task in sorted(tp1):
    print(task, compare(tp3[task], tp1[task]))
PY
