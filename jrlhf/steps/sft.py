"""Supervised fine-tuning step: next-token cross-entropy on response tokens only."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax

from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import (PACKED, accumulate_gradients, apply_gradients, check_batch,
                                check_factory_args, forward_params, jit_step, router_loss)


def sft_loss(params, batch, *, model_cfg: ModelConfig, token_weights, router_scale=1.0):
    """Σ weight · NLL over predicted tokens (plus a mixture of experts' router terms, scaled by
    `router_scale`: `router_loss`), and its aux sums.

    batch: `input_ids [B, T]`, `attention_mask [B, T]`, `loss_mask [B, T]` (1 on response
    tokens: the tokens to be predicted; prompt and padding 0), and for packed rows
    `segment_ids`, `positions [B, T]` (see `jrlhf.data.pipeline`). `token_weights [B, T-1]`
    weights each predicted position (1 / total response tokens of the full batch).
    """
    out = tfm.token_outputs(model_cfg, params, batch["input_ids"], batch["attention_mask"],
                            positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                            with_router=model_cfg.is_moe)
    nll = -jnp.where(token_weights > 0, out.logprobs, 0.0)
    term, router = router_loss(model_cfg, out.router, "sft/moe", router_scale)
    return jnp.sum(nll * token_weights) + term, {"tokens": jnp.sum(token_weights > 0), **router}


def sft_step(state, batch, *, model_cfg: ModelConfig, labels=None, lora_scale: float = 0.0,
             grad_accum_steps: int = 1):
    """One optimizer step of SFT, accumulating over `grad_accum_steps` micro-batches.

    Token-weighted: every response token of the whole batch has the same weight, however the
    tokens fall into micro-batches. Metrics: `sft/loss` (mean NLL per response token, plus a
    mixture of experts' router terms), `sft/tokens`, `sft/grad_norm`; for a mixture of experts
    `sft/moe/aux_loss`, `sft/moe/z_loss` and the expert load (`router_loss`).
    """
    check_batch(batch, "sft_step", (("input_ids", "attention_mask", "loss_mask"), PACKED))
    mask = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    if "segment_ids" in batch:  # packed rows: never predict one example from the one before
        segments = batch["segment_ids"]
        mask = mask * (segments[:, 1:] == segments[:, :-1])
    weights = mask / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    batch = dict(batch, token_weights=weights)

    def loss_fn(params, micro):
        fp = forward_params(params, labels, lora_scale)
        micro = dict(micro)
        return sft_loss(fp, micro, model_cfg=model_cfg, token_weights=micro.pop("token_weights"),
                        router_scale=1.0 / grad_accum_steps)

    loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, grad_accum_steps)
    metrics = {"sft/loss": loss, "sft/tokens": aux.pop("tokens"),
               "sft/grad_norm": optax.tree.norm(grads), **aux}
    return apply_gradients(state, grads), metrics


def make_sft_step(model_cfg: ModelConfig, *, labels=None, lora_scale: float = 0.0,
                  grad_accum_steps: int = 1, state=None, mesh=None):
    """Jitted `sft_step` with its hyper-parameters bound (sharded when `mesh` is given)."""
    check_factory_args("make_sft_step", model_cfg)
    fn = functools.partial(sft_step, model_cfg=model_cfg, labels=labels, lora_scale=lora_scale,
                           grad_accum_steps=grad_accum_steps)
    return jit_step(fn, state, mesh)
