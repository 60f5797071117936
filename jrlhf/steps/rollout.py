"""The rollout batch PPO and GRPO train on, and the functions that make it: the experience
forward (`score_rollout`), the sampler-vs-trainer mismatch and a reward model as a reward.

Rollout batch (B rows, P prompt columns, N response columns; `input_ids` is prompt + response):
  input_ids       [B, P+N]  left-padded prompt then right-padded response
  attention_mask  [B, P+N]  1 on real prompt tokens and on response tokens up to EOS (a
                            multi-turn episode's: its policy and observation tokens)
  response_mask   [B, N]    1 on response tokens up to and including EOS (an episode's: on
                            policy tokens only; 0 on observations, which are attended to)
  temperature     [B]       what the sampler divided each row's logits by (`Generation`'s):
                            every log-prob below and the update's own are of logits / it, so
                            the temperature is set once, where the rows are sampled
  logprobs        [B, N]    log-probs under the sampling policy (trainer's forward)
  ref_logprobs    [B, N]    log-probs under the frozen reference policy
  values          [B, N]    critic values at the rollout (PPO)
  scores          [B]       reward-model score of each full response
  sampler_logprobs [B, N]   optional (`score_rollout` sets it): the sampler's own log-probs of
                            the sampled tokens (its numerics may differ from the trainer's:
                            `rollout.dtype`); with it the step logs mismatch/* and can apply
                            truncated IS (`tis_cap`)
The logits / value predicting response token t sit at column P - 1 + t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrlhf import lora, losses, rl
from jrlhf.heads import without_scalar_head
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.sampling import Generation
from jrlhf.steps.common import forward_params

RL_BATCH = ("input_ids", "attention_mask", "response_mask", "temperature", "logprobs",
            "ref_logprobs", "scores")
# `experts` / `sampler_experts` [B, T, L_sparse, k]: a mixture of experts' sampled routing,
# replayed / only compared in the trainer's policy forwards (`rollout.routing_replay`).
RL_OPTIONAL = ("sampler_logprobs", "entropy", "experts", "sampler_experts")

# A single-pass update's batch: no policy log-probs, the update's own forward gives them.
RL_SINGLE_PASS = tuple(k for k in RL_BATCH if k != "logprobs")


def recorded_experts(batch) -> tuple[jax.Array | None, bool]:
    """`(experts, replay)` of a rollout (mini)batch: the sampler's recorded experts and whether
    they are replayed (key `experts`) or only compared (`sampler_experts`)."""
    if "experts" in batch:
        return batch["experts"], True
    return batch.get("sampler_experts"), False


def policy_outputs(params, input_ids, attention_mask, num_response: int, *,
                   policy_cfg: ModelConfig, value_cfg: ModelConfig | None, temperature,
                   labels=None, lora_scale: float = 0.0, with_entropy: bool = False,
                   with_router: bool = False, experts=None, replay: bool = True,
                   group_size: int = 1):
    """`(logprobs [B, N], entropy [B, N] | None, values [B, N])` of the response (the last N
    tokens of `input_ids`) under logits / temperature (a number or `[B]`), without
    materialising the logits. `with_router`: a fourth item, the `(policy, value model)` router
    stats of mixtures of experts (`transformer.token_outputs`; None for a dense model).
    `experts`, `replay`: the sampler's recorded experts of the policy's rows
    (`recorded_experts`). `group_size` K > 1: the policy runs each group of K consecutive
    rows' common prompt once (`transformer.token_outputs`; a critic scores the full rows).

    `params` is `{"policy": ...}` (value head on the policy's backbone, or no critic at all when
    `policy_cfg.scalar_head` is False: values are then zeros) or `{"policy": ..., "value": ...}`
    (a separate value model with config `value_cfg`).
    """
    fp = forward_params(params, labels, lora_scale)
    shared = value_cfg is None and policy_cfg.scalar_head
    out = tfm.token_outputs(policy_cfg, fp["policy"], input_ids, attention_mask,
                            last=num_response, temperature=temperature,
                            with_entropy=with_entropy, with_values=shared,
                            with_router=with_router and policy_cfg.is_moe, experts=experts,
                            replay=replay, group_size=group_size)
    value_router = None
    if shared:
        values = out.values
    elif value_cfg is None:
        values = jnp.zeros(out.logprobs.shape, jnp.float32)
    else:
        values, value_router = tfm.token_scores(value_cfg, fp["value"], input_ids,
                                                attention_mask, last=num_response,
                                                with_router=True)
    if with_router:
        return out.logprobs, out.entropy, values, (out.router, value_router)
    return out.logprobs, out.entropy, values


def sampler_mismatch(batch, tis_cap: float, section: str) -> dict:
    """With `batch["sampler_logprobs"]`: metrics `mismatch/gap_mean`, `gap_max`, `kl_k3`
    (`losses.logprob_mismatch` of the trainer's pre-update log-probs against the sampler's)
    and, when `tis_cap` > 0, `tis_weights [B, N]` (`losses.truncated_importance_weights`) with
    `mismatch/tis_capped` (share of tokens whose weight was capped). Empty without it."""
    if "sampler_logprobs" not in batch:
        if tis_cap:
            raise ValueError(f"{section}.tis_cap needs the rollout batch's sampler_logprobs")
        return {}
    mask = batch["response_mask"]
    trainer, sampler = batch["logprobs"], batch["sampler_logprobs"]
    out = {f"mismatch/{k}": v for k, v in losses.logprob_mismatch(trainer, sampler, mask).items()}
    if tis_cap:
        weights = losses.truncated_importance_weights(trainer, sampler, mask, tis_cap)
        capped = (mask > 0) & (trainer - sampler > jnp.log(tis_cap))
        out["mismatch/tis_capped"] = rl.masked_mean(capped.astype(jnp.float32), mask)
        out["tis_weights"] = weights
    return out


def reward_model_fn(rm_cfg: ModelConfig):
    """A `reward_fn` scoring prompt + response with a reward model (same tokenizer as the
    policy): the scalar head at each row's last real token. `score_rollout` passes the
    response's attention mask as its `response_mask` (a multi-turn episode's observations
    included)."""
    def reward_fn(rm_params, prompt_ids, prompt_mask, response_ids, response_attention):
        ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
        mask = jnp.concatenate([prompt_mask, response_attention], axis=1)
        return tfm.reward_scores(rm_cfg, rm_params, ids, mask)

    return reward_fn


def score_rollout(params, ref_params, reward_params, prompt_ids, prompt_mask,
                  response: Generation, *, policy_cfg: ModelConfig,
                  value_cfg: ModelConfig | None, reward_fn, missing_eos_penalty: float = 0.0,
                  lora_scale: float = 0.0, eos_token_id: int | None = None,
                  with_entropy: bool = False, with_policy: bool = True,
                  with_reference: bool = True, replay_experts: bool = True,
                  group_size: int = 1, response_attention=None):
    """The experience phase: one function giving `ppo_step`'s (or `grpo_step`'s) rollout batch.

    `prompt_ids, prompt_mask [B, P]` (left-padded) and `response`, the `sampling.Generation`
    sampled from them (its tokens, mask, log-probs and per-row temperature). `params` is the
    trained tree `{"policy": ..., ["value": ...]}`. Policy log-probs and values (zeros without
    a critic), reference log-probs (`ref_params`: the frozen initial policy, with or without a
    value head; None with LoRA, where the reference is the trained tree's frozen base without
    adapters), and `reward_fn(reward_params, prompt_ids, prompt_mask, response_ids,
    response_mask) -> [B]` scores, minus `missing_eos_penalty` for responses that never
    emitted EOS. Log-probs are recomputed with the trainer's own full forward at the
    temperature the rows were sampled at (equal to the sampler's within float32 rounding; the
    sampler's own are kept as `sampler_logprobs`).

    `with_entropy`: the batch also holds `entropy [B, N]`, the sampling policy's per-token
    entropy (a metric computed once here, in the forward the log-probs need anyway, instead of
    in every forward of the update).
    `with_policy=False`: no policy forward at all (no `logprobs`, `values` or `entropy`): for
    an update that makes a single pass with the pre-update weights and takes them from its own
    forward (`steps.grpo.single_pass`), so the rollout's tokens go through the policy once.
    `with_reference=False`: no reference forward (no `ref_logprobs`): for an update that has
    no reference (distillation).
    A mixture of experts' `response.experts` (recorded by the sampler) are replayed in the
    policy's forwards (`replay_experts`; batch key `experts`) or only compared (key
    `sampler_experts`); the reference scores with its own routing.
    `group_size` K > 1: the rows come in groups of K consecutive rows with one prompt (a
    rollout's K samples of each), whose prompt the policy and reference forwards run once per
    group (`transformer.token_outputs`).
    `response_attention [B, N]`: the response region's attention mask when it differs from
    `response.mask`: a multi-turn episode (`jrlhf.envs`) attends to its observation tokens,
    which its mask leaves out of the loss. The forwards and `reward_fn` see it; the log-probs,
    the loss mask and the EOS check stay on `response.mask`. Default: `response.mask`.

    Returns `(batch, scores)`; `batch["scores"]` is filled by the caller (after optional
    normalisation), the raw `scores [B]` are returned for metrics.
    """
    response_ids, response_mask, temperature = (response.tokens, response.mask,
                                                response.temperature)
    N = response_ids.shape[1]
    if response_attention is None:
        response_attention = response_mask
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_attention], axis=1)
    experts, replay = response.experts, replay_experts
    if with_policy:
        logprobs, entropy, values = policy_outputs(
            params, ids, mask, N, policy_cfg=policy_cfg, value_cfg=value_cfg,
            temperature=temperature, lora_scale=lora_scale, with_entropy=with_entropy,
            experts=experts, replay=replay, group_size=group_size)
    m = response_mask.astype(jnp.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask,
             "temperature": temperature, "sampler_logprobs": response.logprobs * m}
    if with_reference:
        if ref_params is None:
            ref_params = lora.base_params(params["policy"])
        # The reference's LM head alone is read: with or without a (shared) value head.
        ref_cfg, ref_params = without_scalar_head(policy_cfg, ref_params)
        batch["ref_logprobs"] = tfm.token_outputs(ref_cfg, ref_params, ids, mask, last=N,
                                                  temperature=temperature,
                                                  group_size=group_size).logprobs * m
    scores = reward_fn(reward_params, prompt_ids, prompt_mask, response_ids, response_attention)
    scores = scores.astype(jnp.float32)
    if eos_token_id is not None and missing_eos_penalty:
        has_eos = jnp.any((response_ids == eos_token_id) & (response_mask > 0), axis=1)
        scores = jnp.where(has_eos, scores, scores - missing_eos_penalty)
    if with_policy:
        batch.update(logprobs=logprobs * m, values=values * m)
    if with_policy and with_entropy:
        batch["entropy"] = entropy * m
    if experts is not None:
        batch["experts" if replay else "sampler_experts"] = experts
    return batch, scores
