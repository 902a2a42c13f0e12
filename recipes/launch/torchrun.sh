#!/usr/bin/env bash
# Launch an ImageNet recipe on one or more nodes with torchrun (Lightning detects the TorchElastic
# environment: every process is one rank; --trainer.devices must equal --nproc-per-node and
# --trainer.num_nodes must equal --nnodes).
#
# On every node (same command; NODE_RANK 0..NNODES-1, MASTER_ADDR = the first node's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 DATA=/data/imagenet recipes/launch/torchrun.sh resnet50
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node001 DATA=/data/imagenet recipes/launch/torchrun.sh resnet50
# Extra arguments go to `asyncpred fit`, e.g. `... resnet50 --trainer.max_epochs 45`.
set -euo pipefail

RECIPE="${1:-resnet50}"            # resnet50 | googlenet | nin (recipes/<name>.yaml)
shift || true
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
# the GPUs this node's processes can use: what torch sees, so CUDA_VISIBLE_DEVICES is honoured
GPUS_PER_NODE="${GPUS_PER_NODE:-$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
if (( GPUS_PER_NODE < 1 )); then
  echo "torchrun.sh: no GPU visible to torch (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); set GPUS_PER_NODE" >&2
  exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DATA="${DATA:?set DATA to the ImageNet folder holding train/ and val/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# DALI threads per rank: the node's cores shared among its GPUs
export OMP_NUM_THREADS=1
THREADS="${THREADS:-$(( $(nproc) / GPUS_PER_NODE > 1 ? $(nproc) / GPUS_PER_NODE : 1 ))}"

exec torchrun \
  --nnodes "${NNODES}" \
  --node-rank "${NODE_RANK}" \
  --nproc-per-node "${GPUS_PER_NODE}" \
  --master-addr "${MASTER_ADDR}" \
  --master-port "${MASTER_PORT}" \
  -m lightning_asyncpred fit \
  --config "${HERE}/../${RECIPE}.yaml" \
  --data.root "${DATA}" \
  --data.num_threads "${THREADS}" \
  --trainer.devices "${GPUS_PER_NODE}" \
  --trainer.num_nodes "${NNODES}" \
  "$@"
