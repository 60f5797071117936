"""Host loops: they only orchestrate the jitted pieces (sample, score, update), log and save.

`run_stage` is the one loop every stage uses: step, check for NaN/inf, log (metrics.jsonl,
TensorBoard, a one-line summary), save periodically with the data iterator's state, resume
exactly from the latest checkpoint, and on SIGTERM (preemption) save and stop cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jrlhf import lora, optim, rl, sharding
from jrlhf.checkpoint import Checkpointer
from jrlhf.config import Config, save_config
from jrlhf.models.config import ModelConfig
from jrlhf.report import MetricsWriter, check_finite, one_line
from jrlhf.sampling import generate
from jrlhf.state import TrainState
from jrlhf.steps.common import place_state
from jrlhf.steps.ppo import make_ppo_step, score_rollout
from jrlhf.steps.reward import make_reward_step
from jrlhf.steps.sft import make_sft_step


def progress(iterable, total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm progress bar on stderr (the plain iterable when disabled)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                initial=initial)


def make_mesh_or_none(config: Config):
    """The configured mesh, or None for a 1x1x1 mesh (plain jit on the default device)."""
    if config.mesh.shape == (1, 1, 1):
        return None
    return sharding.make_mesh(config.mesh)


def place_on_mesh(config: Config, state, ref_params=None):
    """`(state, ref_params, mesh)` placed on the configured mesh (unchanged without one)."""
    mesh = make_mesh_or_none(config)
    if mesh is not None:
        state = place_state(state, mesh)
        if ref_params is not None:
            ref_params = sharding.put(ref_params, sharding.param_shardings(ref_params, mesh))
    return state, ref_params, mesh


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StageResult(NamedTuple):
    state: TrainState
    history: list[dict]
    preempted: bool


def run_stage(name: str, config: Config, state: TrainState, step_fn: Callable, batches: Iterator,
              num_steps: int, *, out_dir: str | Path | None = None, resume: bool = False,
              loop_state: Callable[[], dict] | None = None,
              set_loop_state: Callable[[dict], None] | None = None,
              log: Callable[[str], None] | None = print, train: bool = True) -> StageResult:
    """Run `num_steps` of `state, metrics = step_fn(state, next(batches))` with checkpoints.

    Args:
        name: stage name (metrics rows, checkpoint folder `out_dir/name/checkpoints`).
        config: uses `run.save_every`, `run.keep_checkpoints`, `run.log_every`, `run.progress`.
        state: the initial state (also the layout restored checkpoints take).
        batches: iterator; if it has `get_state`/`set_state` (grain) its position is saved.
        out_dir: where metrics.jsonl, TensorBoard files and checkpoints go (None: nothing saved).
        resume: continue from the latest checkpoint of this stage if there is one.
        loop_state / set_loop_state: extra JSON-able loop state to save and restore.
        train: False restores the latest checkpoint (resume) and returns without stepping.
    """
    run = config.run
    history: list[dict] = []
    start = 0
    ckpt = writer = None
    if out_dir is not None:
        stage_dir = Path(out_dir) / name
        ckpt = Checkpointer(stage_dir / "checkpoints", keep=run.keep_checkpoints)
        writer = MetricsWriter(out_dir, name)
        if not resume and ckpt.latest_step() is not None:
            ckpt.close()
            raise FileExistsError(
                f"{ckpt.directory} already holds checkpoints (latest step {ckpt.latest_step()}): "
                "pass --resume to continue that run, or set run.out_dir to a new folder")
        save_config(config, stage_dir / "config.json")
        if resume and ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            start = int(meta["stage_step"])
            if "data" in meta and hasattr(batches, "set_state"):
                batches.set_state(meta["data"])
            if set_loop_state and "loop" in meta:
                set_loop_state(meta["loop"])
            writer.truncate_after(start)
            if log:
                log(f"[{name}] resumed from step {start} ({ckpt.directory})")

    def save(step: int):
        if ckpt is None:
            return
        meta = {"stage_step": step, "stage": name}
        if hasattr(batches, "get_state"):
            meta["data"] = batches.get_state()
        if loop_state:
            meta["loop"] = loop_state()
        ckpt.save(step, state, meta)

    preempted = False
    try:
        with _Preemption() as preemption:
            end = num_steps if train else start
            bar = progress(range(start, end), num_steps, name, run.progress and train,
                           initial=start)
            for step in bar:
                state, metrics = step_fn(state, next(batches))
                metrics = {k: float(v) for k, v in metrics.items()}
                check_finite(step + 1, metrics, name)
                history.append(metrics)
                if writer:
                    writer.write(step + 1, metrics)
                if log and run.log_every and (step + 1) % run.log_every == 0:
                    if hasattr(bar, "write"):
                        bar.write(one_line(name, step + 1, metrics))
                    else:
                        log(one_line(name, step + 1, metrics))
                done = step + 1 == num_steps
                if done or (run.save_every and (step + 1) % run.save_every == 0) or \
                        preemption.requested:
                    save(step + 1)
                if preemption.requested and not done:
                    preempted = True
                    if log:
                        log(f"[{name}] SIGTERM: saved step {step + 1}, stopping")
                    break
    finally:
        if ckpt is not None:
            ckpt.close()
        if writer is not None:
            writer.close()
    return StageResult(state, history, preempted)


# ----------------------------------------------------------------------------------------------
# SFT and reward-model stages.


def make_stage_state(config: Config, params, steps: int, learning_rate: float, *,
                     freeze: tuple[str, ...] = (), use_lora: bool = False, rng_offset: int = 0):
    """TrainState + freeze labels for a stage (LoRA adapters added when `use_lora`).

    The state gets its own copy of `params`: steps donate their state, and the caller's arrays
    stay valid.
    """
    rng = jax.random.fold_in(jax.random.key(config.run.seed), rng_offset)
    params = jax.tree.map(jnp.array, params)
    if use_lora:
        params = lora.add_lora(params, config.lora, jax.random.fold_in(rng, 1))
        labels = optim.trainable_labels(params, freeze, train_only=lora.LORA_TRAINABLE)
    else:
        labels = optim.trainable_labels(params, freeze)
    optim_cfg = dataclasses.replace(config.optim, learning_rate=learning_rate, total_steps=steps)
    return TrainState.create(params, optim.make_optimizer(optim_cfg, labels), rng), labels


def train_sft(config: Config, model_cfg: ModelConfig, params, batches: Iterator, *,
              out_dir=None, resume=False, log=print, train=True) -> StageResult:
    """Supervised fine-tuning (LoRA when `config.lora.rank > 0`, `config.optim.freeze` frozen)."""
    cfg = config.sft
    state, labels = make_stage_state(config, params, cfg.steps, cfg.learning_rate,
                                     freeze=config.optim.freeze, use_lora=config.lora.enabled)
    mesh = make_mesh_or_none(config)
    if mesh is not None:
        state = place_state(state, mesh)
    step = make_sft_step(model_cfg, labels=labels, lora_scale=config.lora.scale,
                         grad_accum_steps=config.optim.grad_accum_steps, state=state, mesh=mesh)
    return run_stage("sft", config, state, step, batches, cfg.steps, out_dir=out_dir,
                     resume=resume, log=log, train=train)


def train_reward(config: Config, rm_cfg: ModelConfig, params, batches: Iterator, *,
                 out_dir=None, resume=False, log=print, train=True) -> StageResult:
    """Reward model from rankings (Bradley-Terry over all ranked pairs)."""
    cfg = config.reward
    state, labels = make_stage_state(config, params, cfg.steps, cfg.learning_rate,
                                     freeze=cfg.freeze, rng_offset=1)
    mesh = make_mesh_or_none(config)
    if mesh is not None:
        state = place_state(state, mesh)
    step = make_reward_step(rm_cfg, labels=labels, per_prompt=cfg.per_prompt,
                            grad_accum_steps=config.optim.grad_accum_steps, state=state,
                            mesh=mesh)
    return run_stage("reward", config, state, step, batches, cfg.steps, out_dir=out_dir,
                     resume=resume, log=log, train=train)


def train_preference(config: Config, model_cfg: ModelConfig, params, batches: Iterator, *,
                     orpo: bool = False, out_dir=None, resume=False, log=print,
                     train=True) -> StageResult:
    """DPO / IPO (reference: a frozen copy of `params`, or with LoRA the policy's own base) or
    ORPO (no reference) on (chosen, rejected) pair batches."""
    from jrlhf.steps.preference import make_dpo_step, reference_logps

    cfg = config.dpo
    name = "orpo" if orpo else "dpo"
    state, labels = make_stage_state(config, params, cfg.steps, cfg.learning_rate,
                                     freeze=config.optim.freeze, use_lora=config.lora.enabled,
                                     rng_offset=3)
    mesh = make_mesh_or_none(config)
    if mesh is not None:
        state = place_state(state, mesh)
    step = make_dpo_step(model_cfg, cfg, orpo=orpo, labels=labels, lora_scale=config.lora.scale,
                         grad_accum_steps=config.optim.grad_accum_steps, state=state, mesh=mesh)
    step_fn = step
    if not orpo and not config.lora.enabled:
        ref_params = jax.tree.map(jnp.array, params)  # frozen copy of the initial policy
        ref_fn = jax.jit(functools.partial(reference_logps, model_cfg))

        def step_fn(state, batch):
            return step(state, dict(batch, **ref_fn(ref_params, batch)))

    return run_stage(name, config, state, step_fn, batches, cfg.steps, out_dir=out_dir,
                     resume=resume, log=log, train=train)


# ----------------------------------------------------------------------------------------------
# PPO.


class PPOResult(NamedTuple):
    state: TrainState
    policy_cfg: ModelConfig
    value_cfg: ModelConfig | None
    ref_params: Any
    history: list[dict[str, float]]
    preempted: bool = False


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
    # The state owns a copy (steps donate it); the caller's params stay valid.
    params = {k: v for k, v in jax.tree.map(jnp.array, params).items() if k != "score"}
    if cfg.critic == "shared":
        policy_cfg = dataclasses.replace(policy_cfg, scalar_head=True)
        params = dict(params, score={"kernel": jnp.zeros((policy_cfg.hidden_size, 1))})
        tree = {"policy": params}
    else:
        policy_cfg = dataclasses.replace(policy_cfg, scalar_head=False)
        value_cfg = dataclasses.replace(policy_cfg, lm_head=False, scalar_head=True)
        copy = jax.tree.map(jnp.array, params)  # the critic starts from the policy's backbone
        value = {k: v for k, v in copy.items() if k != "lm_head"}
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


def train_ppo(config: Config, *, policy: tuple[ModelConfig, Any], reward_fn: Callable,
              reward_params: Any = None, prompt_batches: Iterator[dict],
              eos_token_id: int | None, pad_token_id: int = 0, out_dir=None, resume=False,
              log=print, train=True) -> PPOResult:
    """PPO: prompts → generate → score (policy, reference, reward) → `ppo_step`, repeated.

    Args:
        config: full config; uses `ppo`, `optim`, `lora`, `mesh`, `run`.
        policy: `(ModelConfig, params)` of the initial policy (also the reference).
        reward_fn: `reward_fn(reward_params, prompt_ids, prompt_mask, response_ids,
            response_mask) -> scores [B]`, jittable (`steps.ppo.reward_model_fn` for an RM).
        prompt_batches: iterator of `{"input_ids", "attention_mask"}` left-padded prompt
            batches of `ppo.rollout_batch_size` rows (a grain iterator is checkpointed too).
        out_dir / resume: as for `run_stage` (stage name "ppo").

    Returns:
        `PPOResult(state, policy_cfg, value_cfg, ref_params, history, preempted)`.
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
    state, ref_params, mesh = place_on_mesh(config, state, ref_params)
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

    loop = {"moments": rl.RunningMoments.create(), "iteration": 0}

    def iteration(state, prompts):
        ids, mask = prompts["input_ids"], prompts["attention_mask"]
        if mesh is not None:
            ids, mask = sharding.put((ids, mask), sharding.batch_sharding(mesh))
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        key = jax.random.fold_in(jax.random.fold_in(rng, 3), loop["iteration"])
        policy_now = lora.merge_lora(state.params["policy"], lora_scale)
        gen, t_gen = _timed(sample, policy_now, ids, mask, key)
        (batch, raw_scores), t_score = _timed(
            scorer, state.params, ref_params, reward_params, ids, mask, gen.tokens, gen.mask)
        scores = raw_scores
        if cfg.normalize_rewards:
            loop["moments"], scores = normalize(loop["moments"], raw_scores)
        elif cfg.reward_clip:
            scores = jnp.clip(raw_scores, -cfg.reward_clip, cfg.reward_clip)
        batch["scores"] = scores
        (state, metrics), t_update = _timed(ppo_step, state, batch)
        loop["iteration"] += 1
        raw = np.asarray(raw_scores)
        B, P = ids.shape
        new_tokens = float(np.asarray(gen.mask).sum())
        seq_tokens = B * (P + gen.tokens.shape[1])
        metrics = dict(metrics)
        metrics.update({
            "score/mean": float(raw.mean()), "score/min": float(raw.min()),
            "score/max": float(raw.max()),
            "time/generate": t_gen, "time/score": t_score, "time/update": t_update,
            "tokens_per_s/generate": new_tokens / t_gen,
            "tokens_per_s/score": seq_tokens / t_score,
            "tokens_per_s/update": seq_tokens * cfg.ppo_epochs / t_update,
        })
        return state, metrics

    def get_loop_state():
        m = loop["moments"]
        return {"iteration": loop["iteration"], "moments": [float(m.count), float(m.mean),
                                                            float(m.var)]}

    def set_loop_state(saved):
        loop["iteration"] = saved["iteration"]
        c, mu, var = (jnp.asarray(x, jnp.float32) for x in saved["moments"])
        loop["moments"] = rl.RunningMoments(count=c, mean=mu, var=var)

    result = run_stage("ppo", config, state, iteration, prompt_batches, cfg.iterations,
                       out_dir=out_dir, resume=resume, loop_state=get_loop_state,
                       set_loop_state=set_loop_state, log=log, train=train)
    return PPOResult(result.state, policy_cfg, value_cfg, ref_params, result.history,
                     result.preempted)


# ----------------------------------------------------------------------------------------------
# GRPO / RLOO.


def train_grpo(config: Config, *, policy: tuple[ModelConfig, Any], prompt_batches: Iterator[dict],
               eos_token_id: int | None, pad_token_id: int = 0, reward_fn: Callable | None = None,
               reward_params: Any = None, text_reward: Callable | None = None, decode=None,
               out_dir=None, resume=False, log=print, train=True) -> StageResult:
    """GRPO / RLOO: each prompt sampled `grpo.group_size` times → scores → `grpo_step`.

    The reward is either a jittable `reward_fn` (as for `train_ppo`) or a host function
    `text_reward(list[str]) -> scores` on the decoded responses (`decode(tokens, mask)`), e.g.
    a programmatic checker. The reference is a frozen copy of the initial policy, or with LoRA
    its own base weights.
    """
    from jrlhf.steps.grpo import make_grpo_step

    cfg = config.grpo
    K = cfg.group_size
    if (reward_fn is None) == (text_reward is None):
        raise ValueError("train_grpo needs exactly one of reward_fn or text_reward")
    rng = jax.random.key(config.run.seed)
    policy_cfg, params = policy
    policy_cfg = dataclasses.replace(policy_cfg, scalar_head=False)
    params = {k: v for k, v in params.items() if k != "score"}
    size = cfg.minibatch_size or cfg.prompts_per_iteration * K
    steps = cfg.iterations * cfg.epochs * (cfg.prompts_per_iteration * K // size)
    state, labels = make_stage_state(config, params, steps, cfg.learning_rate,
                                     freeze=config.optim.freeze, use_lora=config.lora.enabled,
                                     rng_offset=4)
    ref_params = None if config.lora.enabled else jax.tree.map(jnp.array, params)
    state, ref_params, mesh = place_on_mesh(config, state, ref_params)
    lora_scale = config.lora.scale
    step = make_grpo_step(cfg, policy_cfg, labels=labels, lora_scale=lora_scale, state=state,
                          mesh=mesh)
    N = cfg.max_new_tokens
    sample = functools.partial(generate, policy_cfg, max_new_tokens=N,
                               temperature=cfg.temperature, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id)

    @jax.jit
    def score(params, ref, reward_params, ids, mask, tokens, tmask):
        from jrlhf.models import transformer as tfm

        full = jnp.concatenate([ids, tokens], 1)
        fmask = jnp.concatenate([mask, tmask], 1)
        policy_params = lora.merge_lora(params, lora_scale)
        ref = lora.base_params(params) if ref is None else ref
        m = tmask.astype(jnp.float32)

        def logps(p):
            logits = tfm.forward(policy_cfg, p, full, fmask, last=N) / cfg.temperature
            return rl.logprobs_from_logits(logits, tokens) * m

        scores = (reward_fn(reward_params, ids, mask, tokens, tmask) if reward_fn is not None
                  else jnp.zeros(ids.shape[0]))
        return {"input_ids": full, "attention_mask": fmask, "response_mask": tmask,
                "logprobs": logps(policy_params), "ref_logprobs": logps(ref)}, scores

    loop = {"iteration": 0}

    def iteration(state, prompts):
        ids = np.repeat(np.asarray(prompts["input_ids"]), K, axis=0)
        mask = np.repeat(np.asarray(prompts["attention_mask"]), K, axis=0)
        if mesh is not None:
            ids, mask = sharding.put((ids, mask), sharding.batch_sharding(mesh))
        key = jax.random.fold_in(jax.random.fold_in(rng, 5), loop["iteration"])
        gen, t_gen = _timed(sample, lora.merge_lora(state.params, lora_scale), ids, mask, key)
        (batch, scores), t_score = _timed(score, state.params, ref_params, reward_params, ids,
                                          mask, gen.tokens, gen.mask)
        if text_reward is not None:
            scores = jnp.asarray(text_reward(decode(gen.tokens, gen.mask)), jnp.float32)
        batch["scores"] = scores
        (state, metrics), t_update = _timed(step, state, batch)
        loop["iteration"] += 1
        raw = np.asarray(scores)
        metrics = dict(metrics)
        metrics.update({"score/mean": float(raw.mean()), "score/min": float(raw.min()),
                        "score/max": float(raw.max()),
                        "response_length": float(np.asarray(gen.mask).sum(1).mean()),
                        "time/generate": t_gen, "time/score": t_score, "time/update": t_update})
        return state, metrics

    return run_stage(cfg.estimator, config, state, iteration, prompt_batches, cfg.iterations,
                     out_dir=out_dir, resume=resume, log=log, train=train,
                     loop_state=lambda: dict(loop), set_loop_state=loop.update)
