# Sourced by examples/finetune_1node.sh and finetune_2nodes.sh (not run on its own): reads
# NPROC and TP from the first two arguments and sets CMD, the per-rank program with its arguments:
# tools/finetune.py, or Megatron-LM's patched pretrain_gpt.py when MEGATRON_LM_DIR is set.
# Expects OUT (output checkpoint) to be set; SAVE defaults to $OUT.train.
PY=${PYTHON:-.venv/bin/python}
NPROC=${1:-3}
TP=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
SAVE=${SAVE:-$OUT.train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ -n "${MEGATRON_LM_DIR:-}" ]]; then
  export PYTHONPATH="$MEGATRON_LM_DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron-LM asserts it at TP > 1 (kernel ordering)
  CMD=("$MEGATRON_LM_DIR/pretrain_gpt.py" --tensor-model-parallel-size "$TP" "$@")
else
  CMD=(tools/finetune.py --tp "$TP" --out "$OUT" --save "$SAVE"
       --save-interval "${SAVE_INTERVAL:-50}" --json "$OUT.json" --plot "$OUT.png" "$@")
fi
