"""Reward-model step: Bradley-Terry over every ranked pair of K-way groups."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax

from jrlhf import losses, rl
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import (PACKED, accumulate_gradients, apply_gradients, check_batch,
                                check_factory_args, forward_params, jit_step, router_loss)


def pairs_to_groups(chosen_ids, chosen_mask, rejected_ids, rejected_mask):
    """A (chosen, rejected) pair batch as K=2 ranking groups for `reward_step`."""
    ids = np.stack([chosen_ids, rejected_ids], axis=1)
    mask = np.stack([chosen_mask, rejected_mask], axis=1)
    ranks = np.tile(np.array([[1, 2]], np.int32), (ids.shape[0], 1))
    return {"input_ids": ids, "attention_mask": mask, "ranks": ranks}


def group_rewards(params, batch, model_cfg: ModelConfig, with_router: bool = False):
    """Scores `[G, K]` of `input_ids [G, K, T]` (reward read at each row's last real token), or
    of packed groups: `input_ids, segment_ids, positions [G, L]` holding response k of group g
    as segment k + 1 of row g (reward read at each segment's last token; `ranks [G, K]`).
    `with_router`: `(scores, router stats)` (`transformer.token_outputs`)."""
    if "segment_ids" in batch:
        K = batch["ranks"].shape[1]
        last = rl.segment_last_index(batch["segment_ids"], K)
        scores, router = tfm.token_scores(
            model_cfg, params, batch["input_ids"], batch["attention_mask"],
            positions=batch["positions"], segment_ids=batch["segment_ids"], read=last,
            with_router=True)
    else:
        G, K, T = batch["input_ids"].shape
        scores, router = tfm.reward_scores(model_cfg, params,
                                           batch["input_ids"].reshape(G * K, T),
                                           batch["attention_mask"].reshape(G * K, T),
                                           with_router=True)
        scores = scores.reshape(G, K)
    return (scores, router) if with_router else scores


def reward_step(state, batch, *, model_cfg: ModelConfig, labels=None, lora_scale: float = 0.0,
                per_prompt: bool = True, grad_accum_steps: int = 1):
    """One optimizer step of reward-model training.

    batch: `input_ids [G, K, T]`, `attention_mask [G, K, T]`, `ranks [G, K]` (1 = best, ties
    equal, negative = absent response). Pairs come from `losses.ranking_to_pairs`; by default
    each group counts once. Metrics: `reward/loss`, `reward/accuracy`, `reward/margin`,
    `reward/num_pairs`, `reward/grad_norm`, and a mixture of experts' router terms and load
    (`router_loss`, added to the loss).
    """
    check_batch(batch, "reward_step", (("input_ids", "attention_mask", "ranks"), PACKED))
    weights = losses.ranking_pair_weights(batch["ranks"], per_prompt)
    batch = dict(batch, pair_weights=weights)

    def loss_fn(params, micro):
        rewards, stats = group_rewards(forward_params(params, labels, lora_scale), micro,
                                       model_cfg, with_router=True)
        loss, aux = losses.ranking_loss(rewards, micro["ranks"], weights=micro["pair_weights"])
        term, router = router_loss(model_cfg, stats, "reward/moe", 1.0 / grad_accum_steps)
        return loss + term, dict(aux, **router)

    loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, grad_accum_steps)
    pairs = jnp.maximum(aux["num_pairs"], 1.0)
    router = {k: v for k, v in aux.items() if k.startswith("reward/")}
    metrics = {"reward/loss": loss, "reward/accuracy": aux["correct"] / pairs,
               "reward/margin": aux["margin_sum"] / pairs, "reward/num_pairs": aux["num_pairs"],
               "reward/grad_norm": optax.tree.norm(grads), **router}
    return apply_gradients(state, grads), metrics


def make_reward_step(model_cfg: ModelConfig, *, labels=None, lora_scale: float = 0.0,
                     per_prompt: bool = True, grad_accum_steps: int = 1, state=None, mesh=None):
    """Jitted `reward_step` with its hyper-parameters bound (sharded when `mesh` is given)."""
    check_factory_args("make_reward_step", model_cfg)
    fn = functools.partial(reward_step, model_cfg=model_cfg, labels=labels, lora_scale=lora_scale,
                           per_prompt=per_prompt, grad_accum_steps=grad_accum_steps)
    return jit_step(fn, state, mesh)
