#!/usr/bin/env bash
# Fine-tune an SPD model on one node: TP x DP = --nproc-per-node.
#
#   examples/finetune_1node.sh [NPROC] [TP] [extra tools/finetune.py arguments]
#
# Default: 3 processes at TP=3 (DP=1): SmolLM2-135M allows G=3 only, and TP must divide the
# plan's G. World size / TP is the data-parallel degree. Examples:
#
#   examples/finetune_1node.sh 3 3 --plan plan.json --steps 200 --distill 0.5   # TP=3
#   examples/finetune_1node.sh 6 3 --ckpt runs/b2b_ckpt --steps 200             # TP=3 x DP=2
#
# The run resumes from $SAVE when it holds a checkpoint (kill it and start it again).
#
# Megatron-LM route: with MEGATRON_LM_DIR set to a Megatron-LM core_v0.16.1 checkout patched with
# patches/megatron-lm-core_v0.16.1-spd.patch, the same launch runs Megatron-LM's pretrain_gpt.py
# with --spd-plan instead; give its usual model/data arguments after TP (see patches/README.md):
#
#   MEGATRON_LM_DIR=~/Megatron-LM examples/finetune_1node.sh 8 8 --spd-plan plan.json \
#       --transformer-impl local --num-layers 32 ... --data-path ... --load ... --save ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/finetune/ft_1node}
source examples/finetune_command.sh
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "${CMD[@]}"
