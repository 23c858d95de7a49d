#!/usr/bin/env bash
# Fine-tune an SPD model on two nodes with torchrun's c10d rendezvous.
#
# On a cluster run the same command on both nodes; only NODE_RANK differs. MASTER is an address
# of node 0 that node 1 can reach (HOST:PORT, any free port):
#
#   node 0:  NODE_RANK=0 MASTER=host0:29500 examples/finetune_2nodes.sh NPROC TP [args]
#   node 1:  NODE_RANK=1 MASTER=host0:29500 examples/finetune_2nodes.sh NPROC TP [args]
#
# World = 2 x NPROC ranks; megatron puts consecutive ranks in one TP group, so with TP = NPROC
# each node holds one TP group (fast intra-node links) and the nodes are data-parallel replicas:
# gradients cross the slow link once per step, in megatron DDP's all-reduce. Checkpoints and the
# output go to paths every node can see (a shared filesystem), as with Megatron-LM's --save.
#
# Without NODE_RANK the script starts both "nodes" on this machine through 127.0.0.1 (a smoke
# test of the multi-node path; default NPROC=3, TP=3 for SmolLM2's G=3, i.e. 6 ranks, DP=2):
#
#   examples/finetune_2nodes.sh 3 3 --plan plan.json --steps 20 --seq-len 128
#
# MEGATRON_LM_DIR switches to Megatron-LM's patched pretrain_gpt.py exactly as in
# examples/finetune_1node.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/finetune/ft_2nodes}
source examples/finetune_command.sh
launch() {  # $1 = node rank, $2 = rendezvous endpoint
  "$PY" -m torch.distributed.run --nnodes 2 --node-rank "$1" --nproc-per-node "$NPROC" \
      --rdzv-backend c10d --rdzv-endpoint "$2" --rdzv-id "spd-ft-${2//[:.]/-}" "${CMD[@]}"
}
if [[ -n "${NODE_RANK:-}" ]]; then
  : "${MASTER:?set MASTER=host:port of node 0}"
  launch "$NODE_RANK" "$MASTER"
  exit
fi
PORT=${PORT:-$("$PY" -c 'from megatron_spd.parallel.distributed import free_port; print(free_port())')}
pids=()
for node in 0 1; do
  launch "$node" "127.0.0.1:$PORT" > >(sed "s/^/[node $node] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
