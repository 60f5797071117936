#!/usr/bin/env bash
# Run one jrlhf command on every worker of a TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE pipeline --config configs/smollm2_135m.py --set mesh.fsdp=8
#
# Every worker runs the same command; jax.distributed finds the pod's topology itself
# (JRLHF_DISTRIBUTED=auto), so no coordinator address is needed. The repository is expected at
# the same path on every worker (e.g. cloned into ~/jrlhf with `make install` run there).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE JRLHF_ARGS..." >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2
shift 2
REPO=${JRLHF_REPO:-~/jrlhf}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && JRLHF_DISTRIBUTED=auto HF_HUB_OFFLINE=1 .venv/bin/jrlhf$ARGS"
