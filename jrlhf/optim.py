"""Optimizers from config: schedules, AdamW, clipping, and freezing through optax masks.

Freezing is an optax concern: parameters are labelled "trainable" / "frozen" from regexes over
their paths and `optax.partition` sends the frozen group to `optax.set_to_zero()`, so frozen
leaves never change and carry no Adam moments (`chain(adam, freeze)` would still allocate them).
"""

from __future__ import annotations

import jax
import optax

from jrlhf import paths
from jrlhf.config import OptimConfig

TRAINABLE, FROZEN = "trainable", "frozen"


def make_schedule(cfg: OptimConfig, learning_rate: float, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then constant / cosine / linear decay that ends
    at optimizer step `total_steps`."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = learning_rate * cfg.end_lr_ratio
    if cfg.decay == "constant":
        after = optax.constant_schedule(learning_rate)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(learning_rate, end, decay_steps)
    if not cfg.warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def trainable_labels(params, freeze: tuple[str, ...] = (), train_only: tuple[str, ...] = ()):
    """Label tree: "frozen" where a `freeze` regex matches, or (if given) where no
    `train_only` regex matches; "trainable" elsewhere. A regex matching nothing is an error."""
    rules = [(rx, FROZEN) for rx in freeze]
    if train_only:
        rules += [(rx, TRAINABLE) for rx in train_only] + [(".*", FROZEN)]
    else:
        rules += [(".*", TRAINABLE)]
    paths.require_matches(params, freeze, what="freeze rule")
    labels = paths.match_rules(params, rules[:-1], what="freeze rule", default=rules[-1][1],
                               require_all_used=False)
    if not any(label == TRAINABLE for label in jax.tree.leaves(labels)):
        raise ValueError(f"every parameter is frozen (freeze={list(freeze)})")
    return labels


def decay_mask(params):
    """Weight decay on matrices only (kernels, embeddings, adapters, stacked experts); not on
    norms or biases (a mixture of experts' stacked biases `[E, F]` included)."""
    def decays(key_path, p):
        name = str(getattr(key_path[-1], "key", "")) if key_path else ""
        return p.ndim >= 2 and not name.endswith("_bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, labels, *, learning_rate: float,
                   total_steps: int = 1) -> optax.GradientTransformation:
    """AdamW + clipping on the "trainable" group, `set_to_zero` on the "frozen" group.

    `learning_rate` is the peak rate and `total_steps` the schedule's length in optimizer steps
    (both per stage; `total_steps` matters only with warmup or decay).
    """
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(make_schedule(cfg, learning_rate, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return optax.partition({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)


def stop_frozen_gradients(params, labels):
    """`stop_gradient` on frozen leaves, so XLA skips their weight-gradient matmuls."""
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                        params, labels)


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of a tree (e.g. an optimizer state)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
