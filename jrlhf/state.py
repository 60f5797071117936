"""TrainState: everything a step updates, as one pytree (with `RLState`, what an RL run
carries from one rollout iteration to the next)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jrlhf.rl import RunningMoments


@struct.dataclass
class RolloutPool:
    """Partial rollouts (`rollout.max_staleness > 0`): the groups an iteration sampled but did not
    train on, carried into the next — rows mid-response or ended, never-started rows too —
    with, per token, the policy version that drew it and its behaviour log-prob. C groups of K
    rows (C = the prompts per iteration); rows of group c are cK .. cK+K−1.

    prompt_ids, prompt_mask: `[C, P]` the groups' prompts (left-padded).
    budgets: `[C·K]` int32 each row's length budget.
    tokens, logprobs, versions: `[C·K, N]` generated tokens, their sampler log-probs and the
        rollout iteration (= policy version) that sampled each (0 past a row's length).
    lengths: `[C·K]` int32 tokens generated so far; finished: `[C·K]` bool ended (EOS/budget).
    occupied: `[C]` bool the entry holds a group; born: `[C]` int32 the iteration its prompt
        was taken in (older groups train first).
    experts: `[C·K, P + N, L_sparse, k]` int32 a mixture of experts' routing of each row's
        prompt and generated tokens, recorded when each was sampled (`rollout.routing_replay`
        not "off"; laid out as `Generation.experts`); None otherwise, and then not checkpointed.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    budgets: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    versions: jax.Array
    lengths: jax.Array
    finished: jax.Array
    occupied: jax.Array
    born: jax.Array
    experts: jax.Array | None = None

    @classmethod
    def empty(cls, groups: int, group_size: int, prompt_length: int, max_new_tokens: int,
              experts: tuple[int, int] | None = None) -> "RolloutPool":
        """An empty pool; `experts = (L_sparse, k)`: it carries recorded experts too."""
        rows = groups * group_size
        i32 = functools.partial(jnp.zeros, dtype=jnp.int32)
        return cls(prompt_ids=i32((groups, prompt_length)),
                   prompt_mask=i32((groups, prompt_length)), budgets=i32((rows,)),
                   tokens=i32((rows, max_new_tokens)),
                   logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
                   versions=i32((rows, max_new_tokens)), lengths=i32((rows,)),
                   finished=jnp.zeros((rows,), bool), occupied=jnp.zeros((groups,), bool),
                   born=i32((groups,)),
                   experts=None if experts is None else i32(
                       (rows, prompt_length + max_new_tokens, *experts)))


@struct.dataclass
class RLState:
    """What an RL run carries between rollout iterations, as arrays in the train state (so it
    is sharded, donated and checkpointed like the params, not kept as host side state).

    kl_coef: `()` float32 β of PPO's `r − β·KL` (the adaptive controller updates it here);
        None for algorithms whose KL weight is a fixed loss coefficient of their config (GRPO).
    moments: the reward normaliser's running count / mean / variance of raw scores.
    iteration: `()` int32 rollout iterations done (the sampler's key folds it in).
    pool: the groups partial rollouts carry between iterations (None: synchronous rollouts).
    """

    kl_coef: jax.Array | None
    moments: RunningMoments
    iteration: jax.Array
    pool: RolloutPool | None = None

    @classmethod
    def create(cls, kl_coef: float | None = None, pool: RolloutPool | None = None) -> "RLState":
        return cls(kl_coef=None if kl_coef is None else jnp.asarray(kl_coef, jnp.float32),
                   moments=RunningMoments.create(), iteration=jnp.zeros((), jnp.int32),
                   pool=pool)


@struct.dataclass
class TrainState:
    """params, optimizer state, step counter, base RNG key and (RL) the `RLState`.

    `tx` is static: it is part of the step's compiled program, not of its data. Per-step
    randomness is `jax.random.fold_in(rng, step)`, so a resumed run draws the same numbers.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    rl: RLState | None = None
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, tx, rng, kl_coef: float | None = None, *, rl: RLState | None = None,
               copy: bool = True) -> "TrainState":
        """A fresh state of `params` (step 0, `tx.init` moments). `kl_coef`: PPO's β, which
        the state holds in a fresh `RLState` (`rl`: one given whole, e.g. `RLState.create()` for
        GRPO's iteration counter).

        The state owns its arrays (`copy`): every jitted step donates its state, so without a
        copy the caller's `params` (e.g. a reference kept as `ref_params = policy`) would be
        deleted by the first update. `copy=False` for arrays nothing else holds."""
        rng = jax.random.key(rng) if isinstance(rng, int) else rng
        if kl_coef is not None:
            if rl is not None:
                raise ValueError("TrainState.create: give kl_coef or rl, not both")
            rl = RLState.create(kl_coef)
        if copy:
            params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                   rng=rng, rl=rl, tx=tx)

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, step=self.step + 1)
