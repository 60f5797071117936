"""Rollouts: sample → score → update, the iteration PPO and GRPO/RLOO share.

`RolloutLoop(setup, config, reward, ...)` is a `(state, prompts) -> (state, metrics)` callable
built once from a `Setup`; the PPO/GRPO stages and `jrlhf bench --step ppo_iteration` all run
it, so what bench times is what training runs. Its host state (iteration counter, the reward
normaliser's moments) is saved with every checkpoint through `get_state` / `set_state`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import rl, sharding
from jrlhf.config import Config, RolloutConfig
from jrlhf.models.config import ModelConfig
from jrlhf.sampling import generate
from jrlhf.setups import Setup, stream_key
from jrlhf.steps.ppo import reward_model_fn, score_rollout


@dataclasses.dataclass(frozen=True)
class Reward:
    """Where rollout scores come from: a jittable `fn(params, prompt_ids, prompt_mask,
    response_ids, response_mask) -> [B]` with its `params` (a reward model: `from_model`), or a
    host `text_fn(list[str]) -> scores` over the decoded responses (`decode(tokens, mask)`)."""

    fn: Callable | None = None
    params: Any = None
    text_fn: Callable | None = None
    decode: Callable | None = None

    def __post_init__(self):
        if (self.fn is None) == (self.text_fn is None):
            raise ValueError("a Reward needs exactly one of fn (jittable) or text_fn (host)")
        if self.text_fn is not None and self.decode is None:
            raise ValueError("a host text_fn reward needs decode(tokens, mask) -> texts")

    @classmethod
    def from_model(cls, rm_cfg: ModelConfig, rm_params) -> Reward:
        return cls(fn=reward_model_fn(rm_cfg), params=rm_params)


def _no_score(_, prompt_ids, *args):
    return jnp.zeros(prompt_ids.shape[0], jnp.float32)


def decode_texts(tokenizer, tokens, mask) -> list[str]:
    """Decoded responses: the tokens where `mask` is 1, special tokens skipped."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]


def make_sampler(cfg: ModelConfig, rollout: RolloutConfig, eos_token_id, pad_token_id, *,
                 num_samples: int = 1, mesh=None):
    """`sample(params, prompt_ids, prompt_mask, key) -> Generation` with the rollout settings:
    `num_samples` responses per prompt from one shared prefill, rows kept split over the mesh's
    batch axes when `mesh` is given."""
    return functools.partial(
        generate, cfg, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
        top_k=rollout.top_k, top_p=rollout.top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, num_samples=num_samples,
        cache_dtype=rollout.kv_cache_dtype or None,
        batch_sharding=None if mesh is None else sharding.batch_sharding(mesh))


def sample_batched(cfg: ModelConfig, params, prompt_ids, prompt_mask, key,
                   rollout: RolloutConfig, *, eos_token_id: int | None, pad_token_id: int = 0,
                   num_samples: int = 1):
    """`(tokens [B·K, N], mask [B·K, N])` as NumPy: K = `num_samples` responses per prompt row
    from one shared prefill (rows bK .. bK+K−1 are prompt b's), sampled `rollout.batch_size`
    prompts at a time (chunk `i` with key `fold_in(key, i)`)."""
    sample = make_sampler(cfg, rollout, eos_token_id, pad_token_id, num_samples=num_samples)
    tokens, masks = [], []
    for start in range(0, len(prompt_ids), rollout.batch_size):
        out = sample(params, jnp.asarray(prompt_ids[start:start + rollout.batch_size]),
                     jnp.asarray(prompt_mask[start:start + rollout.batch_size]),
                     jax.random.fold_in(key, start))
        tokens.append(np.asarray(out.tokens))
        masks.append(np.asarray(out.mask))
    return np.concatenate(tokens), np.concatenate(masks)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class RolloutLoop:
    """One PPO or GRPO/RLOO iteration per call: generate → score → normalise → update.

    Args:
        setup: a "ppo" or "grpo" `Setup` (its state is the one passed to each call).
        config: uses `rollout` (sampling), `ppo.normalize_rewards` / `ppo.reward_clip` (PPO),
            `grpo.group_size` (GRPO: each prompt is sampled that many times), `run.seed`.
        reward: a `Reward`.
        eos_token_id / pad_token_id: the tokenizer's.
    """

    def __init__(self, setup: Setup, config: Config, reward: Reward, *,
                 eos_token_id: int | None, pad_token_id: int = 0):
        if setup.algorithm not in ("ppo", "grpo"):
            raise ValueError(f"a rollout loop runs ppo or grpo, not {setup.algorithm!r}")
        self.setup, self.reward = setup, reward
        self.group = config.grpo.group_size if setup.algorithm == "grpo" else 1
        self.key = stream_key(config.run.seed, setup.name, "sample")
        self.ppo = config.ppo if setup.algorithm == "ppo" else None
        r = config.rollout
        self.sample = make_sampler(setup.model_cfg, r, eos_token_id, pad_token_id,
                                   num_samples=self.group, mesh=setup.mesh)
        self.score = jax.jit(functools.partial(
            score_rollout, policy_cfg=setup.model_cfg, value_cfg=setup.value_cfg,
            reward_fn=reward.fn or _no_score, temperature=r.temperature,
            missing_eos_penalty=r.missing_eos_penalty, lora_scale=setup.lora_scale,
            eos_token_id=eos_token_id))
        clip = config.ppo.reward_clip

        @jax.jit
        def normalize(moments, scores):
            moments = rl.update_moments(moments, scores)
            return moments, rl.normalize_scores(scores, moments, clip)

        self._normalize = normalize
        self.iteration = 0
        self.moments = rl.RunningMoments.create()

    def _scores(self, raw):
        ppo = self.ppo
        if ppo is not None and ppo.normalize_rewards:
            self.moments, scores = self._normalize(self.moments, raw)
            return scores
        if ppo is not None and ppo.reward_clip:
            return jnp.clip(raw, -ppo.reward_clip, ppo.reward_clip)
        return raw

    def __call__(self, state, prompts):
        setup = self.setup
        prompt_ids, prompt_mask = (np.asarray(prompts[k]) for k in ("input_ids", "attention_mask"))
        # The group's K samples share one prefill of their prompt (generate's num_samples).
        ids, mask = (np.repeat(x, self.group, axis=0) for x in (prompt_ids, prompt_mask))
        if setup.mesh is not None:
            batch_sh = sharding.batch_sharding(setup.mesh)
            ids, mask = sharding.put((ids, mask), batch_sh)
            split = len(prompt_ids) % sharding.batch_devices(setup.mesh) == 0
            prompt_sh = batch_sh if split else sharding.replicated(setup.mesh)
            prompt_ids, prompt_mask = sharding.put((prompt_ids, prompt_mask), prompt_sh)
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        key = jax.random.fold_in(self.key, self.iteration)
        gen, t_gen = _timed(self.sample, setup.policy_params(state.params),
                            jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key)
        tree = state.params if setup.algorithm == "ppo" else {"policy": state.params}
        (batch, raw), t_score = _timed(self.score, tree, setup.ref_params, self.reward.params,
                                       ids, mask, gen.tokens, gen.mask)
        if self.reward.text_fn is not None:
            texts = self.reward.decode(gen.tokens, gen.mask)
            raw = jnp.asarray(self.reward.text_fn(texts), jnp.float32)
        batch["scores"] = self._scores(raw)
        (state, metrics), t_update = _timed(setup.step, state, batch)
        self.iteration += 1
        raw = np.asarray(raw)
        lengths = np.asarray(gen.mask).sum(1)
        B, P = ids.shape
        seq_tokens = B * (P + gen.tokens.shape[1])
        epochs = self.ppo.ppo_epochs if self.ppo is not None else 1
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({
            "score/mean": float(raw.mean()), "score/min": float(raw.min()),
            "score/max": float(raw.max()), "response_length": float(lengths.mean()),
            "time/generate": t_gen, "time/score": t_score, "time/update": t_update,
            "tokens_per_s/generate": float(lengths.sum()) / t_gen,
            "tokens_per_s/score": seq_tokens / t_score,
            "tokens_per_s/update": seq_tokens * epochs / t_update,
        })
        return state, metrics

    def get_state(self) -> dict:
        m = self.moments
        return {"iteration": self.iteration,
                "moments": [float(m.count), float(m.mean), float(m.var)]}

    def set_state(self, saved: dict) -> None:
        self.iteration = saved["iteration"]
        c, mu, var = (jnp.asarray(x, jnp.float32) for x in saved["moments"])
        self.moments = rl.RunningMoments(count=c, mean=mu, var=var)

