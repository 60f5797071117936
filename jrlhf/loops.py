"""Host loops: they only orchestrate the jitted pieces (sample, score, update) and log."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import lora, optim, rl, sharding
from jrlhf.config import Config
from jrlhf.models import transformer as tfm
from jrlhf.models.config import ModelConfig
from jrlhf.sampling import generate
from jrlhf.state import TrainState
from jrlhf.steps.common import place_state
from jrlhf.steps.ppo import make_ppo_step, score_rollout


class PPOResult(NamedTuple):
    state: TrainState
    policy_cfg: ModelConfig
    value_cfg: ModelConfig | None
    ref_params: Any
    history: list[dict[str, float]]


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar on stderr (a plain iterator when disabled)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                leave=True)


def make_mesh_or_none(config: Config):
    """The configured mesh, or None for a 1x1x1 mesh (plain jit on the default device)."""
    if config.mesh.shape == (1, 1, 1):
        return None
    return sharding.make_mesh(config.mesh)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def prepare_ppo_params(config: Config, policy_cfg: ModelConfig, params, rng):
    """Trainable PPO params, the reference params and the configs (shared or separate critic).

    The shared critic is a zero-initialised scalar head on the policy. With LoRA the reference
    is None: `score_rollout` reads the frozen base weights out of the trained tree itself, so no
    second copy of the weights is kept.
    """
    cfg = config.ppo
    value_cfg = None
    if cfg.critic == "shared":
        if not policy_cfg.scalar_head:
            policy_cfg = dataclasses.replace(policy_cfg, scalar_head=True)
            params = dict(params, score={"kernel": jnp.zeros((policy_cfg.hidden_size, 1))})
        tree = {"policy": params}
    else:
        value_cfg = dataclasses.replace(policy_cfg, lm_head=False, scalar_head=True)
        copy = jax.tree.map(jnp.array, params)  # the critic starts from the policy's backbone
        value = {k: v for k, v in copy.items() if k not in ("lm_head", "score")}
        value["score"] = {"kernel": jnp.zeros((policy_cfg.hidden_size, 1))}
        tree = {"policy": params, "value": value}
    if config.lora.enabled:
        tree["policy"] = lora.add_lora(tree["policy"], config.lora, rng)
        ref_params = None
        labels = optim.trainable_labels(tree, config.optim.freeze,
                                        train_only=lora.LORA_TRAINABLE)
    else:
        ref_params = jax.tree.map(jnp.array, params)  # frozen copy of the initial policy
        labels = optim.trainable_labels(tree, config.optim.freeze)
    return tree, ref_params, labels, policy_cfg, value_cfg


def train_ppo(config: Config, *, policy: tuple[ModelConfig, Any],
              reward_fn: Callable, reward_params: Any = None,
              prompt_batches: Iterator[dict], eos_token_id: int | None, pad_token_id: int = 0,
              metrics_path: str | Path | None = None,
              on_iteration: Callable[[int, dict], None] | None = None) -> PPOResult:
    """PPO: prompts → generate → score (policy, reference, reward) → `ppo_step`, repeated.

    Args:
        config: full config; uses `ppo`, `optim`, `lora`, `mesh`, `run`.
        policy: `(ModelConfig, params)` of the initial policy (also the reference).
        reward_fn: `reward_fn(reward_params, prompt_ids, prompt_mask, response_ids,
            response_mask) -> scores [B]`, jittable (`steps.ppo.reward_model_fn` for an RM).
        prompt_batches: iterator of `{"input_ids", "attention_mask"}` left-padded prompt
            batches of `ppo.rollout_batch_size` rows.
        metrics_path: a JSONL file that gets one metrics line per iteration.
        on_iteration: called as `on_iteration(i, metrics)` after each iteration.

    Returns:
        `PPOResult(state, policy_cfg, value_cfg, ref_params, history)`.
    """
    cfg = config.ppo
    rng = jax.random.key(config.run.seed)
    policy_cfg, params = policy
    tree, ref_params, labels, policy_cfg, value_cfg = prepare_ppo_params(
        config, policy_cfg, params, jax.random.fold_in(rng, 1))
    num_mb = cfg.num_minibatches(cfg.rollout_batch_size)
    optim_cfg = dataclasses.replace(config.optim, learning_rate=cfg.learning_rate,
                                    total_steps=cfg.iterations * cfg.ppo_epochs * num_mb)
    state = TrainState.create(tree, optim.make_optimizer(optim_cfg, labels),
                              jax.random.fold_in(rng, 2), kl_coef=cfg.kl_coef)
    mesh = make_mesh_or_none(config)
    if mesh is not None:
        state = place_state(state, mesh)
        if ref_params is not None:
            ref_params = jax.device_put(ref_params, sharding.param_shardings(ref_params, mesh))
    lora_scale = config.lora.scale
    ppo_step = make_ppo_step(cfg, policy_cfg, value_cfg, labels=labels, lora_scale=lora_scale,
                             state=state, mesh=mesh)
    scorer = jax.jit(functools.partial(
        score_rollout, cfg=cfg, policy_cfg=policy_cfg, value_cfg=value_cfg, reward_fn=reward_fn,
        lora_scale=lora_scale, eos_token_id=eos_token_id))
    sample = functools.partial(
        generate, policy_cfg, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    @jax.jit
    def normalize(moments, scores):
        moments = rl.update_moments(moments, scores)
        return moments, rl.normalize_scores(scores, moments, cfg.reward_clip)

    moments = rl.RunningMoments.create()
    history = []
    out = open(metrics_path, "a") if metrics_path else None
    bar = progress(range(cfg.iterations), cfg.iterations, "ppo", config.run.progress)
    try:
        for it in bar:
            prompts = next(prompt_batches)
            ids, mask = prompts["input_ids"], prompts["attention_mask"]
            if mesh is not None:
                ids, mask = jax.device_put((ids, mask), sharding.batch_sharding(mesh))
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
            key = jax.random.fold_in(jax.random.fold_in(rng, 3), it)
            policy_now = lora.merge_lora(state.params["policy"], lora_scale)
            gen, t_gen = _timed(sample, policy_now, ids, mask, key)
            (batch, raw_scores), t_score = _timed(
                scorer, state.params, ref_params, reward_params, ids, mask, gen.tokens, gen.mask)
            if cfg.normalize_rewards or cfg.reward_clip:
                if cfg.normalize_rewards:
                    moments, scores = normalize(moments, raw_scores)
                else:
                    scores = jnp.clip(raw_scores, -cfg.reward_clip, cfg.reward_clip)
            else:
                scores = raw_scores
            batch["scores"] = scores
            (state, metrics), t_update = _timed(ppo_step, state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            raw = np.asarray(raw_scores)
            B, P = ids.shape
            new_tokens = float(np.asarray(gen.mask).sum())
            seq_tokens = B * (P + gen.tokens.shape[1])
            metrics.update({
                "iteration": it, "score/mean": float(raw.mean()), "score/min": float(raw.min()),
                "score/max": float(raw.max()),
                "time/generate": t_gen, "time/score": t_score, "time/update": t_update,
                "tokens_per_s/generate": new_tokens / t_gen,
                "tokens_per_s/score": seq_tokens / t_score,
                "tokens_per_s/update": seq_tokens * cfg.ppo_epochs / t_update,
            })
            history.append(metrics)
            if out:
                out.write(json.dumps(metrics) + "\n")
                out.flush()
            if config.run.progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(score=f"{metrics['score/mean']:.3f}",
                                kl=f"{metrics['ppo/kl']:.3f}",
                                len=f"{metrics['ppo/response_length']:.1f}")
            if on_iteration:
                on_iteration(it, metrics)
    finally:
        if out:
            out.close()
    return PPOResult(state, policy_cfg, value_cfg, ref_params, history)
