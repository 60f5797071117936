#!/usr/bin/env bash
# Side-by-side benchmark of jrlhf and google-tunix 0.1.7 (JAX's own post-training library) on the
# same GRPO and PPO iterations (benchmarks/compare_tunix.py lists the workload and every setting
# that still differs). Sets up tunix's own virtualenv (benchmarks/.venv-tunix, Python 3.11) with
# jax, jaxlib, flax and optax pinned to constraints.txt; tunix never becomes a jrlhf dependency.
# Usage: benchmarks/compare_tunix.sh  (BENCH_STEPS=5; extra arguments go to compare_tunix.py)
set -euo pipefail
cd "$(dirname "$0")/.."
make install
if [ ! -x benchmarks/.venv-tunix/bin/python ]; then
  python3.11 -m venv benchmarks/.venv-tunix
  # shellcheck disable=SC2046  # one argument per pin
  benchmarks/.venv-tunix/bin/pip install -q google-tunix==0.1.7 \
    $(grep -E '^(jax|jaxlib|flax|optax)==' constraints.txt)
fi
.venv/bin/python benchmarks/compare_tunix.py "$@"
