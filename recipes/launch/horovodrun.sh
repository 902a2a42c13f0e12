#!/usr/bin/env bash
# Launch an ImageNet recipe with Horovod's launcher under async_pred_horovod (the stale-synchronous transport
# over Horovod's allreduce_async_, NCCL on GPU). One command on the first host starts every rank over ssh;
# Lightning reads ranks and sizes from Horovod's variables (--trainer.devices = GPUs per host,
# --trainer.num_nodes = hosts).
#
#   HOSTS=host1:8,host2:8 DATA=/data/imagenet recipes/launch/horovodrun.sh resnet50
#   HOSTS=localhost:2 DATA=/data/imagenet recipes/launch/horovodrun.sh resnet50 --trainer.max_epochs 1
# Needs Horovod on every host: asyncpred-install-horovod (builds 0.28.1 against the installed torch, cached).
set -euo pipefail

RECIPE="${1:-resnet50}"            # resnet50 | googlenet | nin (recipes/<name>.yaml)
shift || true
HOSTS="${HOSTS:?set HOSTS, e.g. host1:8,host2:8 (host:processes, one process per GPU)}"
DATA="${DATA:?set DATA to the ImageNet folder holding train/ and val/}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

IFS=, read -r -a SLOTS <<< "${HOSTS}"
NNODES="${#SLOTS[@]}"
PER_NODE="${SLOTS[0]##*:}"
NP=$(( NNODES * PER_NODE ))
export OMP_NUM_THREADS=1
THREADS="${THREADS:-$(( $(nproc) / PER_NODE > 1 ? $(nproc) / PER_NODE : 1 ))}"

exec horovodrun -np "${NP}" -H "${HOSTS}" \
  python -m lightning_asyncpred fit \
  --config "${HERE}/../${RECIPE}.yaml" \
  --trainer.strategy lightning_asyncpred.AsyncPredStrategy \
  --trainer.strategy.transport horovod \
  --trainer.devices "${PER_NODE}" \
  --trainer.num_nodes "${NNODES}" \
  --data.root "${DATA}" \
  --data.num_threads "${THREADS}" \
  "$@"
