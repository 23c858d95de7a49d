#!/usr/bin/env bash
# Text generation over two nodes with torchrun's standard c10d rendezvous.
#
# On a real cluster run the same command on both nodes; only --node-rank differs. HOST:PORT is
# an address of node 0 that node 1 can reach (any free port), and the rendezvous id is any string
# both nodes agree on:
#
#   node 0:  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 3 \
#              --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id spd-gen \
#              tools/generate.py --tp 3 --prompt "The capital of France is" --prompt "Water boils at"
#   node 1:  torchrun --nnodes 2 --node-rank 1 --nproc-per-node 3 \
#              --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id spd-gen \
#              tools/generate.py --tp 3 --prompt "The capital of France is" --prompt "Water boils at"
#
# That is 6 ranks at TP=3: megatron puts consecutive ranks in a TP group, so each node holds one
# TP=3 replica (fast intra-node links) and the two replicas share the prompts (data parallel).
# Global rank 0 (on node 0) streams the first prompt and prints every result.
#
# To put one TP group *across* the nodes (the paper's low-bandwidth setting, where dropping sync
# points pays most), give the nodes ranks that add up to the TP degree, e.g. TP=3 as 2 + 1:
#
#   node 0:  torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 ... tools/generate.py --tp 3 ...
#   node 1:  torchrun --nnodes 2 --node-rank 1 --nproc-per-node 1 ... tools/generate.py --tp 3 ...
#
# Pass --ckpt DIR for a saved (e.g. SPD) checkpoint, and --timeout-s S to bound how long ranks
# wait for a node that died (they then exit with an error naming the failure, never hang).
#
# This script runs such a pair of "nodes" on one machine through 127.0.0.1:
#
#   [TP=3] examples/generate_2nodes.sh [dp|cross] [tools/generate.py arguments]
#
#   dp     (default) 2 nodes x TP ranks, two data-parallel replicas (TP=1 is the light version)
#   cross  TP-1 + 1 ranks, one TP group spanning both nodes (TP >= 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODE=${1:-dp}
[[ $# -gt 0 ]] && shift
TP=${TP:-3}
case "$MODE" in
  dp)    NPROC=("$TP" "$TP") ;;
  cross) NPROC=($((TP - 1)) 1) ;;
  *) echo "usage: $0 [dp|cross] [tools/generate.py arguments]" >&2; exit 2 ;;
esac
PORT=${PORT:-$("$PY" -c 'from megatron_spd.parallel.distributed import free_port; print(free_port())')}
ARGS=("$@")
[[ ${#ARGS[@]} -eq 0 ]] && ARGS=(--prompt "The capital of France is" --prompt "Water boils at"
                                 --max-new-tokens 12)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=()
for node in 0 1; do
  "$PY" -m torch.distributed.run --nnodes 2 --node-rank "$node" --nproc-per-node "${NPROC[$node]}" \
      --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$PORT" --rdzv-id "spd-gen-$PORT" \
      tools/generate.py --tp "$TP" "${ARGS[@]}" > >(sed "s/^/[node $node] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
