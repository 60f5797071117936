"""Rollouts: sample → score → update, the iteration PPO and GRPO/RLOO share.

`RolloutLoop(setup, config, reward, ...)` is a `(state, prompts) -> (state, metrics)` callable
built once from a `Setup`; the PPO/GRPO stages and `jrlhf bench --step ppo_iteration` all run
it, so what bench times is what training runs. It keeps no state of its own: the iteration
counter (which its sampling key folds in), β and the reward normaliser's moments are the train
state's `RLState`, advanced by the update step and checkpointed with the params.

With `env.enabled` the sampling phase plays multi-turn episodes instead (`jrlhf.envs`): one
episode per sampled row against the task's environment, each turn sampled by the loop's own
sampler; the scoring forwards attend to the observations, which the loss mask leaves out, and
the score is the episode's summed environment reward.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jrlhf import partial, rl, sharding
from jrlhf.config import Config, EnvConfig, RolloutConfig
from jrlhf.continuous import (advance_turn_slots, empty_turn_slots, generate_continuous,
                              generate_partial)
from jrlhf.distributed import gather_floats
from jrlhf.envs import Delayed, EpisodeBatch, left_pad, run_episodes
from jrlhf.models.config import ModelConfig
from jrlhf.rewards import Reward, check_finite
from jrlhf.rng import stream_key
from jrlhf.sampling import Generation, generate
from jrlhf.steps.common import under_expert_mesh
from jrlhf.steps.rollout import score_rollout
from jrlhf.tasks import TASKS

__all__ = ["Reward", "RolloutLoop", "RolloutSpec", "decode_texts", "make_sampler",
           "play_batched", "sample_batched"]


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What an algorithm's rollout loop does besides generate → score → update (its record's
    `rollout(config)`).

    group_size: samples per prompt, sharing one prefill (GRPO's K; 1 for PPO).
    shared_prompt: the scoring forwards run each group's prompt once
        (`transformer.token_outputs(group_size=...)`).
    dynamic_sampling / max_refills: drop groups whose scores are all equal and refill the batch
        from the next prompts, at most `max_refills` rounds.
    with_entropy: the scoring forward computes the policy's per-token entropy.
    update_epochs: passes of the update over the batch (for its tokens/s).
    score_policy: the scoring forward computes the policy's log-probs (and values); False when
        the update is a single pass that takes them from its own forward (then only the
        reference and the reward are scored).
    tis_cap / tis_cap_key: the update's truncated-importance-sampling cap and its config key:
        partial rollouts (`rollout.max_staleness`) need it on, the correction for tokens drawn
        by older policy versions.
    score_reference: the scoring forward computes the frozen reference's log-probs (False: an
        update with no reference, e.g. distillation's, whose batch has no `ref_logprobs`).
    rescore: None, or `rescore(setup, config) -> fn`, called once when the loop is built:
        `fn(batch) -> batch` then turns each scored batch (its `scores` set, after dynamic
        sampling) into the one the update takes, e.g. distillation's teacher forward
        (`steps.distill.teacher_rescorer`); its seconds are logged as `time/rescore`.
    """

    group_size: int = 1
    shared_prompt: bool = False
    dynamic_sampling: bool = False
    max_refills: int = 0
    with_entropy: bool = False
    update_epochs: int = 1
    score_policy: bool = True
    tis_cap: float = 0.0
    tis_cap_key: str = ""
    score_reference: bool = True
    rescore: Callable[..., Callable] | None = None


def decode_texts(tokenizer, tokens, mask) -> list[str]:
    """Decoded responses: the tokens where `mask` is 1, special tokens skipped."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]


def records_experts(cfg: ModelConfig, rollout: RolloutConfig) -> bool:
    """Whether the samplers record the experts a mixture of experts routes each token to
    (`rollout.routing_replay` on or measure)."""
    return rollout.routing_replay != "off" and cfg.is_moe


def sampling_settings(cfg: ModelConfig, rollout: RolloutConfig, eos_token_id, pad_token_id
                      ) -> tuple[ModelConfig, dict]:
    """`(cfg, settings)`: the model computing in `rollout.dtype` when set, and the rollout's
    sampling keyword arguments: the one place every sampler of the rollout code reads them
    from."""
    if rollout.dtype:
        cfg = dataclasses.replace(cfg, dtype=rollout.dtype)
    return cfg, dict(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                     top_k=rollout.top_k, top_p=rollout.top_p, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, cache_dtype=rollout.kv_cache_dtype or None)


def with_rollout_settings(sampler, cfg: ModelConfig, rollout: RolloutConfig, eos_token_id,
                          pad_token_id, num_samples: int):
    """`sampler` (`generate`, `generate_continuous` or `generate_partial`) bound to the model
    and the rollout's `sampling_settings`."""
    cfg, settings = sampling_settings(cfg, rollout, eos_token_id, pad_token_id)
    # Every sampler records a mixture of experts' routing when it is replayed or compared
    # (partial rollouts carry it across calls in the pool: `RolloutPool.experts`).
    record = {"record_experts": True} if records_experts(cfg, rollout) else {}
    return functools.partial(sampler, cfg, num_samples=num_samples, **settings, **record)


def make_sampler(cfg: ModelConfig, rollout: RolloutConfig, eos_token_id, pad_token_id, *,
                 num_samples: int = 1, mesh=None):
    """`sample(params, prompt_ids, prompt_mask, key, budgets=None) -> Generation` with the
    rollout settings (computing in `rollout.dtype` when set): `num_samples` responses per prompt
    from one shared prefill, rows kept split over the mesh's batch axes when `mesh` is given;
    with `rollout.slots`, continuous batching over that many slots (fewer when a call has
    fewer rows: the evaluation's last chunk)."""
    if rollout.slots:
        continuous = with_rollout_settings(generate_continuous, cfg, rollout, eos_token_id,
                                           pad_token_id, num_samples)

        def sample(params, prompt_ids, prompt_mask, key, budgets=None):
            slots = min(rollout.slots, prompt_ids.shape[0] * num_samples)
            split = mesh is not None and slots % sharding.batch_devices(mesh) == 0
            return continuous(params, prompt_ids, prompt_mask, key, budgets=budgets,
                              slots=slots,
                              batch_sharding=sharding.batch_sharding(mesh) if split else None)

        return under_expert_mesh(sample, mesh)
    # A mixture of experts on an expert axis decodes expert-parallel, as its steps train.
    return under_expert_mesh(functools.partial(
        with_rollout_settings(generate, cfg, rollout, eos_token_id, pad_token_id, num_samples),
        batch_sharding=None if mesh is None else sharding.batch_sharding(mesh)), mesh)


def sample_batched(cfg: ModelConfig, params, prompt_ids, prompt_mask, key,
                   rollout: RolloutConfig, *, eos_token_id: int | None, pad_token_id: int = 0,
                   num_samples: int = 1):
    """`(tokens [B·K, N], mask [B·K, N])` as NumPy: K = `num_samples` responses per prompt row
    from one shared prefill (rows bK .. bK+K−1 are prompt b's), sampled `rollout.eval_batch_size`
    prompts at a time (the chunk from prompt `s` with key `fold_in(key, s)`). When `params` lie
    on a mesh the prompts are split over it too and the samples gathered back (every process
    gets all; each process must call this with the same prompts)."""
    mesh = sharding.mesh_of(params)
    tokens, masks = [], []
    for start in range(0, len(prompt_ids), rollout.eval_batch_size):
        chunk = [np.asarray(x[start:start + rollout.eval_batch_size])
                 for x in (prompt_ids, prompt_mask)]
        split = mesh is not None and (len(chunk[0]) * num_samples) % sharding.batch_devices(
            mesh) == 0
        if mesh is not None:
            chunk = sharding.put(chunk, sharding.rows_layout(mesh, len(chunk[0])))
        sample = make_sampler(cfg, rollout, eos_token_id, pad_token_id,
                              num_samples=num_samples, mesh=mesh if split else None)
        out = sample(params, jnp.asarray(chunk[0]), jnp.asarray(chunk[1]),
                     jax.random.fold_in(key, start))
        tokens.append(sharding.to_host(out.tokens))
        masks.append(sharding.to_host(out.mask))
    return np.concatenate(tokens), np.concatenate(masks)


def task_environment(config: Config) -> Callable:
    """`data.task`'s environment factory (a fresh `jrlhf.envs.Environment` per call); a task
    without one is refused in one line."""
    task = TASKS.get(config.data.task)
    if not hasattr(task, "environment"):
        with_env = ", ".join(k for k, v in TASKS.items() if hasattr(v, "environment"))
        raise ValueError(f"env.enabled: data.task={config.data.task!r} has no environment; "
                         f"tasks with one: {with_env}")
    return task.environment


def turn_samplers(cfg: ModelConfig, rollout: RolloutConfig, env: EnvConfig, eos_token_id,
                  pad_token_id, mesh=None) -> dict:
    """The samplers of an episode's policy turns (`jrlhf.envs.run_episodes`): `rollout`'s
    settings with `env.max_turn_tokens` new tokens. Whole-turn samplers keyed by whether a
    turn's rows split over `mesh` (True) or are replicated on it (False); with `rollout.slots`,
    `{"slots": ...}`, the maker of a `SlotTurnDecoder` (turns in slots that persist across
    device calls, `env.slot_steps` decode steps per call)."""
    turn = dataclasses.replace(rollout, max_new_tokens=env.max_turn_tokens)
    if rollout.slots:
        model_cfg, settings = sampling_settings(cfg, turn, eos_token_id, pad_token_id)
        return {"slots": functools.partial(SlotTurnDecoder, model_cfg, settings,
                                           slots=rollout.slots, steps=env.slot_steps)}
    return {split: make_sampler(cfg, turn, eos_token_id, pad_token_id,
                                mesh=mesh if split else None) for split in (False, True)}


def turn_sampler(samplers: dict, params, key, mesh=None):
    """The turn sampler of the policy `params` (`samplers` from `turn_samplers`): with slots a
    `SlotTurnDecoder` keyed by `key`; else a `jrlhf.envs.SampleTurn` whose `call`-th turn is
    sampled with key `fold_in(key, call)`, its rows split over `mesh` when they divide (else
    replicated), the outputs as NumPy on every process."""
    if "slots" in samplers:
        return samplers["slots"](params, key, mesh=mesh)
    calls = itertools.count()

    def sample_turn(ids, mask, budgets):
        split = mesh is not None and len(ids) % sharding.batch_devices(mesh) == 0
        args = (ids, mask, budgets)
        if mesh is not None:
            args = sharding.put(args, sharding.batch_sharding(mesh) if split
                                else sharding.replicated(mesh))
        ids, mask, budgets = map(jnp.asarray, args)
        gen = samplers[split](params, ids, mask, jax.random.fold_in(key, next(calls)),
                              budgets=budgets)
        return tuple(sharding.to_host(x) for x in (gen.tokens, gen.mask, gen.logprobs))

    return sample_turn


class SlotTurnDecoder:
    """`jrlhf.envs.TurnDecoder` on the device (`continuous.advance_turn_slots`): at most
    `slots` slots (fewer for fewer episodes), `steps` decode steps per call, episode b's turn
    k keyed `fold_in(fold_in(key, b), k)`. On a mesh the slots split over its batch axes when
    they divide (else every device decodes them all), and `agree` takes the first process's
    flags, so every process enters the same rows."""

    def __init__(self, cfg: ModelConfig, settings: dict, params, key, *, slots: int,
                 steps: int, mesh=None):
        self.cfg, self.settings, self.params, self.key = cfg, dict(settings), params, key
        self.max_slots, self.steps, self.mesh = slots, steps, mesh
        self.max_new_tokens = self.settings.pop("max_new_tokens")
        self.advance_fn = under_expert_mesh(advance_turn_slots, mesh)

    def open(self, episodes: int, width: int) -> int:
        mesh, S = self.mesh, min(self.max_slots, episodes)
        split = mesh is not None and S % sharding.batch_devices(mesh) == 0
        self.split = sharding.batch_sharding(mesh) if split else None
        self.width, self.busy = width, set()
        self.state = under_expert_mesh(empty_turn_slots, mesh)(
            self.cfg, self.params, slots=S, width=width, max_new_tokens=self.max_new_tokens,
            cache_dtype=self.settings["cache_dtype"],
            pad_token_id=self.settings["pad_token_id"], batch_sharding=self.split)
        return S

    def advance(self, entering):
        S, pad = len(self.state.active), self.settings["pad_token_id"]
        ids, mask = left_pad([e.context for e in entering] + [[]] * (S - len(entering)),
                             self.width, pad)
        rows = [np.array([getattr(e, name) for e in entering] + [0] * (S - len(entering)),
                         np.int32) for name in ("slot", "episode", "turn", "budget")]
        args = (ids, mask, *rows)
        if self.mesh is not None:
            args = sharding.put(args, sharding.replicated(self.mesh))
        ids, mask, slot, episode, turn, budget = args
        self.state = self.advance_fn(
            self.cfg, self.params, self.state, ids, mask, slot, np.int32(len(entering)),
            episode, turn, budget, self.key, steps=self.steps, batch_sharding=self.split,
            **self.settings)
        self.busy |= {e.slot for e in entering}
        active, tokens, tmask, logprobs = (sharding.to_host(x) for x in (
            self.state.active, self.state.tokens, self.state.mask, self.state.logprobs))
        ended = {s for s in self.busy if not active[s]}
        self.busy -= ended
        lengths = tmask.sum(1)
        return {s: (tokens[s, :lengths[s]].tolist(), logprobs[s, :lengths[s]]) for s in ended}

    def agree(self, flags):
        if jax.process_count() == 1:
            return flags
        return gather_floats(np.asarray(flags, np.float32))[0] > 0


def play_episodes(sample_turn, environment: Callable, prompt_ids, prompt_mask, tokenizer,
                  env: EnvConfig, *, eos_token_id, pad_token_id, chat_template: bool
                  ) -> EpisodeBatch:
    """One episode per row of the left-padded `prompt_ids, prompt_mask [B, P]` (NumPy), each
    against a fresh `environment()`, its turns sampled by `sample_turn` (`turn_sampler`), with
    the `env` budgets and settings (`jrlhf.envs.run_episodes`): the rollout loop's sampling
    phase and the evaluation's. With `env.simulated_latency_s` every step answers that much
    later at most (`jrlhf.envs.Delayed`, random delays: the batch must not depend on them)."""
    envs = [environment() for _ in prompt_ids]
    if env.simulated_latency_s:
        delays = random.Random()  # unseeded on purpose: the batch must not depend on it
        envs = [Delayed(e, env.simulated_latency_s, delays) for e in envs]
    return run_episodes(
        sample_turn, envs,
        [row[m > 0].tolist() for row, m in zip(prompt_ids, prompt_mask)], tokenizer,
        max_turn_tokens=env.max_turn_tokens, max_episode_tokens=env.max_episode_tokens,
        max_turns=env.max_turns or None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        prompt_width=prompt_ids.shape[1], timeout_s=env.timeout_s, on_error=env.on_error,
        chat_template=chat_template, observation_role=env.observation_role, groups=env.groups)


def play_batched(cfg: ModelConfig, params, prompt_ids, prompt_mask, key,
                 rollout: RolloutConfig, env: EnvConfig, *, tokenizer, environment: Callable,
                 eos_token_id: int | None, pad_token_id: int = 0,
                 chat_template: bool = True) -> EpisodeBatch:
    """`sample_batched` for episodes: one episode per prompt row, `rollout.eval_batch_size`
    prompts at a time (the chunk from prompt `s` with key `fold_in(key, s)`), the chunks'
    batches concatenated and their end counts summed. On a mesh (the mesh `params` lie on)
    each turn's rows split over it when they divide; every process plays every episode (same
    prompts on each)."""
    mesh = sharding.mesh_of(params)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    samplers = turn_samplers(cfg, rollout, env, eos, pad_token_id, mesh)
    parts = []
    for start in range(0, len(prompt_ids), rollout.eval_batch_size):
        rows = slice(start, start + rollout.eval_batch_size)
        parts.append(play_episodes(
            turn_sampler(samplers, params, jax.random.fold_in(key, start), mesh), environment,
            np.asarray(prompt_ids[rows]), np.asarray(prompt_mask[rows]), tokenizer, env,
            eos_token_id=eos, pad_token_id=pad_token_id, chat_template=chat_template))
    return EpisodeBatch(
        {k: np.concatenate([p.batch[k] for p in parts]) for k in parts[0].batch},
        dict(sum((collections.Counter(p.counts) for p in parts), collections.Counter())),
        [line for p in parts for line in p.errors], [end for p in parts for end in p.ends],
        sum(p.wait_s for p in parts))


def gather_rows(name: str, lo: int, local: np.ndarray) -> np.ndarray:
    """The whole `[B]` vector from each process's rows `lo..lo+len(local)-1` (one process:
    `local` itself)."""
    if jax.process_count() == 1:
        return local
    from jrlhf import distributed

    parts = distributed.gather_json(name, [lo, np.asarray(local).tolist()])
    return np.concatenate([np.asarray(v, local.dtype) for _, v in sorted(
        {start: v for start, v in parts}.items())])


def _no_device_reward(_, prompt_ids, *__):
    """A rollout's device reward when there is none: zeros `[B]` (episodes are scored by their
    environment)."""
    return jnp.zeros(prompt_ids.shape[0], jnp.float32)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


class RolloutLoop:
    """One rollout iteration per call: generate → score → (overlong handling, dynamic
    sampling) → update (which normalises the raw scores where its algorithm does).

    Args:
        setup: a `Setup` whose algorithm samples (its state, whose `rl` counts the iterations,
            is the one passed to each call).
        config: uses `rollout` (sampling, overlong handling) and `run.seed`.
        reward: a `Reward`.
        eos_token_id / pad_token_id: the tokenizer's.
        more_prompts: where dynamic sampling draws the next prompt batches from (the stage's
            own prompt iterator, so a checkpoint's iterator position covers them); None: no
            refills.
        spec: what the loop does (default: the setup's algorithm's `rollout(config)`).
        tokenizer: the run's (with `env.enabled`: decodes turns, encodes observations).
        environment: with `env.enabled`, `environment() -> jrlhf.envs.Environment`, a fresh
            one per episode (default: `data.task`'s `environment`).
    """

    def __init__(self, setup, config: Config, reward: Reward, *,
                 eos_token_id: int | None, pad_token_id: int = 0,
                 more_prompts: Iterator | None = None, spec: RolloutSpec | None = None,
                 tokenizer=None, environment: Callable | None = None):
        record = setup.algorithm
        if spec is None:
            if record.rollout is None:
                raise ValueError(f"a rollout loop runs an algorithm that samples; "
                                 f"{record.name!r} does not")
            spec = record.rollout(config)
        self.setup, self.reward, self.eos_token_id, self.spec = setup, reward, eos_token_id, spec
        self.group = spec.group_size
        self.keyed_tree = record.policy_key is not None  # `{"policy", "value"?}` as scored
        self.key = stream_key(config.run.seed, setup.name, "sample")
        self.rollout = r = config.rollout
        self.prompts_per_iteration = record.batch_size(config)
        rows = self.prompts_per_iteration * self.group
        if r.slots > rows:
            raise ValueError(f"rollout.slots={r.slots} is more than the {rows} rows {record.name} "
                             f"samples per iteration: at most {rows}")
        self.more_prompts = more_prompts
        self.pad_token_id = pad_token_id
        self.env = config.env if config.env.enabled else None
        if self.env is not None:
            self._episode_settings(config, tokenizer, environment)
        self.host_local = r.host_local and setup.mesh is not None
        if self.host_local:
            self.sample = self._host_local_sampler(r, eos_token_id, pad_token_id)
        else:
            self.sample = make_sampler(setup.model_cfg, r, eos_token_id, pad_token_id,
                                       num_samples=self.group, mesh=setup.mesh)
        self.sample_partial = None  # partial rollouts' sampler
        if r.max_staleness:
            self.sample_partial = self._partial_sampler(r, spec, eos_token_id, pad_token_id)
        # Episodes are scored by their environment (on the host), never on the device.
        reward_fn = reward.device_fn() if self.env is None else _no_device_reward
        self.score = jax.jit(functools.partial(
            score_rollout, policy_cfg=setup.model_cfg, value_cfg=setup.value_cfg,
            reward_fn=reward_fn,
            missing_eos_penalty=r.missing_eos_penalty if self.env is None else 0.0,
            lora_scale=setup.lora_scale, eos_token_id=eos_token_id,
            with_entropy=spec.with_entropy, with_policy=spec.score_policy,
            group_size=self.group if spec.shared_prompt else 1,
            with_reference=spec.score_reference, replay_experts=r.routing_replay == "on"))
        self.rescore = None if spec.rescore is None else spec.rescore(setup, config)

    def _episode_settings(self, config: Config, tokenizer, environment):
        """Multi-turn episodes (`env.enabled`): refuse what they cannot do (one line each) and
        build the turn samplers (`rollout`'s settings, `env.max_turn_tokens` new tokens; one
        keeping the rows split over the mesh, one for a turn whose rows do not split)."""
        r, e, setup = config.rollout, config.env, self.setup
        if environment is None:
            environment = task_environment(config)
        refused = [
            (tokenizer is None, "needs the run's tokenizer (RolloutLoop(tokenizer=...)) to "
                                "decode turns and encode observations"),
            (config.reward.functions or config.reward.model_path,
             "scores episodes by their environment's reward: leave reward.functions and "
             "reward.model_path empty"),
            (r.max_staleness, f"plays each episode within one iteration (yet): set "
                              f"rollout.max_staleness=0, not {r.max_staleness}"),
            (r.host_local, "samples turns on the mesh (yet): set rollout.host_local=false"),
            (r.slots and e.groups > 1,
             f"with rollout.slots overlaps environment calls row by row (decode slots): set "
             f"env.groups=1, not {e.groups}"),
            (r.overlong == "penalty", "rollout.overlong=penalty is not defined for episodes "
                                      "(yet): use keep or mask"),
            (records_experts(setup.model_cfg, r), "does not carry a mixture of experts' "
                                                  "routing across turns (yet): set "
                                                  "rollout.routing_replay=off"),
        ]
        for bad, why in refused:
            if bad:
                raise ValueError(f"env.enabled {why}")
        self.tokenizer, self.chat_template = tokenizer, config.data.chat_template
        self.environment = environment
        # A turn ends at EOS: the tokenizer's unless the loop was given one.
        self.turn_eos = tokenizer.eos_token_id if self.eos_token_id is None else \
            self.eos_token_id
        self.turn_samplers = turn_samplers(setup.model_cfg, r, e, self.turn_eos,
                                           self.pad_token_id, setup.mesh)

    def _play_episodes(self, state, prompts, key) -> dict:
        """`_sample_and_score` with `env.enabled`: one episode per sampled row (a group's K
        rows consecutive; `turn_sampler` samples the turns), then scored with the episode's
        attention mask; `raw` is the episode's summed environment reward (less
        `rollout.missing_eos_penalty` when a token budget cut it)."""
        setup, e, K, mesh = self.setup, self.env, self.group, self.setup.mesh
        if "max_new_tokens" in prompts and sharding.to_host(prompts["max_new_tokens"]).any():
            raise ValueError("a prompt batch's own max_new_tokens does not bound episodes: "
                             "env.max_turn_tokens and env.max_episode_tokens do")
        prompt_ids, prompt_mask, _ = self._prompt_budgets(prompts)
        ids, mask = (np.repeat(x, K, axis=0) for x in (prompt_ids, prompt_mask))
        started = time.perf_counter()
        episodes = play_episodes(
            turn_sampler(self.turn_samplers, setup.policy_params(state.params), key, mesh),
            self.environment, ids, mask, self.tokenizer, e, eos_token_id=self.turn_eos,
            pad_token_id=self.pad_token_id, chat_template=self.chat_template)
        t_gen = time.perf_counter() - started
        b, P = episodes.batch, ids.shape[1]
        heads = np.stack([b["input_ids"][:, :P], b["attention_mask"][:, :P]], 1).reshape(
            -1, K, 2 * P)
        if self.spec.shared_prompt and K > 1 and (heads != heads[:, :1]).any():
            raise ValueError("env.enabled: an environment's first observation differs between "
                             "the K episodes of one prompt, so a group's prompt columns differ; "
                             "make reset deterministic or set grpo.shared_prompt=false")
        # The response region as a `Generation` (mask: the policy's tokens) + its attention.
        response = (b["input_ids"][:, P:], b["response_mask"], b["sampler_logprobs"],
                    np.full(len(ids), self.rollout.temperature, np.float32),
                    b["attention_mask"][:, P:])
        if mesh is not None:
            response = sharding.put(response, sharding.batch_sharding(mesh))
        tokens, policy_mask, logprobs, temperature, attention = response
        gen = Generation(tokens, policy_mask, logprobs, jnp.int32(e.max_episode_tokens),
                         temperature)
        return self._score(state, b["input_ids"][:, :P], b["attention_mask"][:, :P], gen,
                           None, t_gen, episodes=episodes, attention=attention)

    def _host_local_sampler(self, r: RolloutConfig, eos_token_id, pad_token_id):
        """`sample(params, prompt_ids, prompt_mask, key, budgets)` of host-local decode
        (`rollout.host_local`): the policy is copied whole onto every device (one all-gather
        per call, before decoding) and each device decodes its own rows of the batch with its
        share of the slots, in a `shard_map` with no collective inside — none crosses hosts,
        none even crosses devices. Sequence-keyed sampling makes the tokens those of one call
        over the whole batch. Needs whole groups per device (prompts a multiple of the batch
        devices) and slots a multiple of the batch devices."""
        setup, K, mesh = self.setup, self.group, self.setup.mesh
        devices = sharding.batch_devices(mesh)
        if r.slots % devices:
            raise ValueError(f"rollout.host_local: rollout.slots={r.slots} is not a multiple "
                             f"of the {devices} devices the rows are split over")
        rows = sharding.batch_sharding(mesh)
        split = P(sharding.BATCH_AXES)
        decode = functools.partial(
            with_rollout_settings(generate_continuous, setup.model_cfg, r, eos_token_id,
                                  pad_token_id, K), slots=r.slots // devices)

        def per_device(params, ids, mask, key, budgets):
            first = jax.lax.axis_index(sharding.BATCH_AXES) * ids.shape[0] * K
            gen = decode(params, ids, mask, key, budgets=budgets, first_sequence=first)
            return (gen.tokens, gen.mask, gen.logprobs, gen.temperature, gen.steps[None],
                    gen.experts)

        decode_rows = jax.jit(jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), split, split, P(), split),
            out_specs=(split,) * 6, check_vma=False))

        def sample(params, prompt_ids, prompt_mask, key, budgets):
            if prompt_ids.shape[0] % devices:
                raise ValueError(f"rollout.host_local: {prompt_ids.shape[0]} prompts per "
                                 f"iteration do not split over the {devices} batch devices "
                                 f"(each device samples whole groups)")
            whole = sharding.put(params, sharding.replicated(mesh))
            tokens, mask, logprobs, temperature, steps, experts = decode_rows(
                whole, *sharding.put((prompt_ids, prompt_mask), rows), key,
                sharding.put(budgets, rows))
            return Generation(tokens, mask, logprobs, jnp.max(steps), temperature, experts)

        self.decode_rows = decode_rows  # for inspection (tests count its collectives)
        return sample

    def _partial_sampler(self, r: RolloutConfig, spec: RolloutSpec, eos_token_id,
                         pad_token_id):
        """`generate_partial` with the rollout settings, after refusing what partial rollouts
        cannot do (one line each)."""
        setup = self.setup
        if spec.dynamic_sampling:
            raise ValueError(f"rollout.max_staleness={r.max_staleness} with dynamic sampling: "
                             "the two do not combine (yet); turn one off")
        if not spec.tis_cap:
            raise ValueError(
                f"rollout.max_staleness={r.max_staleness}: carried tokens are drawn by older "
                f"policy versions, which the update must correct for with their behaviour "
                f"log-probs: set {spec.tis_cap_key or 'the update’s tis_cap'} (e.g. 2)")
        if records_experts(setup.model_cfg, r) and setup.state.rl.pool.experts is None:
            raise ValueError(f"rollout.routing_replay={r.routing_replay} with partial rollouts: "
                             f"the state's pool carries no recorded experts (build it with "
                             f"RolloutPool.empty(..., experts=(L_sparse, k)))")
        split = setup.mesh is not None and r.slots % sharding.batch_devices(setup.mesh) == 0
        return under_expert_mesh(functools.partial(
            with_rollout_settings(generate_partial, setup.model_cfg, r, eos_token_id,
                                  pad_token_id, self.group), slots=r.slots,
            batch_sharding=sharding.batch_sharding(setup.mesh) if split else None), setup.mesh)

    def _prompt_budgets(self, prompts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(prompt_ids, prompt_mask [G, P], budgets [G·K])` of a prompt batch, whole on every
        process (a host loads only its rows of it). A prompt batch may carry `max_new_tokens`,
        each prompt's own length budget (`[G]`) or each sampled row's (`[G·K]`), capped at
        `rollout.max_new_tokens` (0: that)."""
        N, K = self.rollout.max_new_tokens, self.group
        prompt_ids, prompt_mask = (sharding.to_host(prompts[k])
                                   for k in ("input_ids", "attention_mask"))
        G = len(prompt_ids)
        if "max_new_tokens" not in prompts:
            return prompt_ids, prompt_mask, np.full(G * K, N, np.int32)
        own = sharding.to_host(prompts["max_new_tokens"]).astype(np.int32).reshape(-1)
        if len(own) not in (G, G * K):
            raise ValueError(f"a prompt batch's max_new_tokens has {len(own)} entries: "
                             f"expected one per prompt ({G}) or per sampled row ({G * K})")
        own = np.repeat(own, K) if len(own) == G else own
        return prompt_ids, prompt_mask, np.where(own > 0, np.minimum(own, N), N).astype(np.int32)

    def _sample_and_score(self, state, prompts, key) -> dict:
        """Generate and score one prompt batch: the rollout `batch` (its `scores` raw, after
        overlong handling), the reward model's `raw` scores, response `lengths`, `truncated`
        rows, phase seconds and sequence tokens."""
        if self.env is not None:
            return self._play_episodes(state, prompts, key)
        setup = self.setup
        prompt_ids, prompt_mask, row_budgets = self._prompt_budgets(prompts)
        # The group's K samples share one prefill of their prompt (generate's num_samples).
        ids, mask = (np.repeat(x, self.group, axis=0) for x in (prompt_ids, prompt_mask))
        if setup.mesh is not None and not self.host_local:
            split = len(prompt_ids) % sharding.batch_devices(setup.mesh) == 0
            prompt_sh = (sharding.batch_sharding(setup.mesh) if split
                         else sharding.replicated(setup.mesh))
            prompt_ids, prompt_mask, budgets = sharding.put(
                (prompt_ids, prompt_mask, row_budgets), prompt_sh)
        else:
            budgets = row_budgets
        sample = functools.partial(self.sample, budgets=jnp.asarray(budgets))
        gen, t_gen = _timed(sample, setup.policy_params(state.params),
                            jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key)
        return self._score(state, ids, mask, gen, row_budgets, t_gen)

    def _score(self, state, ids, mask, gen: Generation, row_budgets, t_gen: float, *,
               episodes: EpisodeBatch | None = None, attention=None) -> dict:
        """Score generated rows (`ids, mask [B, P]`: each row's prompt, NumPy) — see
        `_sample_and_score`. `episodes`: the rows are these episodes (`_play_episodes`),
        `attention [B, N]` their response region's attention mask."""
        setup = self.setup
        N = gen.tokens.shape[1]
        if setup.mesh is not None:
            ids, mask = sharding.put((ids, mask), sharding.batch_sharding(setup.mesh))
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        tree = state.params if self.keyed_tree else {"policy": state.params}
        started = time.perf_counter()
        # Dispatched, not awaited: host reward functions run while the device scores.
        reward_params = () if episodes is not None else self.reward.device_params()
        batch, raw = self.score(tree, setup.ref_params, reward_params, ids, mask, gen,
                                response_attention=attention)
        prompts, host = None, 0.0
        if episodes is not None:  # the environment's reward, budget cuts penalised
            host = episodes.batch["scores"] - np.float32(
                self.rollout.missing_eos_penalty) * episodes.truncated
        elif self.reward.on_host:  # each process scores the rows its devices hold
            (local_ids, (lo, _)), local_mask, local_tokens, local_tmask = (
                sharding.local_rows(ids), *(sharding.local_rows(x)[0]
                                            for x in (mask, gen.tokens, gen.mask)))
            prompts, responses = self.reward.decode_texts(local_ids, local_mask, local_tokens,
                                                          local_tmask)
            host = gather_rows("host_scores", lo, self.reward.host_scores(prompts, responses))
        batch, raw = jax.block_until_ready((batch, raw))
        t_score = time.perf_counter() - started
        raw = sharding.to_host(raw) + host
        check_finite(self.reward, raw, prompts if prompts and len(prompts) == len(raw) else None)
        batch, lengths, truncated = self._handle_overlong(
            batch, jnp.asarray(raw), gen, row_budgets,
            None if episodes is None else episodes.truncated)
        return {"batch": batch, "raw": np.asarray(raw), "lengths": lengths,
                "truncated": truncated, "t_gen": t_gen, "t_score": t_score,
                "generated_tokens": int(lengths.sum()),
                "seq_tokens": ids.shape[0] * (ids.shape[1] + N),
                "env": {} if episodes is None else {**episodes.metrics(),
                                                    "time/env_wait": episodes.wait_s}}

    def _partial_rollout(self, state, prompts, key) -> tuple[dict, Any, dict]:
        """Partial rollouts (`jrlhf.partial`): one `generate_partial` call over the carried
        groups and new prompts (this batch, and more of the stage's batches, `more_prompts`,
        while the pool has room), stopping once G (a prompt batch's groups) have ended; trains
        on those, oldest first, and carries the rest. Returns `(scored, pool, metrics)`,
        `scored` as `_sample_and_score`'s, `pool` the next iteration's (placed like the
        state's)."""
        setup, r, K, G = self.setup, self.rollout, self.group, self.prompts_per_iteration
        it = int(state.rl.iteration)
        pool = jax.tree.map(sharding.to_host, state.rl.pool)
        C, width = pool.prompt_ids.shape
        stale = partial.stale_groups(pool, it, r.max_staleness)
        occupied = pool.occupied & ~stale
        batches = [prompts]
        if self.more_prompts is not None:
            more = partial.batches_to_draw(int(occupied.sum()), C, G) - 1
            batches += list(itertools.islice(self.more_prompts, more))
        new = [self._prompt_budgets(b) for b in batches]
        for ids, _, _ in new:
            if ids.shape[0] != G or ids.shape[1] > width:
                raise ValueError(f"partial rollouts: a prompt batch of {ids.shape} where the "
                                 f"carried pool holds prompt batches of ({G}, {width}) "
                                 f"(prompts per iteration x data.max_prompt_length)")
        queue = partial.build_queue(pool, occupied, new, it)
        args = (queue.prompt_ids, queue.prompt_mask, key, queue.resumed, queue.real,
                np.int32(G))
        if setup.mesh is not None:
            args = sharding.put(args, sharding.replicated(setup.mesh))
        sample = functools.partial(self.sample_partial, budgets=jnp.asarray(queue.budgets))
        (gen, finished), t_gen = _timed(sample, setup.policy_params(state.params), *args)
        tokens, mask, logprobs, finished = (sharding.to_host(x) for x in (
            gen.tokens, gen.mask, gen.logprobs, finished))
        experts = None if gen.experts is None else sharding.to_host(gen.experts)
        settled = partial.settle(queue, mask, finished, it, G)
        rows = partial.group_rows(settled.chosen, K)
        scored = self._score(
            state, np.repeat(queue.prompt_ids[settled.chosen], K, 0),
            np.repeat(queue.prompt_mask[settled.chosen], K, 0),
            Generation(tokens[rows], mask[rows], logprobs[rows], gen.steps,
                       sharding.to_host(gen.temperature)[rows],
                       None if experts is None else experts[rows]), queue.budgets[rows], t_gen)
        scored["generated_tokens"] = int(settled.drawn_now.sum())
        lengths = mask.sum(1).astype(np.int32)
        lag = (it - settled.versions[rows])[mask[rows] > 0]
        in_flight = (lengths > 0) & ~finished
        metrics = {"partial/version_lag_mean": float(lag.mean()),
                   "partial/version_lag_max": float(lag.max()),
                   "partial/dropped_groups": float(stale.sum()),
                   "partial/carried_groups": float(len(settled.carried)),
                   "partial/carried_in_progress": float(
                       in_flight[partial.group_rows(settled.carried, K)].sum()),
                   "partial/slot_utilisation": scored["generated_tokens"] / max(
                       1, r.slots * int(gen.steps))}
        fields = partial.next_pool(C, queue, settled, tokens, logprobs, lengths, finished,
                                   experts)
        placed = jax.tree.map(lambda x, old: sharding.put(x.astype(old.dtype), old.sharding),
                              state.rl.pool.replace(**fields), state.rl.pool)
        return scored, placed, metrics

    def _handle_overlong(self, batch, raw, gen, row_budgets, truncated=None):
        """`(batch with its scores, lengths, truncated)`: a row that used its whole budget
        (`row_budgets [B]`) without ending in EOS is cut; `rollout.overlong` keeps it,
        penalises it (DAPO, against its budget) or masks it out of the loss. Episodes give
        their own `truncated [B]` (cut by a token budget: `EpisodeBatch.truncated`); their
        lengths count policy tokens."""
        lengths = sharding.to_host(gen.mask).sum(1)
        if truncated is None:
            truncated = lengths == row_budgets
            if self.eos_token_id is not None:
                last = sharding.to_host(gen.tokens)[np.arange(len(lengths)),
                                                    np.maximum(lengths - 1, 0)]
                truncated &= last != self.eos_token_id
        r = self.rollout
        scores = raw
        if r.overlong == "penalty":
            scores = raw + rl.overlong_penalty(jnp.asarray(lengths), jnp.asarray(truncated),
                                               jnp.asarray(row_budgets), r.overlong_buffer,
                                               r.overlong_penalty)
        elif r.overlong == "mask":  # the row stays in its group's baseline, out of the loss
            keep = np.asarray(~truncated, np.int32)[:, None]
            if self.setup.mesh is not None:
                keep = sharding.put(keep, sharding.batch_sharding(self.setup.mesh))
            batch["response_mask"] = batch["response_mask"] * keep
        batch["scores"] = scores
        return batch, lengths, truncated

    def _refill_groups(self, state, first: dict, key) -> tuple[dict, list[dict], dict]:
        """Dynamic sampling: keep the groups of `first` whose scores are not all equal and
        refill the batch from the next prompts (at most `max_refills` rounds); slots still
        empty are filled with a dropped group masked out of the loss. Returns `(batch, rounds,
        metrics)`."""
        K = self.group
        G = first["batch"]["response_mask"].shape[0] // K
        rounds, kept, dropped = [first], [], []

        def sort(i, r):
            s = np.asarray(r["batch"]["scores"]).reshape(-1, K)
            for g in range(len(s)):
                (kept if s[g].max() > s[g].min() else dropped).append((i, g))

        sort(0, first)
        while (len(kept) < G and len(rounds) <= self.spec.max_refills and
               self.more_prompts is not None):
            try:
                prompts = next(self.more_prompts)
            except StopIteration:
                break
            rounds.append(self._sample_and_score(state, prompts,
                                                 jax.random.fold_in(key, len(rounds))))
            sort(len(rounds) - 1, rounds[-1])
        chosen = kept[:G]
        fillers = G - len(chosen)
        chosen += dropped[:1] * fillers

        def rows(i, g, name):
            x = rounds[i]["batch"][name][g * K:(g + 1) * K]
            return jnp.zeros_like(x) if name == "response_mask" and (i, g) in dropped else x

        try:
            batch = {name: jnp.concatenate([rows(i, g, name) for i, g in chosen])
                     for name in first["batch"]}
        except (TypeError, ValueError) as err:
            raise ValueError(f"dynamic sampling: the refill prompt batches must have the "
                             f"first's shapes ({err})") from None
        sampled = len(kept) + len(dropped)
        metrics = {"dynamic/dropped_groups": float(len(dropped)),
                   "dynamic/dropped_share": len(dropped) / sampled,
                   "dynamic/refills": float(len(rounds) - 1),
                   "dynamic/filler_groups": float(fillers)}
        return batch, rounds, metrics

    def __call__(self, state, prompts):
        setup = self.setup
        if getattr(state, "rl", None) is None:
            raise ValueError("a rollout loop's state carries an RLState (state.rl: its "
                             "iteration counter keys the sampler); make_setup builds one")
        key = jax.random.fold_in(self.key, int(state.rl.iteration))
        carried = {}  # partial rollouts' metrics
        if self.sample_partial is not None:
            first, pool, carried = self._partial_rollout(state, prompts, key)
            state = state.replace(rl=state.rl.replace(pool=pool))
        else:
            first = self._sample_and_score(state, prompts, key)
        batch, rounds, dynamic = first["batch"], [first], {}
        if self.spec.dynamic_sampling:
            batch, rounds, dynamic = self._refill_groups(state, first, key)
        rescored = {}
        if self.rescore is not None:
            batch, rescored["time/rescore"] = _timed(self.rescore, batch)
        (state, metrics), t_update = _timed(setup.step, state, batch)
        raw = np.concatenate([r["raw"] for r in rounds])
        lengths = np.concatenate([r["lengths"] for r in rounds])
        truncated = np.concatenate([r["truncated"] for r in rounds])
        t_gen, t_score = (sum(r[k] for r in rounds) for k in ("t_gen", "t_score"))
        seq_tokens = sum(r["seq_tokens"] for r in rounds)
        epochs = self.spec.update_epochs
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({
            "score/mean": float(raw.mean()), "score/min": float(raw.min()),
            "score/max": float(raw.max()), "response_length": float(lengths.mean()),
            "response_length_max": float(lengths.max()),
            "truncated_share": float(np.mean(truncated)),
            "time/generate": t_gen, "time/score": t_score, "time/update": t_update,
            "tokens_per_s/generate": sum(r["generated_tokens"] for r in rounds) / t_gen,
            "tokens_per_s/score": seq_tokens / t_score,
            "tokens_per_s/update": first["seq_tokens"] * epochs / t_update,
            **dynamic, **carried, **rescored,
        })
        # Episode ends (`env/*`) and the host's wait on environments, summed over dynamic
        # sampling's rounds.
        for r in rounds:
            for k, v in r["env"].items():
                metrics[k] = metrics.get(k, 0.0) + v
        return state, metrics
