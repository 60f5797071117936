"""One SLURM task of tests/test_launch.py's `JRLHF_DISTRIBUTED=auto` test (not collected by pytest).

The test starts two of these with the variables `srun` sets for 2 tasks on one node, 2 CPU
devices each. `maybe_initialize` leaves the cluster detection to jax (its SlurmCluster), then a
sum over an array sharded across all 4 devices of both processes must come out right.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jrlhf.distributed import maybe_initialize

assert maybe_initialize() is True
pid = jax.process_index()
assert pid == int(os.environ["SLURM_PROCID"]), (pid, os.environ["SLURM_PROCID"])
assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()

# Global rows 0..3 of arange(8).reshape(4, 2); this process holds rows 2*pid and 2*pid + 1.
local = np.arange(8, dtype=np.float32).reshape(4, 2)[2 * pid:2 * pid + 2]
gathered = multihost_utils.process_allgather(local, tiled=True)
np.testing.assert_array_equal(gathered, np.arange(8, dtype=np.float32).reshape(4, 2))
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
sharding = NamedSharding(mesh, PartitionSpec("data"))
array = jax.make_array_from_process_local_data(sharding, local)
total = jax.jit(jnp.sum)(array)  # an all-reduce across the two processes
print(f"process {pid} of {jax.process_count()}: devices {jax.device_count()} "
      f"allgather sum {float(gathered.sum()):g} jit sum {float(total):g}", flush=True)
