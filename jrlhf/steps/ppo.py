"""PPO update: KL penalty, GAE, whitening and every epoch x minibatch in one compiled function.

Rollout batch (B rows, P prompt columns, N response columns; `input_ids` is prompt + response):
  input_ids       [B, P+N]  left-padded prompt then right-padded response
  attention_mask  [B, P+N]  1 on real prompt tokens and on response tokens up to EOS
  response_mask   [B, N]    1 on response tokens up to and including EOS
  logprobs        [B, N]    log-probs under the sampling policy (logits / temperature)
  ref_logprobs    [B, N]    log-probs under the frozen reference policy (same temperature)
  values          [B, N]    critic values at the rollout
  scores          [B]       reward-model score of each full response
The logits / value predicting response token t sit at column P - 1 + t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jrlhf import losses, rl
from jrlhf.config import PPOConfig
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.steps.common import forward_params, jit_step


def policy_outputs(params, input_ids, attention_mask, num_response: int, *,
                   policy_cfg: ModelConfig, value_cfg: ModelConfig | None, temperature: float,
                   labels=None, lora_scale: float = 0.0):
    """`(logits [B, N, V] / temperature, values [B, N])` at the positions predicting the response.

    `params` is `{"policy": ...}` (value head on the policy's backbone) or `{"policy": ...,
    "value": ...}` (a separate value model with config `value_cfg`).
    """
    fp = forward_params(params, labels, lora_scale)
    cut = slice(input_ids.shape[1] - num_response - 1, -1)
    if value_cfg is None:
        logits, values = tfm.forward_with_values(policy_cfg, fp["policy"], input_ids,
                                                 attention_mask)
    else:
        logits = tfm.forward(policy_cfg, fp["policy"], input_ids, attention_mask)
        values = tfm.token_scores(value_cfg, fp["value"], input_ids, attention_mask)
    return logits[:, cut] / temperature, values[:, cut]


def rollout_advantages(batch, kl_coef, cfg: PPOConfig):
    """Per-token KL, shaped rewards, GAE advantages (whitened if configured) and returns."""
    mask = batch["response_mask"]
    kl = rl.kl_penalty(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask
    rewards = rl.token_rewards(batch["scores"], kl, mask, kl_coef)
    advantages, returns = rl.gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
    return kl, rewards, advantages, returns


def ppo_loss(params, mb, *, cfg: PPOConfig, forward):
    """Clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy."""
    mask = mb["response_mask"]
    logits, values = forward(params, mb["input_ids"], mb["attention_mask"], mask.shape[1])
    logprobs = rl.logprobs_from_logits(logits, mb["response_ids"])
    pg_loss, pg_metrics = losses.ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask,
                                                 cfg.clip_eps)
    vf_loss, vf_metrics = losses.ppo_value_loss(values, mb["values"], mb["returns"], mask,
                                                cfg.value_clip_eps)
    entropy = rl.masked_mean(rl.entropy_from_logits(logits), mask)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
    metrics = {
        "ppo/loss": loss, "ppo/policy_loss": pg_loss, "value/loss": vf_loss,
        "ppo/clipfrac": pg_metrics["clipfrac"], "ppo/approx_kl": pg_metrics["approx_kl"],
        "ppo/entropy": entropy, "value/clipfrac": vf_metrics["clipfrac"],
    }
    return loss, metrics


def ppo_step(state, batch, *, cfg: PPOConfig, policy_cfg: ModelConfig,
             value_cfg: ModelConfig | None = None, labels=None, lora_scale: float = 0.0):
    """A whole PPO update phase on one rollout batch, as one function (jit it once).

    KL penalty → rewards → GAE → whitening, then `cfg.ppo_epochs` × `cfg.num_minibatches`
    optimizer steps over RNG-drawn permutations (nested `lax.scan`), then the adaptive-KL
    update. `state.kl_coef` holds β.
    """
    mask = batch["response_mask"]
    B, N = mask.shape
    if B % cfg.num_minibatches:
        raise ValueError(f"rollout batch {B} is not divisible by num_minibatches="
                         f"{cfg.num_minibatches}")
    kl_coef = state.kl_coef
    kl, rewards, advantages, returns = rollout_advantages(batch, kl_coef, cfg)
    data = dict(batch, advantages=advantages, returns=returns,
                response_ids=batch["input_ids"][:, -N:])
    data.pop("scores")
    data.pop("ref_logprobs")
    forward = functools.partial(policy_outputs, policy_cfg=policy_cfg, value_cfg=value_cfg,
                                temperature=cfg.temperature, labels=labels, lora_scale=lora_scale)
    grad_fn = jax.value_and_grad(functools.partial(ppo_loss, cfg=cfg, forward=forward),
                                 has_aux=True)
    mb_size = B // cfg.num_minibatches
    epoch_key = jax.random.fold_in(state.rng, state.step)

    def minibatch_update(train_state, mb):
        (_, metrics), grads = grad_fn(train_state.params, mb)
        return train_state.apply_gradients(grads), metrics

    def epoch(train_state, key):
        perm = jax.random.permutation(key, B)
        shuffled = jax.tree.map(
            lambda x: x[perm].reshape(cfg.num_minibatches, mb_size, *x.shape[1:]), data)
        return jax.lax.scan(minibatch_update, train_state, shuffled)

    keys = jax.random.split(epoch_key, cfg.ppo_epochs)
    state, metrics = jax.lax.scan(epoch, state, keys)
    metrics = jax.tree.map(jnp.mean, metrics)

    seq_kl = jnp.sum(kl, axis=-1)
    mean_kl = jnp.mean(seq_kl)
    if cfg.adaptive_kl:
        new_coef = rl.adaptive_kl_coef(kl_coef, mean_kl, target=cfg.target_kl,
                                       horizon=cfg.kl_horizon, n_steps=B)
        state = state.replace(kl_coef=new_coef)
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
    })
    return state, metrics


def make_ppo_step(cfg: PPOConfig, policy_cfg: ModelConfig, value_cfg: ModelConfig | None = None,
                  *, labels=None, lora_scale: float = 0.0, state=None, mesh=None):
    """Jitted `ppo_step` with its hyper-parameters bound: one XLA dispatch per update phase."""
    if (cfg.critic == "separate") != (value_cfg is not None):
        raise ValueError(f"ppo.critic={cfg.critic!r} needs value_cfg "
                         f"{'set' if cfg.critic == 'separate' else 'None'}")
    if value_cfg is None and not policy_cfg.scalar_head:
        raise ValueError("ppo.critic='shared' needs a policy config with scalar_head=True")
    fn = functools.partial(ppo_step, cfg=cfg, policy_cfg=policy_cfg, value_cfg=value_cfg,
                           labels=labels, lora_scale=lora_scale)
    return jit_step(fn, state, mesh)
