#!/usr/bin/env bash
# Multi-node `calibrl train` with torchrun. Run it once on every node, with the same arguments.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       tools/launch/multinode.sh --config configs/qwen2_5_vl_7b.yaml train.run_dir=/shared/runs/x
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       tools/launch/multinode.sh --config configs/qwen2_5_vl_7b.yaml train.run_dir=/shared/runs/x
#
# Environment (all but NNODES/NODE_RANK/MASTER_ADDR have defaults):
#   NNODES          number of nodes (torchrun agents)
#   NODE_RANK       this node's index, 0 .. NNODES-1; node 0 hosts the rendezvous store
#   MASTER_ADDR     address of node 0, reachable from every node
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE  trainer processes per node (default 1; on GPU nodes: the number of GPUs)
#   RDZV_BACKEND    c10d (default: elastic rendezvous hosted by node 0; global ranks are assigned in
#                   joining order) or static (--node_rank/--master_addr: node 0 holds global rank 0)
#   RUN_ID          rendezvous id, the same on all nodes (default: calibrl)
#   PYTHON          interpreter with calibrl-mcore installed (default: python)
# Everything after the script name goes to `calibrl train` (--config FILE and key.sub=value overrides).
#
# Global rank 0 starts the colocated rollout server on its own loopback and writes metrics and the
# checkpoint pointer, so train.run_dir must be on a file system every node shares. With pipeline stages
# on other nodes than rank 0, pass rollout.urls=[http://host:port] of servers every node can reach.
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RUN_ID="${RUN_ID:-calibrl}"
PYTHON="${PYTHON:-python}"

if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
    echo "multinode.sh: NODE_RANK=$NODE_RANK must be in 0 .. $((NNODES - 1))" >&2
    exit 2
fi

# The repository root on the path (relative --config / run_dir paths stay relative to the caller's cwd).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "$RDZV_BACKEND" in
    c10d)
        is_host=0; (( NODE_RANK == 0 )) && is_host=1
        rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_ID"
              --rdzv_conf "is_host=$is_host")
        ;;
    static)
        rdzv=(--rdzv_backend static --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
              --master_port "$MASTER_PORT")
        ;;
    *)
        echo "multinode.sh: RDZV_BACKEND=$RDZV_BACKEND: expected c10d or static" >&2
        exit 2
        ;;
esac

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${rdzv[@]}" \
    -m calibrl_mcore.cli train "$@"
