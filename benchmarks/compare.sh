#!/usr/bin/env bash
# Side-by-side benchmark of jrlhf and TRL on the same work (shared/BENCHMARK.md).
# Sets up its own virtualenv for TRL (CPU torch 2.13.0 + trl 1.12.0, the last release with a PPO
# trainer); neither becomes a dependency of jrlhf. Usage: benchmarks/compare.sh  (BENCH_STEPS=5)
set -euo pipefail
cd "$(dirname "$0")/.."
make install
if [ ! -x benchmarks/.venv-trl/bin/python ]; then
  python3 -m venv benchmarks/.venv-trl
  benchmarks/.venv-trl/bin/pip install -q torch==2.13.0 trl==1.12.0
fi
.venv/bin/python benchmarks/compare.py
