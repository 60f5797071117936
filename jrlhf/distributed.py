"""Multi-host start-up: `jax.distributed.initialize`, driven by config or environment."""

from __future__ import annotations

import os

import jax

from jrlhf.config import RunConfig


def maybe_initialize(run: RunConfig | None = None) -> bool:
    """Initialise jax.distributed when the config or environment asks for several processes.

    Environment (overrides the config): `JRLHF_COORDINATOR=host:port`, `JRLHF_NUM_PROCESSES`,
    `JRLHF_PROCESS_ID`; or `JRLHF_DISTRIBUTED=auto` to let jax find the cluster itself (TPU pod
    metadata, SLURM variables). On CPU the gloo collectives are selected. Returns True if it
    initialised.
    """
    run = run or RunConfig()
    if os.environ.get("JRLHF_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    coordinator = os.environ.get("JRLHF_COORDINATOR", run.coordinator_address)
    num = int(os.environ.get("JRLHF_NUM_PROCESSES", run.num_processes))
    pid = int(os.environ.get("JRLHF_PROCESS_ID", run.process_id))
    if num <= 1:
        return False
    if not coordinator:
        raise ValueError(f"num_processes={num} needs a coordinator address "
                         "(run.coordinator_address or JRLHF_COORDINATOR=host:port)")
    if not 0 <= pid < num:
        raise ValueError(f"process_id={pid} must be in [0, {num})")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)
    return True
