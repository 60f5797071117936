#!/usr/bin/env bash
# Run one jrlhf command on every worker of a TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE pipeline --config configs/smollm2_135m.py --set mesh.fsdp=8
#
# Every worker runs the same command; jax.distributed finds the pod's topology itself
# (JRLHF_DISTRIBUTED=auto), so no coordinator address is needed. The repository is expected at
# the same path on every worker: JRLHF_REPO, absolute or relative to the worker's home directory
# (default jrlhf, i.e. ~/jrlhf, cloned there with `make install` run in it).
# JRLHF_DRY_RUN=1 prints the gcloud command and what every worker would run, and exits.
set -euo pipefail

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Prints its arguments as shell words: bare where safe, else in single quotes.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[-A-Za-z0-9_./=:,@%+]+$ ]]; then
      out+=("$arg")
    else
      arg=${arg//\'/\'\\\'\'}
      out+=("'$arg'")
    fi
  done
  echo "${out[*]}"
}

DRY_RUN=${JRLHF_DRY_RUN:-0}
[[ $DRY_RUN =~ ^[01]$ ]] || die "JRLHF_DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[ $# -ge 3 ] || die "usage: $0 TPU_NAME ZONE JRLHF_ARGS..."
TPU_NAME=$1 ZONE=$2
shift 2
[[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "TPU_NAME must be lowercase letters, digits and hyphens, got '$TPU_NAME'"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] \
  || die "ZONE must be a zone like us-central2-b, got '$ZONE'"
REPO=${JRLHF_REPO:-jrlhf}

# The worker's shell parses the remote command, so each piece of it is quoted for that shell.
WORKER_ENV=(JRLHF_DISTRIBUTED=auto HF_HUB_OFFLINE=1)
WORKER_CMD=$(quote .venv/bin/jrlhf "$@")
REMOTE="cd $(quote "$REPO") && ${WORKER_ENV[*]} $WORKER_CMD"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if [ "$DRY_RUN" = 1 ]; then
  echo "# tpu_pod.sh dry run: every worker of $TPU_NAME ($ZONE) runs the same; nothing is started"
  echo "# worker: cd $(quote "$REPO")"
  for var in "${WORKER_ENV[@]}"; do
    echo "# worker: export $var"
  done
  echo "# worker: $WORKER_CMD"
  quote "${GCLOUD[@]}"
  exit 0
fi
exec "${GCLOUD[@]}"
