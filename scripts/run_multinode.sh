#!/usr/bin/env bash
# Multi-node training without Slurm: run this on every node, with the same
# RDZV_ENDPOINT (host:port of any one node, reachable from all) and the same
# Hydra overrides. torchrun's c10d rendezvous gathers the nodes and assigns
# ranks; mtrain reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from it.
#
#   # on each of 2 nodes with 8 GPUs:
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 \
#       scripts/run_multinode.sh cluster.nodes=2 parallel.pp=2 parallel.ep=8
#
# Environment:
#   NNODES          number of nodes (default 1); "MIN:MAX" allows elastic sizes
#   NPROC_PER_NODE  ranks per node, one per GPU (default 8); keep it equal to cluster.gpus_per_node
#   RDZV_ENDPOINT   host:port of the rendezvous (default 127.0.0.1:29400)
#   RDZV_ID         job id shared by the nodes of one run (default mtrain)
#   NODE_RANK       optional fixed node order; without it the rendezvous assigns one
#   MAX_RESTARTS    whole-group restarts after a failure (default 0); a restart
#                   resumes from the latest checkpoint
#   PYTHON          interpreter (default python)
# NCCL / InfiniBand variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...): see
# scripts/slurm/train.sbatch and docs/launch.md.
set -euo pipefail

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
RDZV_ID=${RDZV_ID:-mtrain}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

args=(
  --nnodes "$NNODES"
  --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d
  --rdzv-endpoint "$RDZV_ENDPOINT"
  --rdzv-id "$RDZV_ID"
  --max-restarts "$MAX_RESTARTS"
)
if [[ -n "${NODE_RANK:-}" ]]; then
  args+=(--node-rank "$NODE_RANK")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m mtrain.cli.train "$@"
