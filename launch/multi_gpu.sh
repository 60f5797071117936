#!/usr/bin/env bash
# One jrlhf process per GPU host; all GPUs of a host belong to its process.
#
# On each of N hosts (host 0 is the coordinator):
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=0 launch/multi_gpu.sh ppo --config configs/x.py
#   COORDINATOR=10.0.0.1:1234 NUM_HOSTS=2 HOST_ID=1 launch/multi_gpu.sh ppo --config configs/x.py
#
# With NUM_HOSTS=1 (the default) it is a plain single-host run over all local GPUs.
# Install the CUDA build once per host: .venv/bin/pip install -e '.[cuda]'
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_HOSTS=${NUM_HOSTS:-1}
if [ "$NUM_HOSTS" -gt 1 ]; then
  : "${COORDINATOR:?set COORDINATOR=host:port (the address of host 0)}"
  : "${HOST_ID:?set HOST_ID (0..NUM_HOSTS-1)}"
  export JRLHF_COORDINATOR=$COORDINATOR JRLHF_NUM_PROCESSES=$NUM_HOSTS JRLHF_PROCESS_ID=$HOST_ID
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/jrlhf "$@"
