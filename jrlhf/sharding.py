"""Device meshes and partition rules (regex over parameter paths -> PartitionSpec).

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `expert` (a mixture of experts' experts split over it, and the batch: data parallel for
every other parameter), `tensor` (attention heads / MLP hidden split). Batches are split over
(data, fsdp, expert).
Meshes use `AxisType.Auto` deliberately: GSPMD propagates shardings through the model, and
plain indexing of results keeps working.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jrlhf import paths
from jrlhf.config import MeshConfig

AXES = ("data", "fsdp", "expert", "tensor")  # `MeshConfig.shape` order; tensor innermost
BATCH_AXES = ("data", "fsdp", "expert")

# A quantized matrix (`jrlhf.quant.QuantizedArray`) is two arrays of its rank under its path,
# `.../kernel/values` and `.../kernel/scale`: both follow the matrix's rule (a dimension the
# mesh axis does not divide, such as a scale's 1, stays whole).
_Q = r"(/values|/scale)?"

# First match wins. Kernels are [in, out]; embeddings [vocab, hidden].
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (rf"(.*/)?embed/embedding{_Q}", P("tensor", "fsdp")),
    (rf"(.*/)?pos_embed/embedding{_Q}", P(None, "fsdp")),
    (rf".*attn/(q_proj|k_proj|v_proj)/kernel{_Q}", P("fsdp", "tensor")),
    (r".*attn/(q_proj|k_proj|v_proj)/bias", P("tensor")),
    (rf".*attn/o_proj/kernel{_Q}", P("tensor", "fsdp")),
    (rf".*mlp/(gate_proj|up_proj|fc_in)/kernel{_Q}", P("fsdp", "tensor")),
    (r".*mlp/fc_in/bias", P("tensor")),
    (rf".*mlp/(down_proj|fc_out)/kernel{_Q}", P("tensor", "fsdp")),
    # Mixtures of experts: stacked experts [E, D, F] / [E, F, D] split over `expert` on E and
    # like the dense MLP's matrices on D, F; the router [D, E] over fsdp; a shared expert as a
    # dense MLP.
    (r".*mlp/experts/(gate_proj|up_proj)", P("expert", "fsdp", "tensor")),
    (r".*mlp/experts/down_proj", P("expert", "tensor", "fsdp")),
    (r".*mlp/experts/(gate_bias|up_bias)", P("expert", "tensor")),
    (r".*mlp/experts/down_bias", P("expert", None)),
    (r".*mlp/router/kernel", P("fsdp", None)),
    (rf".*mlp/shared/(gate_proj|up_proj)/kernel{_Q}", P("fsdp", "tensor")),
    (rf".*mlp/shared/down_proj/kernel{_Q}", P("tensor", "fsdp")),
    (rf"(.*/)?lm_head/kernel{_Q}", P("fsdp", "tensor")),
    (r"(.*/)?score/kernel", P("fsdp", None)),
    (r".*/experts/\w+_lora_a", P("expert", "fsdp", None)),
    (r".*/experts/\w+_lora_b", P("expert", None, "tensor")),
    (r".*/lora_a", P("fsdp", None)),
    (r".*/lora_b", P(None, "tensor")),
    (r".*", P()),
)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, expert, tensor) mesh over the first `cfg.size` of `devices` (default: all).

    The mesh size must divide the device count; a mesh smaller than it leaves devices idle
    (with a warning).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(zip(AXES, cfg.shape))
    named = " x ".join(f"{axis}={n}" for axis, n in sizes.items())
    if any(n < 1 for n in cfg.shape):
        raise ValueError(f"mesh axis sizes must be >= 1, got {named}")
    size = cfg.size
    if len(devices) % size:
        raise ValueError(f"mesh {named} = {size} devices does not divide the {len(devices)} "
                         "devices available")
    if size < len(devices):
        warnings.warn(f"mesh uses {size} of {len(devices)} devices", stacklevel=2)
    return jax.make_mesh(cfg.shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices[:size])


def _fit(spec: P, shape, mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. a vocabulary of 50257)."""
    dims = []
    for i, axis in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if i >= len(shape):
            break
        size = 1 if axis is None else mesh.shape[axis]
        dims.append(axis if shape[i] % size == 0 else None)
    return P(*dims)


def param_shardings(params, mesh, rules=PARAM_RULES):
    """NamedSharding per parameter leaf from the ordered regex rule table."""
    specs = paths.match_rules(params, rules, what="sharding rule", require_all_used=False)
    return jax.tree.map(lambda x, spec: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                        params, specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_devices(mesh) -> int:
    """How many ways the batch's leading axis is split (data x fsdp x expert)."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def check_batch_divisible(batch, mesh, name: str = "batch") -> None:
    ways = batch_devices(mesh)
    for key, x in paths.flatten(batch).items():
        if np.ndim(x) and np.shape(x)[0] % ways:
            raise ValueError(f"{name}[{key!r}] has leading size {np.shape(x)[0]}, not divisible by "
                             f"data x fsdp = {ways}")


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, params_sharding, mesh):
    """Optimizer-state shardings mirroring the params' (moments sharded like their params)."""
    masked = optax.transforms.MaskedNode  # a frozen leaf's empty slot (no moments)
    return optax.tree_map_params(
        tx, lambda leaf, sharding: leaf if isinstance(leaf, masked) else sharding,
        opt_state, params_sharding,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, (NamedSharding, masked)),
    )


def put(tree, shardings, *, copy: bool = False):
    """Place a tree's leaves with the given shardings (a prefix tree, or one sharding).

    Works in multi-process runs too, where a sharding spans devices of other processes: each
    process then builds its own shards from its (identical) host copy. Arrays that already have
    the target sharding are returned as they are, unless `copy` (then every array is new: one
    that a donating step receives cannot delete the caller's).
    """
    def one(x, sh):
        if isinstance(x, jax.Array) and x.sharding == sh and not copy:
            return x
        if sh.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            # A global array is resharded on the devices. (device_put's may_alias=False still
            # shares the buffer of a replicated leaf's first device: copy first.)
            if copy and isinstance(x, jax.Array):
                x = jnp.array(x, copy=True)
            return jax.device_put(x, sh)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sh)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sh, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def rows_layout(mesh, rows: int) -> NamedSharding:
    """The layout of a `[rows, ...]` batch: split over (data, fsdp) when they divide `rows`, else
    replicated (e.g. GRPO's prompts, fewer than the devices; their samples are split)."""
    return batch_sharding(mesh) if rows % batch_devices(mesh) == 0 else replicated(mesh)


def host_rows(sh: NamedSharding, rows: int) -> tuple[int, int]:
    """This process's rows `[lo, hi)` of a `[rows, ...]` batch laid out with `sh`: the union of
    its devices' slices, one contiguous block (all rows when the batch is replicated)."""
    spans = {idx[0].indices(rows)[:2] if idx else (0, rows)
             for idx in sh.addressable_devices_indices_map((rows,)).values()}
    covered = sorted(spans)
    if any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
        raise ValueError(f"this process's devices hold rows {covered} of each batch, not one "
                         "contiguous block: order the mesh's devices by process")
    return covered[0][0], covered[-1][1]


class HostShare:
    """An iterator of this process's rows of each batch (`host_rows`), yielding global arrays
    laid out with `sh` (`jax.make_array_from_process_local_data`); `get_state` / `set_state`
    are the wrapped iterator's."""

    def __init__(self, iterator, sh: NamedSharding, rows: int):
        self.iterator, self.sh, self.rows = iterator, sh, rows

    def __iter__(self):
        return self

    def __next__(self):
        local = next(self.iterator)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.sh, np.asarray(x), (self.rows, *np.shape(x)[1:])), local)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def to_host(x) -> np.ndarray:
    """All of `x` as NumPy on this process: all-gathered from the other processes' devices when
    it spans them (every process must call it: a collective)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x) -> tuple[np.ndarray, tuple[int, int]]:
    """`(rows, (lo, hi))`: the rows `lo..hi-1` of `x [B, ...]` this process's devices hold, as
    NumPy (no communication)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x), (0, np.shape(x)[0])
    lo, hi = host_rows(x.sharding, x.shape[0])
    parts = {}
    for shard in x.addressable_shards:
        start = shard.index[0].indices(x.shape[0])[0] if shard.index else 0
        parts.setdefault(start, np.asarray(shard.data))
    return np.concatenate([parts[k] for k in sorted(parts)]), (lo, hi)


def from_local_rows(local: np.ndarray, rows: int, mesh) -> jax.Array:
    """The global `[rows, ...]` array whose rows this process holds as `local` (its
    `host_rows` under `rows_layout(mesh, rows)`)."""
    return jax.make_array_from_process_local_data(rows_layout(mesh, rows), np.asarray(local),
                                                  (rows, *np.shape(local)[1:]))


def mesh_of(tree):
    """The mesh a tree's arrays are laid out on (the first `NamedSharding` leaf's), or None when
    they sit on single devices."""
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None
