"""One process of the multi-host test (run by tests/test_multihost.py, not collected by pytest).

Usage: multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
With NUM_PROCESSES=1 it is the single-process reference on 4 local devices.
"""

import os
import sys

pid, num, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num}"
os.environ["JAX_PLATFORMS"] = "cpu"
if num > 1:
    os.environ.update(JRLHF_COORDINATOR=f"127.0.0.1:{port}", JRLHF_NUM_PROCESSES=str(num),
                      JRLHF_PROCESS_ID=str(pid))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jrlhf import optim, sharding  # noqa: E402
from jrlhf.config import MeshConfig, OptimConfig  # noqa: E402
from jrlhf.distributed import maybe_initialize  # noqa: E402
from jrlhf.models import ModelConfig, init_params  # noqa: E402
from jrlhf.state import TrainState  # noqa: E402
from jrlhf.steps import make_sft_step, place_state  # noqa: E402

assert maybe_initialize() == (num > 1)
assert jax.device_count() == 4 and jax.process_count() == num
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, intermediate_size=64)
mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
params = init_params(CFG, 0)
labels = optim.trainable_labels(params)
tx = optim.make_optimizer(OptimConfig(eps=1e-6), labels, learning_rate=3e-4)
state = place_state(TrainState.create(params, tx, 0), mesh)
step = make_sft_step(CFG, labels=labels, state=state, mesh=mesh)
batch_sh = sharding.batch_sharding(mesh)
losses = []
for i in range(3):
    rng = np.random.RandomState(i)
    ids = rng.randint(1, 64, (8, 12)).astype(np.int32)
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "loss_mask": (np.arange(12) >= 4).astype(np.int32)[None].repeat(8, 0)}
    rows = slice(pid * 8 // num, (pid + 1) * 8 // num)  # this host's share of the global batch
    batch = {k: jax.make_array_from_process_local_data(batch_sh, v[rows]) for k, v in full.items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics["sft/loss"]))
gathered = multihost_utils.process_allgather(state.params, tiled=True)
if pid == 0:
    from jrlhf import paths

    np.savez(out, losses=np.array(losses), **{k: np.asarray(v) for k, v in
                                              paths.flatten(gathered).items()})
print(f"process {pid}: losses {losses}")
