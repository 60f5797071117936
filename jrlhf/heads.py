"""Scalar heads on a causal LM's weights: grafted for a critic or a reward model, dropped for
export. Pure functions of `(ModelConfig, params)`; they work on arrays and on
`jax.ShapeDtypeStruct`s alike (plan builds states without weights)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jrlhf.models.config import ModelConfig


def with_scalar_head(cfg: ModelConfig, params, *, lm_head: bool | None = None):
    """`(cfg, params)` with a zero-initialised scalar head `score/kernel [D, 1]` (and the LM
    head kept, or dropped with `lm_head=False`)."""
    lm_head = cfg.lm_head if lm_head is None else lm_head
    params = {k: v for k, v in params.items() if lm_head or k != "lm_head"}
    params["score"] = {"kernel": jnp.zeros((cfg.hidden_size, 1), jnp.float32)}
    return dataclasses.replace(cfg, scalar_head=True, lm_head=lm_head), params


def without_scalar_head(cfg: ModelConfig, params):
    """`(cfg, params)` with the scalar head (if any) dropped."""
    return (dataclasses.replace(cfg, scalar_head=False),
            {k: v for k, v in params.items() if k != "score"})


def reward_model_init(policy_cfg: ModelConfig, params, num_layers: int = 0):
    """A reward model: the policy's first `num_layers` layers (0 = all), no LM head, and a zero
    scalar head."""
    n = num_layers or policy_cfg.num_layers
    if n > policy_cfg.num_layers:
        raise ValueError(f"reward.num_layers={n} exceeds the policy's {policy_cfg.num_layers}")
    rm = {k: v for k, v in params.items() if k not in ("score", "layers")}
    rm["layers"] = {i: params["layers"][i] for i in range(n)}
    return with_scalar_head(dataclasses.replace(policy_cfg, num_layers=n), rm, lm_head=False)
