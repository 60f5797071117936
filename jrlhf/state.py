"""TrainState: everything a step updates, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """params, optimizer state, step counter, base RNG key and (PPO) the KL coefficient.

    `tx` is static: it is part of the step's compiled program, not of its data. Per-step
    randomness is `jax.random.fold_in(rng, step)`, so a resumed run draws the same numbers.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    kl_coef: jax.Array | None = None
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, tx, rng, kl_coef: float | None = None, *,
               copy: bool = True) -> "TrainState":
        """A fresh state of `params` (step 0, `tx.init` moments). `kl_coef`: PPO's β (the state
        is where it lives; the adaptive controller updates it there).

        The state owns its arrays (`copy`): every jitted step donates its state, so without a
        copy the caller's `params` (e.g. a reference kept as `ref_params = policy`) would be
        deleted by the first update. `copy=False` for arrays nothing else holds."""
        rng = jax.random.key(rng) if isinstance(rng, int) else rng
        if copy:
            params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        return cls(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                   rng=rng, kl_coef=None if kl_coef is None else jnp.asarray(kl_coef, jnp.float32),
                   tx=tx)

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, step=self.step + 1)
