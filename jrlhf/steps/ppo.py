"""PPO update: KL penalty, GAE, whitening and every epoch x minibatch in one compiled function.

Its batch is the rollout batch of `jrlhf.steps.rollout` (`score_rollout` gives it) with the
critic's `values [B, N]` at the rollout. The logits / value predicting response token t sit at
column P - 1 + t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jrlhf import losses, rl
from jrlhf.config import PPOConfig
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import (check_batch, check_factory_args, jit_step, minibatch_epochs,
                                router_loss, value_and_grad)
from jrlhf.steps.rollout import (RL_BATCH, RL_OPTIONAL, policy_outputs, recorded_experts,
                                 sampler_mismatch)


def rollout_scores(moments: rl.RunningMoments, scores, cfg: PPOConfig):
    """`(moments, scores [B])`: with `cfg.normalize_rewards` the running moments take in the raw
    scores and the scores are normalised by them; then clipped to ±`cfg.reward_clip` (> 0)."""
    if cfg.normalize_rewards:
        moments = rl.update_moments(moments, scores)
        return moments, rl.normalize_scores(scores, moments, cfg.reward_clip)
    if cfg.reward_clip:
        scores = jnp.clip(scores, -cfg.reward_clip, cfg.reward_clip)
    return moments, scores


def rollout_advantages(batch, kl_coef, cfg: PPOConfig, advantage_fn=None):
    """Per-token KL, shaped rewards, advantages (whitened if configured) and returns, all
    `[B, N]`: `advantage_fn(rewards, values, mask) -> (advantages, returns)`, GAE with
    `cfg.gamma` / `cfg.lam` by default."""
    mask = batch["response_mask"]
    kl = rl.kl_penalty(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask
    rewards = rl.token_rewards(batch["scores"], kl, mask, kl_coef)
    if advantage_fn is None:
        advantages, returns = rl.gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    else:
        advantages, returns = advantage_fn(rewards, batch["values"], mask)
        if advantages.shape != mask.shape or returns.shape != mask.shape:
            raise ValueError(f"advantage_fn returned advantages {advantages.shape} and returns "
                             f"{returns.shape}; PPO's are per token, {mask.shape}")
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    return kl, rewards, advantages, returns


def ppo_loss(params, mb, *, cfg: PPOConfig, forward, model_cfgs=(None, None), extra_loss=None):
    """Clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy (+ mixtures
    of experts' router terms, `router_loss`, of `model_cfgs = (policy, value model)`), plus
    `extra_loss(params, mb, logprobs) -> (term, metrics)` when given."""
    mask = mb["response_mask"]
    routed = any(c is not None and c.is_moe for c in model_cfgs)
    experts, replay = recorded_experts(mb)
    options = {"with_router": True} if routed else {}
    if experts is not None:
        options.update(experts=experts, replay=replay)
    outputs = forward(params, mb["input_ids"], mb["attention_mask"], mask.shape[1],
                      temperature=mb["temperature"], with_entropy=True, **options)
    logprobs, entropy, values = outputs[:3]
    routers = outputs[3] if routed else (None, None)
    pg_loss, pg_metrics = losses.ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask,
                                                 cfg.clip_eps, cfg.loss_aggregation,
                                                 token_weights=mb.get("tis_weights"))
    vf_loss, vf_metrics = losses.ppo_value_loss(values, mb["values"], mb["returns"], mask,
                                                cfg.value_clip_eps)
    entropy = rl.masked_mean(entropy, mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
    metrics = {
        "ppo/loss": loss, "ppo/policy_loss": pg_loss, "value/loss": vf_loss,
        "ppo/clipfrac": pg_metrics["clipfrac"], "ppo/clipfrac_low": pg_metrics["clipfrac_low"],
        "ppo/clipfrac_high": pg_metrics["clipfrac_high"], "ppo/approx_kl": pg_metrics["approx_kl"],
        "ppo/entropy": entropy, "value/clipfrac": vf_metrics["clipfrac"],
    }
    for model_cfg, stats, prefix in zip(model_cfgs, routers, ("ppo/moe", "value/moe")):
        term, router = router_loss(model_cfg, stats, prefix)
        loss = loss + term
        metrics.update(router)
    metrics["ppo/loss"] = loss
    if extra_loss is not None:
        term, extra = extra_loss(params, mb, logprobs)
        loss = loss + term
        metrics.update({**{f"ppo/{k}": v for k, v in extra.items()}, "ppo/extra_loss": term,
                        "ppo/loss": loss})
    return loss, metrics


# A rollout batch (`score_rollout` + the sampler): what PPO and the GRPO family read.
def ppo_step(state, batch, *, cfg: PPOConfig, policy_cfg: ModelConfig,
             value_cfg: ModelConfig | None = None, labels=None, lora_scale: float = 0.0,
             advantage_fn=None, extra_loss=None):
    """A whole PPO update phase on one rollout batch, as one function (jit it once).

    Score normalisation (running moments) → KL penalty → rewards → GAE → whitening, then
    `cfg.epochs` × (B / `cfg.minibatch_size`) optimizer steps over RNG-drawn permutations
    (nested `lax.scan`), then the adaptive-KL update. `state.rl` (an `RLState`) holds β, the
    moments and the iteration counter, which this advances; `batch["scores"]` are raw.
    Logits are divided by the rows' sampling temperature (`batch["temperature"]`).

    Research hooks: `advantage_fn(rewards, values, mask) -> (advantages, returns)` (all
    `[B, N]`) replaces GAE; `extra_loss(params, minibatch, logprobs [b, N]) -> (scalar,
    metrics)` is added to each optimizer step's loss (metrics logged as `ppo/<name>`).
    """
    check_batch(batch, "ppo_step", (RL_BATCH + ("values",), RL_OPTIONAL))
    if getattr(state, "rl", None) is None or state.rl.kl_coef is None:
        raise ValueError("ppo_step: the state holds no KL coefficient β (state.rl.kl_coef): "
                         "create it with TrainState.create(params, tx, rng, "
                         "kl_coef=ppo_cfg.kl_coef); the state is where β lives (the adaptive "
                         "controller updates it there)")
    mask = batch["response_mask"]
    B, N = mask.shape
    num_minibatches = cfg.num_minibatches(B)
    kl_coef = state.rl.kl_coef
    moments, scores = rollout_scores(state.rl.moments, batch["scores"], cfg)
    batch = dict(batch, scores=scores)
    kl, rewards, advantages, returns = rollout_advantages(batch, kl_coef, cfg, advantage_fn)
    data = dict(batch, advantages=advantages, returns=returns)
    data.pop("scores")
    data.pop("ref_logprobs")
    data.pop("sampler_logprobs", None)
    mismatch = sampler_mismatch(batch, cfg.tis_cap, "ppo")
    if cfg.tis_cap:
        data["tis_weights"] = mismatch.pop("tis_weights")
    forward = functools.partial(policy_outputs, policy_cfg=policy_cfg, value_cfg=value_cfg,
                                labels=labels, lora_scale=lora_scale)
    grad_fn = value_and_grad(functools.partial(ppo_loss, cfg=cfg, forward=forward,
                                               model_cfgs=(policy_cfg, value_cfg),
                                               extra_loss=extra_loss), has_aux=True)
    state, metrics = minibatch_epochs(state, data, grad_fn, epochs=cfg.epochs,
                                      num_minibatches=num_minibatches,
                                      key=jax.random.fold_in(state.rng, state.step),
                                      grad_norm_key="ppo/grad_norm")

    seq_kl = jnp.sum(kl, axis=-1)
    mean_kl = jnp.mean(seq_kl)
    new_coef = kl_coef
    if cfg.adaptive_kl:
        new_coef = rl.adaptive_kl_coef(kl_coef, mean_kl, target=cfg.target_kl,
                                       horizon=cfg.kl_horizon, n_steps=B)
    state = state.replace(rl=state.rl.replace(kl_coef=new_coef, moments=moments,
                                              iteration=state.rl.iteration + 1))
    metrics.update({
        "ppo/mean_score": jnp.mean(batch["scores"]),
        "ppo/kl": mean_kl,
        "ppo/kl_coef": kl_coef,
        "ppo/mean_reward": jnp.mean(jnp.sum(rewards, axis=-1)),
        "ppo/advantages_mean": rl.masked_mean(advantages, mask),
        "ppo/advantages_std": jnp.sqrt(rl.masked_var(advantages, mask)),
        "ppo/returns_mean": rl.masked_mean(returns, mask),
        "value/error": rl.masked_mean(jnp.square(batch["values"] - returns), mask),
        "value/explained_variance": rl.explained_variance(batch["values"], returns, mask),
        "ppo/response_length": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32)),
        **mismatch,
    })
    return state, metrics


def make_ppo_step(policy_cfg: ModelConfig, cfg: PPOConfig, *,
                  value_cfg: ModelConfig | None = None, labels=None, lora_scale: float = 0.0,
                  advantage_fn=None, extra_loss=None, state=None, mesh=None):
    """Jitted `ppo_step` with its hyper-parameters bound: one XLA dispatch per update phase.
    `value_cfg`: a separate critic's config (`ppo.critic="separate"`); `advantage_fn` /
    `extra_loss`: `ppo_step`'s research hooks."""
    check_factory_args("make_ppo_step", policy_cfg, cfg, PPOConfig)
    if (cfg.critic == "separate") != (value_cfg is not None):
        raise ValueError(f"ppo.critic={cfg.critic!r} needs value_cfg "
                         f"{'set' if cfg.critic == 'separate' else 'None'}")
    if value_cfg is None and not policy_cfg.scalar_head:
        raise ValueError("ppo.critic='shared' needs a policy config with scalar_head=True")
    fn = functools.partial(ppo_step, cfg=cfg, policy_cfg=policy_cfg, value_cfg=value_cfg,
                           labels=labels, lora_scale=lora_scale, advantage_fn=advantage_fn,
                           extra_loss=extra_loss)
    return jit_step(fn, state, mesh)
