#!/usr/bin/env bash
# One jrlhf process per GPU host; all GPUs of a host belong to its process.
#
# On each of N hosts (host 0 is the coordinator):
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 launch/multi_gpu.sh ppo --config configs/x.py
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=1 launch/multi_gpu.sh ppo --config configs/x.py
#
# With NUM_HOSTS=1 (the default) it is a plain single-host run over all local GPUs.
# JRLHF_DRY_RUN=1 prints what this host would run (directory, environment, command) and exits.
# Install the CUDA build once per host: .venv/bin/pip install -e '.[cuda]'
set -euo pipefail

die() {
  echo "multi_gpu.sh: $*" >&2
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
[ $# -ge 1 ] || die "usage: [COORDINATOR=host:port NUM_HOSTS=N HOST_ID=i] $0 JRLHF_ARGS..."
NUM_HOSTS=${NUM_HOSTS:-1}
[[ $NUM_HOSTS =~ ^[1-9][0-9]{0,5}$ ]] \
  || die "NUM_HOSTS must be a positive integer, got '$NUM_HOSTS'"
if [ "$NUM_HOSTS" -gt 1 ]; then
  [ -n "${COORDINATOR:-}" ] \
    || die "NUM_HOSTS=$NUM_HOSTS needs COORDINATOR=host:port (host 0's address)"
  [[ $COORDINATOR =~ ^[^[:space:]]+:[0-9]+$ ]] \
    || die "COORDINATOR must be host:port, got '$COORDINATOR'"
  [ -n "${HOST_ID:-}" ] || die "NUM_HOSTS=$NUM_HOSTS needs HOST_ID in [0, $NUM_HOSTS)"
fi
HOST_ID=${HOST_ID:-0}
if ! [[ $HOST_ID =~ ^(0|[1-9][0-9]{0,5})$ ]] || [ "$HOST_ID" -ge "$NUM_HOSTS" ]; then
  die "HOST_ID must be in [0, $NUM_HOSTS), got '$HOST_ID'"
fi

# jrlhf gets only this script's variables: an inherited JRLHF_DISTRIBUTED=auto would win over them.
unset JRLHF_DISTRIBUTED JRLHF_COORDINATOR JRLHF_NUM_PROCESSES JRLHF_PROCESS_ID
ENV=(HF_HUB_OFFLINE=1)
if [ "$NUM_HOSTS" -gt 1 ]; then
  ENV+=("JRLHF_COORDINATOR=$COORDINATOR" "JRLHF_NUM_PROCESSES=$NUM_HOSTS"
    "JRLHF_PROCESS_ID=$HOST_ID")
fi
cd "$(dirname "$0")/.."
CMD=(.venv/bin/jrlhf "$@")
if [ "$DRY_RUN" = 1 ]; then
  echo "# multi_gpu.sh dry run: host $HOST_ID of $NUM_HOSTS (this host); nothing is started"
  echo "cd $(quote "$PWD")"
  echo "unset JRLHF_DISTRIBUTED JRLHF_COORDINATOR JRLHF_NUM_PROCESSES JRLHF_PROCESS_ID"
  for var in "${ENV[@]}"; do
    echo "export ${var%%=*}=$(quote "${var#*=}")"
  done
  quote "${CMD[@]}"
  exit 0
fi
export "${ENV[@]}"
exec "${CMD[@]}"
