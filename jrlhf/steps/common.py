"""Pieces every step shares: micro-batching, LoRA-aware params, and jit with shardings."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from jrlhf import lora, sharding
from jrlhf.models import moe
from jrlhf.optim import stop_frozen_gradients


def forward_params(params, labels=None, lora_scale: float = 0.0):
    """The params a forward pass uses: frozen leaves gradient-stopped, LoRA merged."""
    if labels is not None:
        params = stop_frozen_gradients(params, labels)
    if lora_scale:
        params = lora.merge_lora(params, lora_scale)
    return params


def router_loss(model_cfg, stats, prefix: str = "moe", scale: float = 1.0):
    """A mixture of experts' router terms for one forward: `router_aux_loss_coef` × the
    load-balancing loss + `router_z_loss_coef` × the z-loss (each forward's own, as transformers
    computes them), and the loss values and expert load as metrics under `prefix/`, both times
    `scale` (1 / micro-batches where the aux values are summed over micro-batches). `stats`:
    the forward's `moe.RouterStats` (None for a dense model: no term, no metrics).
    Returns `(term, metrics)`."""
    if stats is None:
        return 0.0, {}
    balance, z = moe.load_balancing_loss(stats), moe.z_loss(stats)
    term = model_cfg.router_aux_loss_coef * balance + model_cfg.router_z_loss_coef * z
    metrics = {"aux_loss": balance, "z_loss": z,
               **{k.split("/")[1]: v for k, v in moe.load_metrics(stats).items()}}
    return term * scale, {f"{prefix}/{k}": v * scale for k, v in metrics.items()}


PACKED = ("segment_ids", "positions")  # packed rows: which example each token is, its position


def check_batch(batch, step: str, *layouts: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """Refuse a batch that is none of the step's `layouts` (`(required keys, optional keys)`):
    a key missing, or one the step would never read — a typo, or e.g. `advantages`, which the
    fused RL steps compute themselves — is a ValueError naming it, not silently ignored."""
    keys = set(batch)
    for required, optional in layouts:
        if set(required) <= keys <= set(required) | set(optional):
            return
    required, optional = layouts[0]
    missing = sorted(set(required) - keys)
    unknown = sorted(keys - {k for r, o in layouts for k in (*r, *o)})
    what = "; ".join(part for part in (
        f"missing {', '.join(missing)}" if missing else "",
        f"unknown {', '.join(unknown)} (never read)" if unknown else "") if part)
    layouts_text = " | ".join(", ".join((*r, *(f"[{k}]" for k in o))) for r, o in layouts)
    raise ValueError(f"{step}: the batch has keys {sorted(keys)}: {what or 'another layout'}; "
                     f"it takes {layouts_text} ([optional])")


def check_factory_args(factory: str, model_cfg, cfg=None, cfg_type=None) -> None:
    """Every `make_*_step` takes `(model_cfg, cfg, *, ...)`: the model's config, then the
    algorithm's. A call in another order is a TypeError naming the factory."""
    from jrlhf.models.config import ModelConfig

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"{factory}(model_cfg, cfg, ...): the model's ModelConfig comes first, "
                        f"got {type(model_cfg).__name__}")
    if cfg_type is not None and not isinstance(cfg, cfg_type):
        raise TypeError(f"{factory}(model_cfg, cfg, ...): cfg must be a {cfg_type.__name__}, "
                        f"got {type(cfg).__name__}")


def split_micro_batches(batch, n: int):
    """Reshape every leaf's leading dim B into `[n, B // n]`."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


def float_leaves(params):
    """`(floats, with_floats, full_gradient)`: the floating-point leaves of `params` (a list),
    `with_floats(floats)` the params rebuilt around them, and `full_gradient(grads of floats)`
    a gradient tree of the params' structure, zeros of their own dtype at the other leaves.

    Integer leaves (a quantized frozen base, `jrlhf.quant`) cannot be differentiated; the
    steps differentiate the float leaves alone and the optimizer's frozen group zeroes the
    rest."""
    leaves, treedef = jax.tree.flatten(params)
    where = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]

    def with_floats(floats):
        full = list(leaves)
        for i, x in zip(where, floats):
            full[i] = x
        return treedef.unflatten(full)

    def full_gradient(grads):
        given = dict(zip(where, grads))
        return treedef.unflatten([given[i] if i in given else jnp.zeros_like(x)
                                  for i, x in enumerate(leaves)])

    return [leaves[i] for i in where], with_floats, full_gradient


def value_and_grad(fn, has_aux: bool = False):
    """`jax.value_and_grad(fn, has_aux)` with respect to the float leaves of its first argument
    (`float_leaves`): integer leaves get zero gradients."""
    def wrapped(params, *args):
        floats, with_floats, full_gradient = float_leaves(params)
        out, grads = jax.value_and_grad(lambda xs: fn(with_floats(xs), *args),
                                        has_aux=has_aux)(floats)
        return out, full_gradient(grads)

    return wrapped


def accumulate_gradients(loss_fn, params, batch, num_micro_batches: int):
    """Sum `grad(loss_fn)` and its aux sums over micro-batches with one `lax.scan`.

    `loss_fn(params, micro_batch) -> (loss, aux)` must return *already normalised* contributions
    (e.g. token-weighted by the whole batch's token count), so that the sum over micro-batches
    equals the loss of the full batch; `aux` holds sums as well. Only the float leaves of
    `params` are differentiated (`float_leaves`; integer ones get zero gradients).
    """
    params, with_floats, full_gradient = float_leaves(params)
    grad_fn = jax.value_and_grad(lambda xs, micro: loss_fn(with_floats(xs), micro), has_aux=True)
    if num_micro_batches == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, full_gradient(grads)

    def body(carry, micro):
        (loss, aux), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    micro = split_micro_batches(batch, num_micro_batches)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
    (loss, aux), grads = zeros
    (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), micro)
    return loss, aux, full_gradient(grads)


def apply_gradients(state, grads):
    """One optimizer update of a state that follows the step protocol: a pytree dataclass with
    `params`, `opt_state`, `step` and a static optax `tx` (plus `rng` for the RL steps and an
    `rl` `RLState` holding β for PPO), and `replace` (`flax.struct.dataclass`). `TrainState` is one; a
    research state of its own works with every step, `minibatch_epochs` and `jit_step`."""
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1)


def minibatch_epochs(state, data, grad_fn, *, epochs: int, num_minibatches: int, key,
                     grad_norm_key: str | None = None, group_size: int = 1):
    """`epochs` passes over `data`, each in `num_minibatches` shuffled optimizer steps.
    `group_size` K > 1: whole groups of K consecutive rows are shuffled, so every minibatch
    holds whole groups in their order (a grouped forward's layout, `token_outputs`).

    One nested `lax.scan` (epochs outside, minibatches inside; a fresh permutation per epoch
    from `key`), so a whole update phase is one compiled loop with no host round trip.
    `grad_fn(params, minibatch) -> ((loss, metrics), grads)`. Returns `(state, metrics)` with
    each metric averaged over all optimizer steps, plus the gradients' global norm (before
    clipping) as `grad_norm_key` when given.
    """
    B = jax.tree.leaves(data)[0].shape[0]
    mb_size = B // num_minibatches

    def minibatch_update(train_state, mb):
        (_, metrics), grads = grad_fn(train_state.params, mb)
        if grad_norm_key:
            metrics = dict(metrics, **{grad_norm_key: optax.tree.norm(grads)})
        return apply_gradients(train_state, grads), metrics

    def epoch(train_state, epoch_key):
        if group_size > 1:
            groups = jax.random.permutation(epoch_key, B // group_size)
            perm = (groups[:, None] * group_size + jnp.arange(group_size)).reshape(-1)
        else:
            perm = jax.random.permutation(epoch_key, B)
        shuffled = jax.tree.map(
            lambda x: x[perm].reshape(num_minibatches, mb_size, *x.shape[1:]), data)
        return jax.lax.scan(minibatch_update, train_state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, epochs))
    return state, jax.tree.map(jnp.mean, metrics)


def state_shardings(state, mesh):
    """Shardings for a state (`apply_gradients`' protocol): params by the rule table, moments
    like their params, every other array field (step, rng, β, ...) replicated."""
    params_sh = sharding.param_shardings(state.params, mesh)
    replicated = sharding.replicated(mesh)
    others = {f.name: jax.tree.map(lambda _: replicated, getattr(state, f.name))
              for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)
              and f.name not in ("params", "opt_state")}
    return state.replace(
        params=params_sh,
        opt_state=sharding.opt_state_shardings(state.tx, state.opt_state, params_sh, mesh),
        **others)


def all_finite(tree) -> jax.Array:
    """`()` bool: every floating-point leaf of `tree` is finite (one fused reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


STATE_FINITE = "state/finite"  # metric: 1.0 when the updated params and optimizer state are


def with_state_check(step_fn):
    """`step_fn` with metric `state/finite`: whether the params and optimizer state it returns
    are all finite, computed inside the compiled step (no host copy of the weights)."""
    @functools.wraps(step_fn)
    def checked(state, batch):
        state, metrics = step_fn(state, batch)
        finite = all_finite((state.params, state.opt_state))
        return state, dict(metrics, **{STATE_FINITE: finite.astype(jnp.float32)})

    return checked


def jit_step(step_fn, state=None, mesh=None):
    """`jax.jit` a `(state, batch) -> (state, metrics)` step with the state donated.

    The jitted step also reports `state/finite` (see `with_state_check`), so the loop never
    keeps or saves a non-finite state. With a mesh, in/out shardings are explicit: the state by
    `state_shardings`, the batch split over (data, fsdp, expert), metrics replicated. Use
    `place_state` to put a state on the mesh first. A mesh with an `expert` axis is the abstract
    mesh the step is traced under (mixtures of experts run expert-parallel:
    `jrlhf.models.expert_parallel`).
    """
    step_fn = with_state_check(step_fn)
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    step_fn = under_expert_mesh(step_fn, mesh)
    state_sh = state_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)

    @functools.wraps(step_fn)
    def checked(state, batch):
        sharding.check_batch_divisible(batch, mesh)
        # Arrays another computation left with another layout are resharded, not refused.
        return jitted(state, sharding.put(batch, batch_sh))

    checked.jitted = jitted
    return checked


def under_expert_mesh(fn, mesh):
    """`fn` traced under `mesh`'s abstract mesh when it has an `expert` axis > 1 (what
    `jrlhf.models.expert_parallel` reads); `fn` itself otherwise."""
    if mesh is None or mesh.shape.get("expert", 1) == 1:
        return fn

    @functools.wraps(fn)
    def traced_under_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_under_mesh


def place_state(state, mesh):
    """A copy of a state's arrays on the mesh with `state_shardings` (multi-process safe).
    Always new buffers: the jitted step donates the placed state, and the caller's arrays (the
    state passed in, weights shared with a reference) stay valid."""
    return sharding.put(state, state_shardings(state, mesh), copy=True)
