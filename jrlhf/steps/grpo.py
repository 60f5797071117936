"""GRPO and RLOO: critic-free policy updates with group baselines, one compiled update.

Rollout batch: B = G·K rows, the K samples of each prompt consecutive. `input_ids,
attention_mask [B, P+N]`, `response_mask, logprobs, ref_logprobs [B, N]`, `temperature,
scores [B]`;
optional `sampler_logprobs [B, N]` as in `jrlhf.steps.rollout` (mismatch/* metrics, `tis_cap`) and
`entropy [B, N]` (the sampling policy's, from `score_rollout(with_entropy=True)`: the `entropy`
metric, kept out of the update's forwards, which need none).
Inside one function: advantages from the scores within each group (GRPO: normalised by the
group's mean and std; RLOO: minus the mean of the other K−1), then epochs × minibatches of the
clipped surrogate with `kl_coef`·k3 KL to the reference as a loss term.

A single-pass update (`single_pass`: one epoch, one minibatch, no micro-batches; GRPO's
default) sees each row once, with the weights that sampled it: its own forward's log-probs
(stop-gradient) are the pre-update ones, so its batch may leave `logprobs` out and the rollout
skips the policy's scoring forward (`score_rollout(with_policy=False)`); the mismatch metrics,
truncated IS weights and entropy then come from that same forward.

Shared prompts (`grpo.shared_prompt`, on by default): a group's K rows share their prompt
columns, so the update's forward and backward (and the rollout's scoring forwards) run each
prompt once per group, not K times (`transformer.Transformer.shared_prompt`); with P prompt and
N response tokens that is (P + K·N) / (K·(P + N)) of the tokens, 5/8 at P = N, K = 4.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jrlhf import losses
from jrlhf.config import GRPOConfig
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.rl import masked_mean
from jrlhf.steps.common import (accumulate_gradients, check_batch, check_factory_args,
                                forward_params, jit_step, minibatch_epochs, router_loss)
from jrlhf.steps.rollout import (RL_BATCH, RL_OPTIONAL, RL_SINGLE_PASS, recorded_experts,
                                 sampler_mismatch)


def sequence_advantages(scores, group_size: int, estimator: str, scale: bool = True,
                        rows=None):
    """Advantages `[B]` from scores `[B]` grouped in consecutive runs of `group_size`.
    `scale`: divide by the group's (grpo) or batch's (reinforce++) std; RLOO never does.
    `rows [B]` (bool; None = all): the real rows; reinforce++'s batch baseline is theirs
    (dynamic sampling's filler groups are all-equal: 0 under grpo and rloo anyway)."""
    groups = scores.reshape(-1, group_size)
    if estimator == "grpo":
        adv = losses.group_advantages(groups, scale=scale)
    elif estimator == "rloo":
        adv = losses.leave_one_out_advantages(groups)
    elif estimator == "reinforce++":
        adv = losses.batch_baseline_advantages(
            groups, scale=scale, rows=None if rows is None else rows.reshape(groups.shape))
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose grpo, rloo or reinforce++")
    return adv.reshape(-1)


def single_pass(cfg: GRPOConfig, rows: int) -> bool:
    """Whether the update over `rows` rollout rows is one forward of each row with the
    pre-update weights (one epoch, one minibatch, no micro-batches): then its own log-probs
    are the rollout's and the scoring forward of the policy can be skipped."""
    return (cfg.epochs == 1 and (cfg.minibatch_size or rows) == rows
            and cfg.grad_accum_steps == 1)


def prompt_group_size(cfg: GRPOConfig, rows: int) -> int:
    """K = `grpo.group_size` when the update runs each group's prompt once
    (`grpo.shared_prompt`, and every minibatch and micro-batch of `rows` rollout rows holds
    whole groups), else 1."""
    size = cfg.minibatch_size or rows
    whole = size % cfg.group_size == 0 and (size // cfg.grad_accum_steps) % cfg.group_size == 0
    return cfg.group_size if cfg.shared_prompt and whole else 1


def grpo_loss(params, mb, counts, *, cfg: GRPOConfig, model_cfg: ModelConfig, labels=None,
              lora_scale: float = 0.0, extra_loss=None, group_size: int = 1):
    """The GRPO-family loss of one (micro-)batch `mb`, aggregated with `counts`
    (`losses.aggregation_counts` of the optimizer step's whole minibatch), plus
    `extra_loss(params, mb, logprobs) -> (term, metrics)` when given (weighted
    1/`grad_accum_steps`: each micro-batch's term is its own mean). Returns `(loss, metrics)`.

    Without `mb["logprobs"]` (a single pass) the pre-update log-probs are this forward's own,
    stop-gradient, and the mismatch metrics / TIS weights (against `mb["sampler_logprobs"]`)
    and the policy's entropy are computed from it. `group_size` K > 1: `mb`'s rows are whole
    groups of K rows with one prompt, run once per group (`prompt_group_size`)."""
    N = mb["response_mask"].shape[1]
    fp = forward_params(params, labels, lora_scale)
    own = "logprobs" not in mb
    experts, replay = recorded_experts(mb)
    out = tfm.token_outputs(model_cfg, fp, mb["input_ids"], mb["attention_mask"], last=N,
                            temperature=mb["temperature"], with_entropy=own,
                            with_router=model_cfg.is_moe, experts=experts, replay=replay,
                            group_size=group_size)
    logprobs, weights, measured = out.logprobs, mb.get("tis_weights"), {}
    if own:
        old = jax.lax.stop_gradient(logprobs)
        measured = sampler_mismatch(dict(mb, logprobs=old), cfg.tis_cap, "grpo")
        weights = measured.pop("tis_weights", None)
        measured["entropy"] = masked_mean(jax.lax.stop_gradient(out.entropy),
                                          mb["response_mask"])
    else:
        old = mb["logprobs"]
    loss, m = losses.clipped_kl_regularised_loss(
        logprobs, old, mb["ref_logprobs"], mb["advantages"], mb["response_mask"],
        cfg.clip_eps, cfg.kl_coef, clip_high=cfg.clip_high or None, dual_clip=cfg.dual_clip,
        ratio_level=cfg.importance_ratio, aggregation=cfg.loss_aggregation, counts=counts,
        token_weights=weights)
    m = dict(m, **measured)
    # Its mean over micro-batches, like extra_loss's (the metrics are averaged by the caller).
    term, router = router_loss(model_cfg, out.router, "moe")
    loss, m = loss + term / cfg.grad_accum_steps, dict(m, **router)
    if extra_loss is not None:
        term, extra = extra_loss(params, mb, logprobs)
        loss = loss + term / cfg.grad_accum_steps
        m = dict(m, **extra, extra_loss=term)
    return loss, dict(m, loss=loss)


# Metrics that are aggregated with the whole minibatch's counts (micro-batches sum to them);
# the rest are per-micro-batch means, averaged.
_SUMMED = ("loss", "policy_loss", "kl", "clipfrac", "clipfrac_low", "clipfrac_high",
           "dual_clipfrac", "approx_kl")


def minibatch_gradients(loss_fn, params, mb, grad_accum_steps: int):
    """`((loss, metrics), grads)` of one optimizer step's minibatch `mb`, in `grad_accum_steps`
    micro-batches whose losses are normalised by the whole minibatch's counts, so the summed
    gradient equals the full minibatch's for every aggregation mode."""
    counts = losses.aggregation_counts(mb["response_mask"])
    loss, aux, grads = accumulate_gradients(lambda p, micro: loss_fn(p, micro, counts), params,
                                            mb, grad_accum_steps)
    aux = {k: v if k in _SUMMED else v / grad_accum_steps for k, v in aux.items()}
    return (loss, aux), grads


def grpo_step(state, batch, *, cfg: GRPOConfig, model_cfg: ModelConfig, labels=None,
              lora_scale: float = 0.0, advantage_fn=None, extra_loss=None):
    """One GRPO/RLOO/REINFORCE++ update phase (all epochs × minibatches) on a grouped rollout
    batch, with the GRPO family's loss options of `cfg` (clip-higher, dual-clip, GSPO's
    sequence ratio, loss aggregation, unscaled advantages, micro-batches).

    Research hooks: `advantage_fn(scores [B], rows [B] bool) -> advantages [B]` replaces
    `cfg.estimator`'s (`rows`: the rows with a response token; K consecutive rows per group);
    `extra_loss(params, minibatch, logprobs [b, N]) -> (scalar, metrics)` is added to each
    optimizer step's loss (its metrics logged under the estimator's prefix).

    The trained log-probs are those of logits / the rows' sampling temperature
    (`batch["temperature"]`). A single-pass update (`single_pass`) takes a batch without
    `logprobs` and uses its own forward's (see the module docstring); any other refuses it.
    A state with an `RLState` (`state.rl`) has its iteration counter advanced.

    Each group's K rows are K samples of one prompt (the same prompt columns): with
    `cfg.shared_prompt` the forward runs that prompt once per group and minibatches are whole
    groups (`prompt_group_size`); the metric `prompt_mismatch` (the share of rows whose prompt
    differs from their group's first row's) is then logged and must be 0.
    """
    check_batch(batch, f"{cfg.estimator} step", (RL_BATCH, RL_OPTIONAL + ("values",)),
                (RL_SINGLE_PASS, RL_OPTIONAL + ("values",)))
    mask = batch["response_mask"]
    B = mask.shape[0]
    if B % cfg.group_size:
        raise ValueError(f"batch of {B} rows is not a whole number of groups of "
                         f"{cfg.group_size}")
    size = cfg.minibatch_size or B
    if B % size:
        raise ValueError(f"batch of {B} rows is not divisible by grpo.minibatch_size={size}")
    if size % cfg.grad_accum_steps:
        raise ValueError(f"minibatch of {size} rows is not divisible by "
                         f"grpo.grad_accum_steps={cfg.grad_accum_steps}")
    own = "logprobs" not in batch
    if own and not single_pass(cfg, B):
        raise ValueError(
            f"{cfg.estimator} step: the batch has no pre-update logprobs, which only a "
            f"single-pass update takes from its own forward (grpo.epochs=1, one minibatch, "
            f"grpo.grad_accum_steps=1); this one has epochs={cfg.epochs}, "
            f"minibatch_size={cfg.minibatch_size} of {B} rows, "
            f"grad_accum_steps={cfg.grad_accum_steps}: score the policy too "
            f"(score_rollout(with_policy=True))")
    rows = jnp.any(mask > 0, axis=1)
    if advantage_fn is None:
        advantages = sequence_advantages(batch["scores"], cfg.group_size, cfg.estimator,
                                         cfg.scale_advantages, rows=rows)
    else:
        advantages = advantage_fn(batch["scores"], rows)
        if advantages.shape != (B,):
            raise ValueError(f"advantage_fn returned shape {advantages.shape}; the GRPO "
                             f"family's advantages are one per row, ({B},)")
    data = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask",
                                  "temperature", "logprobs", "ref_logprobs", "experts",
                                  "sampler_experts") if k in batch}
    data["advantages"] = advantages
    if own:  # measured in the update's forward (grpo_loss's sampler_mismatch)
        mismatch = {}
        if "sampler_logprobs" in batch:
            data["sampler_logprobs"] = batch["sampler_logprobs"]
    else:
        mismatch = sampler_mismatch(batch, cfg.tis_cap, "grpo")
        if cfg.tis_cap:
            data["tis_weights"] = mismatch.pop("tis_weights")
    group = prompt_group_size(cfg, B)
    loss_fn = functools.partial(grpo_loss, cfg=cfg, model_cfg=model_cfg, labels=labels,
                                lora_scale=lora_scale, extra_loss=extra_loss, group_size=group)

    def grad_fn(params, mb):
        (loss, m), grads = minibatch_gradients(loss_fn, params, mb, cfg.grad_accum_steps)
        return (loss, {k if k.startswith("mismatch/") else f"{cfg.estimator}/{k}": v
                       for k, v in m.items()}), grads

    state, metrics = minibatch_epochs(
        state, data, grad_fn, epochs=cfg.epochs, num_minibatches=B // size,
        key=jax.random.fold_in(state.rng, state.step),
        grad_norm_key=f"{cfg.estimator}/grad_norm",
        # Whole groups per minibatch whenever they fit, micro-batched or not: the same
        # minibatches with and without grad_accum_steps.
        group_size=cfg.group_size if cfg.shared_prompt and size % cfg.group_size == 0 else 1)
    if getattr(state, "rl", None) is not None:  # the rollout iteration this update ends
        state = state.replace(rl=state.rl.replace(iteration=state.rl.iteration + 1))
    metrics.update({f"{cfg.estimator}/mean_score": jnp.mean(batch["scores"]),
                    f"{cfg.estimator}/advantages_std": jnp.std(advantages), **mismatch})
    if "entropy" in batch:
        metrics[f"{cfg.estimator}/entropy"] = masked_mean(batch["entropy"], mask)
    if group > 1:
        metrics[f"{cfg.estimator}/prompt_mismatch"] = prompt_mismatch(
            batch["input_ids"], batch["attention_mask"], mask.shape[1], group)
    return state, metrics


def prompt_mismatch(input_ids, attention_mask, num_response: int, group_size: int):
    """The share of rows `[B, P+N]` whose prompt columns (ids or mask; all but the last
    `num_response`) differ from their group's first row's: 0 for a rollout's batch, where a
    shared-prompt forward is exact; anything else means the batch's groups are not K samples
    of one prompt and `grpo.shared_prompt` must be off."""
    B, T = input_ids.shape
    P = T - num_response

    def differs(x):
        x = x[:, :P].reshape(B // group_size, group_size, P)
        return jnp.any(x != x[:, :1], axis=-1)

    return jnp.mean((differs(input_ids) | differs(attention_mask)).astype(jnp.float32))


def make_grpo_step(model_cfg: ModelConfig, cfg: GRPOConfig, *, labels=None,
                   lora_scale: float = 0.0, advantage_fn=None, extra_loss=None, state=None,
                   mesh=None):
    """Jitted `grpo_step` (RLOO with `cfg.estimator="rloo"`): one dispatch per update phase.
    `advantage_fn` / `extra_loss`: `grpo_step`'s research hooks."""
    check_factory_args("make_grpo_step", model_cfg, cfg, GRPOConfig)
    fn = functools.partial(grpo_step, cfg=cfg, model_cfg=model_cfg, labels=labels,
                           lora_scale=lora_scale, advantage_fn=advantage_fn,
                           extra_loss=extra_loss)
    return jit_step(fn, state, mesh)


def rloo_step(state, batch, *, cfg: GRPOConfig, model_cfg: ModelConfig, labels=None,
              lora_scale: float = 0.0):
    """RLOO: `grpo_step` with leave-one-out baselines instead of group normalisation."""
    return grpo_step(state, batch, cfg=dataclasses.replace(cfg, estimator="rloo"),
                     model_cfg=model_cfg, labels=labels, lora_scale=lora_scale)
