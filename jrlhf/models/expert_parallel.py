"""Expert parallelism: a mixture of experts' grouped matmuls with the experts split over the
`expert` mesh axis, in one `shard_map`.

Each device of an expert group (the devices along `expert` that share data / fsdp coordinates)
holds E / n experts and its own tokens. Dispatch is an all-gather of the group's tokens (and
their routing) over `expert`; each device runs its own experts' (token, expert) pairs through
the grouped matmul; combine is a reduce-scatter (`psum_scatter`) of the outputs back to the
tokens' devices. Why all-gather and not all-to-all: shapes stay static and nothing is dropped
(an all-to-all needs a per-device capacity, padded, or drops tokens past it), and per token it
moves (n − 1) / n · D values each way where an all-to-all moves k · (n − 1) / n — no more for
n ≤ k (Qwen3-MoE routes k = 8; expert groups of up to 8 devices). `benchmarks/moe_collectives.py`
measures the compiled program's bytes beside GSPMD's own partitioning of the same matmuls,
which replicates every (token, expert) pair and all-reduces the intermediate activations.

Outside a mesh with an `expert` axis > 1 (one device, the samplers' programs, meshes without
it) the layer runs `moe.grouped_mlp` as is. The mesh is the abstract mesh the step is traced
under (`jrlhf.steps.common.jit_step` sets it when the mesh has an expert axis).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jrlhf.models import moe

EXPERT_AXIS = "expert"


def expert_mesh():
    """The abstract mesh being traced under when it has an `expert` axis of size > 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
        return None
    return mesh


def grouped_mlp(x, routing: moe.Routing, gate, up, down, activation, dtype, *, biases=None,
                glu=None):
    """`moe.grouped_mlp`, expert-parallel when traced under a mesh with an expert axis (see the
    module docstring); same arguments and result `[N, D]`, `x [N, D]` split over the mesh's
    batch axes as a step's batch is."""
    mesh = expert_mesh()
    if mesh is None:
        return moe.grouped_mlp(x, routing, gate, up, down, activation, dtype, biases=biases,
                               glu=glu)
    from jrlhf import sharding  # models import no trainer module at import time

    E = gate.shape[0]
    if E % mesh.shape[EXPERT_AXIS]:
        raise ValueError(f"mesh.expert={mesh.shape[EXPERT_AXIS]} does not divide the model's "
                         f"{E} experts; choose a divisor of {E}")
    rows = P(tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names))

    def local(x, experts, weights, gate, up, down, biases):
        # Every token of the expert group with its routing; this device holds experts
        # first .. first + E / n − 1 and computes their pairs; the sum over the group's devices
        # lands on each token's own device.
        gathered = [jax.lax.all_gather(a, EXPERT_AXIS, tiled=True)
                    for a in (x.astype(dtype), experts, weights)]
        first = jax.lax.axis_index(EXPERT_AXIS) * gate.shape[0]
        out = moe.grouped_mlp(gathered[0], moe.Routing(*gathered[1:]), gate, up, down,
                              activation, dtype, biases=biases, glu=glu, first_expert=first,
                              num_experts=E)
        return jax.lax.psum_scatter(out, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    # Rows padded to a multiple of the batch ways (a reward model's last-token reads need not
    # divide them): padded rows have weight 0 and are sliced off.
    N = x.shape[0]
    ways = math.prod(mesh.shape[a] for a in rows[0])
    pad = -N % ways
    experts, weights = routing.experts, routing.weights
    if pad:
        x, experts, weights = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, experts, weights))
    spec = P(EXPERT_AXIS)
    bias_specs = None if biases is None else (spec,) * len(biases)
    out = jax.shard_map(local, mesh=mesh,
                        in_specs=(rows, rows, rows, spec, spec, spec, bias_specs),
                        out_specs=rows)(x, experts, weights, gate, up, down, biases)
    return out[:N] if pad else out
