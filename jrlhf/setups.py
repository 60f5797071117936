"""One setup per algorithm: the config and the initial weights become what its step needs.

`make_setup(algorithm, config, model_cfg, params)` builds, once, the train state (scalar heads
grafted or dropped, LoRA adapters added, freeze labels, the optimizer with the stage's learning
rate and schedule length), the frozen reference weights and the jitted, sharded update step.
The training stages, `jrlhf bench` and `jrlhf plan` all call it: the stages and bench with
arrays, plan with `jax.ShapeDtypeStruct`s (the same construction under `jax.eval_shape`, so
nothing is allocated). What plan sizes and bench times is the state training builds.

RNG streams are named, not numbered: `stream_key(seed, stage_name, purpose)`.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jrlhf import lora, optim, sharding
from jrlhf.config import Config
from jrlhf.models.config import ModelConfig
from jrlhf.state import TrainState
from jrlhf.steps.common import state_shardings
from jrlhf.steps.grpo import make_grpo_step
from jrlhf.steps.ppo import make_ppo_step
from jrlhf.steps.preference import make_dpo_step
from jrlhf.steps.reward import make_reward_step
from jrlhf.steps.sft import make_sft_step

ALGORITHMS = ("sft", "reward", "dpo", "orpo", "ppo", "grpo")


def stream_seed(seed: int, *names: str) -> int:
    """A 31-bit integer seed for the stream `names` of run seed `seed` (stable across runs)."""
    for name in names:
        seed = zlib.crc32(name.encode(), seed & 0xFFFFFFFF) & 0x7FFFFFFF
    return seed


def stream_key(seed: int, *names: str) -> jax.Array:
    """The PRNG key of a named stream, e.g. `stream_key(seed, "round2/ppo", "sample")`."""
    return jax.random.key(stream_seed(seed, *names))


def with_scalar_head(cfg: ModelConfig, params, *, lm_head: bool | None = None):
    """`(cfg, params)` with a zero-initialised scalar head `score/kernel [D, 1]` (and the LM
    head kept, or dropped with `lm_head=False`)."""
    lm_head = cfg.lm_head if lm_head is None else lm_head
    params = {k: v for k, v in params.items() if lm_head or k != "lm_head"}
    params["score"] = {"kernel": jnp.zeros((cfg.hidden_size, 1), jnp.float32)}
    return dataclasses.replace(cfg, scalar_head=True, lm_head=lm_head), params


def without_scalar_head(cfg: ModelConfig, params):
    """`(cfg, params)` with the scalar head (if any) dropped."""
    return (dataclasses.replace(cfg, scalar_head=False),
            {k: v for k, v in params.items() if k != "score"})


def reward_model_init(policy_cfg: ModelConfig, params, num_layers: int = 0):
    """A reward model: the policy's first `num_layers` layers (0 = all), no LM head, and a zero
    scalar head. Works on arrays and on `ShapeDtypeStruct`s alike."""
    n = num_layers or policy_cfg.num_layers
    if n > policy_cfg.num_layers:
        raise ValueError(f"reward.num_layers={n} exceeds the policy's {policy_cfg.num_layers}")
    rm = {k: v for k, v in params.items() if k not in ("score", "layers")}
    rm["layers"] = {i: params["layers"][i] for i in range(n)}
    return with_scalar_head(dataclasses.replace(policy_cfg, num_layers=n), rm, lm_head=False)


def initial_weights(algorithm: str, config: Config, model_cfg: ModelConfig, params):
    """What `make_setup(algorithm, ...)` starts from, given a policy's weights: the reward
    model grown from them for "reward" (unless they already are one), else the weights."""
    if algorithm == "reward" and not model_cfg.scalar_head:
        return reward_model_init(model_cfg, params, config.reward.num_layers)
    return model_cfg, params


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything one algorithm's step needs, built once by `make_setup`.

    `step` is the jitted update `(state, batch) -> (state, metrics)`; `num_steps` the stage's
    loop length (optimizer steps, or rollout iterations for ppo / grpo). `state` holds arrays,
    or `ShapeDtypeStruct`s with shardings when built from abstract weights (for `jrlhf plan`).
    """

    algorithm: str
    name: str
    state: TrainState
    labels: Any
    step: Callable
    num_steps: int
    model_cfg: ModelConfig  # the trained model: the policy (the reward model for "reward")
    mesh: Any = None
    value_cfg: ModelConfig | None = None  # PPO's separate critic
    ref_params: Any = None  # frozen reference; None: no reference, or LoRA's own base weights
    lora_scale: float = 0.0
    temperature: float = 1.0  # the sampler's, for ppo / grpo

    def policy_params(self, params):
        """The policy's weights for sampling: LoRA merged, critic parts left out."""
        return lora.merge_lora(params["policy"] if self.algorithm == "ppo" else params,
                               self.lora_scale)

    def exported(self, params) -> tuple[ModelConfig, Any]:
        """`(cfg, params)` of the trained model as it is exported: LoRA merged, PPO's value
        head and separate critic dropped."""
        if self.algorithm == "ppo":
            return without_scalar_head(self.model_cfg, self.policy_params(params))
        return self.model_cfg, lora.merge_lora(params, self.lora_scale)


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _trained_tree(algorithm: str, config: Config, cfg: ModelConfig, params):
    """`(model_cfg, value_cfg, tree)`: the weights the algorithm trains, heads as it needs."""
    if algorithm == "reward":
        if not cfg.scalar_head:
            raise ValueError("the reward setup trains a reward model: start it from "
                             "setups.reward_model_init (or setups.initial_weights)")
        return cfg, None, params
    cfg, params = without_scalar_head(cfg, params)
    if algorithm != "ppo":
        return cfg, None, params
    if config.ppo.critic == "shared":
        cfg, params = with_scalar_head(cfg, params)
        return cfg, None, {"policy": params}
    value_cfg, value = with_scalar_head(cfg, params, lm_head=False)
    return cfg, value_cfg, {"policy": params, "value": value}


def _schedule(algorithm: str, config: Config) -> tuple[float, int, int]:
    """`(learning_rate, optimizer steps, loop steps)` of an algorithm's stage."""
    c = config
    if algorithm == "sft":
        return c.sft.learning_rate, c.sft.steps, c.sft.steps
    if algorithm == "reward":
        return c.reward.learning_rate, c.reward.steps, c.reward.steps
    if algorithm in ("dpo", "orpo"):
        return c.dpo.learning_rate, c.dpo.steps, c.dpo.steps
    if algorithm == "ppo":
        per_iteration = c.ppo.ppo_epochs * c.ppo.num_minibatches(c.ppo.rollout_batch_size)
        return c.ppo.learning_rate, c.ppo.iterations * per_iteration, c.ppo.iterations
    rows = c.grpo.prompts_per_iteration * c.grpo.group_size
    per_iteration = c.grpo.epochs * (rows // (c.grpo.minibatch_size or rows))
    return c.grpo.learning_rate, c.grpo.iterations * per_iteration, c.grpo.iterations


def _optimizer(algorithm: str, config: Config, tree, use_lora: bool):
    """`(freeze labels, optax transformation)` of the trained tree: the stage's learning rate
    and schedule length, the reward model's own freeze rules, LoRA training only adapters and
    scalar heads. PPO's tree holds models under `policy/` (and `value/`): its rules match the
    paths inside each model, as for every other algorithm."""
    freeze = config.reward.freeze if algorithm == "reward" else config.optim.freeze
    train_only = lora.LORA_TRAINABLE if use_lora else ()
    if algorithm == "ppo":
        freeze, train_only = ([f"(?:policy|value)/(?:{rx})" for rx in rules]
                              for rules in (freeze, train_only))
    labels = optim.trainable_labels(tree, tuple(freeze), train_only=tuple(train_only))
    learning_rate, total_steps, _ = _schedule(algorithm, config)
    return labels, optim.make_optimizer(config.optim, labels, learning_rate=learning_rate,
                                        total_steps=total_steps)


def _uses_lora(algorithm: str, config: Config) -> bool:
    return config.lora.enabled and algorithm != "reward"


def _needs_reference_copy(algorithm: str, config: Config) -> bool:
    """A frozen copy of the initial policy is kept (with LoRA the base weights serve)."""
    return algorithm in ("dpo", "ppo", "grpo") and not _uses_lora(algorithm, config)


def default_mesh(config: Config):
    """The configured mesh, or None for 1x1x1 (plain jit on the default device). With several
    processes (a pod) 1x1x1 means data parallel over every device of every process: a host
    never trains alone."""
    if config.mesh.shape == (1, 1, 1):
        if jax.process_count() == 1:
            return None
        return sharding.make_mesh(dataclasses.replace(config.mesh, data=jax.device_count()))
    return sharding.make_mesh(config.mesh)


def make_setup(algorithm: str, config: Config, model_cfg: ModelConfig, params, *,
               name: str | None = None, mesh=None) -> Setup:
    """Build the state, reference and jitted step of `algorithm` from its initial weights.

    Args:
        algorithm: one of `ALGORITHMS` (GRPO's estimator, grpo or rloo, is `grpo.estimator`).
        config: the run config (optimizer, LoRA, freezing, the algorithm's section, rollout).
        model_cfg, params: the initial weights (arrays, or `ShapeDtypeStruct`s for planning);
            for "reward" a reward model (see `initial_weights`).
        name: the stage name that names the RNG streams (default: the algorithm).
        mesh: the device mesh (default: `config.mesh`; None on 1x1x1).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    name = name or algorithm
    mesh = default_mesh(config) if mesh is None else mesh
    use_lora = _uses_lora(algorithm, config)
    seed = config.run.seed
    configs = {}

    def trained(p):
        """`(tree, reference)`: the trained weights (LoRA added) and the initial policy."""
        cfg, value_cfg, tree = _trained_tree(algorithm, config, model_cfg, p)
        configs.update(model=cfg, value=value_cfg)  # static facts, the same on every trace
        policy = tree["policy"] if algorithm == "ppo" else tree
        if use_lora:
            adapted = lora.add_lora(policy, config.lora, stream_key(seed, name, "lora"))
            tree = dict(tree, policy=adapted) if algorithm == "ppo" else adapted
        return tree, policy

    tree_shape = jax.eval_shape(lambda p: trained(p)[0], params)
    shape_cfg, value_cfg = configs["model"], configs["value"]
    labels, tx = _optimizer(algorithm, config, tree_shape, use_lora)
    kl_coef = config.ppo.kl_coef if algorithm == "ppo" else None

    def build(p):
        # The state owns its copy of the weights: steps donate their state, the caller's
        # arrays stay valid (and a separate critic gets buffers of its own).
        tree, policy = trained(p)
        tree = jax.tree.map(jnp.array, tree)
        reference = None
        if _needs_reference_copy(algorithm, config):
            reference = jax.tree.map(jnp.array, policy)
        state = TrainState.create(tree, tx, stream_key(seed, name, "state"), kl_coef, copy=False)
        return state, reference

    if _is_abstract(params):
        state, reference = jax.eval_shape(build, params)
        state = state.replace(tx=tx)  # eval_shape rebuilt the static optimizer: keep ours
    else:
        state, reference = build(params)
    state, reference = _place(state, reference, mesh)
    lora_scale = config.lora.scale if use_lora else 0.0
    step = _make_step(algorithm, config, shape_cfg, value_cfg, labels, lora_scale, state, mesh)
    loop_steps = _schedule(algorithm, config)[2]
    return Setup(algorithm, name, state, labels, step, loop_steps, shape_cfg, mesh, value_cfg,
                 reference, lora_scale, config.rollout.temperature)


def _place(state, reference, mesh):
    """State and reference on the mesh: arrays are put there, abstract leaves get shardings."""
    if mesh is None:
        return state, reference
    shardings = [state_shardings(state, mesh)]
    if reference is not None:
        shardings.append(sharding.param_shardings(reference, mesh))
    trees = [state] + ([reference] if reference is not None else [])
    placed = [jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t, sh)
              if _is_abstract(t) else sharding.put(t, sh) for t, sh in zip(trees, shardings)]
    return placed[0], (placed[1] if reference is not None else None)


def _make_step(algorithm, config: Config, cfg, value_cfg, labels, lora_scale, state, mesh):
    c = config
    common = dict(labels=labels, state=state, mesh=mesh)
    accum = c.optim.grad_accum_steps
    if algorithm == "sft":
        return make_sft_step(cfg, lora_scale=lora_scale, grad_accum_steps=accum, **common)
    if algorithm == "reward":
        return make_reward_step(cfg, per_prompt=c.reward.per_prompt, grad_accum_steps=accum,
                                **common)
    if algorithm in ("dpo", "orpo"):
        return make_dpo_step(cfg, c.dpo, orpo=algorithm == "orpo", lora_scale=lora_scale,
                             grad_accum_steps=accum, **common)
    if algorithm == "ppo":
        return make_ppo_step(cfg, c.ppo, value_cfg=value_cfg, lora_scale=lora_scale,
                             temperature=c.rollout.temperature, **common)
    return make_grpo_step(cfg, c.grpo, lora_scale=lora_scale, temperature=c.rollout.temperature,
                          **common)


def batch_shapes(setup: Setup, config: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one batch of `setup.step` for the config's sizes (for bench and plan).

    Sequences are `data.max_prompt_length + data.max_response_length` tokens (SFT, reward,
    DPO/ORPO; `data.row_length` for packed rows, with `segment_ids` and `positions`) or
    `data.max_prompt_length + rollout.max_new_tokens` (PPO, GRPO).
    """
    c = config
    P, R, N = c.data.max_prompt_length, c.data.max_response_length, c.rollout.max_new_tokens
    i32, f32 = jnp.int32, jnp.float32
    a = setup.algorithm
    packed = ("segment_ids", "positions") if c.data.pack else ()
    L = c.data.row_length
    if a == "sft":
        B = c.sft.batch_size
        shapes = {k: ((B, L), i32) for k in ("input_ids", "attention_mask", "loss_mask", *packed)}
    elif a == "reward" and packed:
        G = c.reward.batch_size
        shapes = {k: ((G, L), i32) for k in ("input_ids", "attention_mask", *packed)}
        shapes["ranks"] = ((G, 2), i32)
    elif a in ("dpo", "orpo") and packed:
        B = c.dpo.batch_size
        shapes = {k: ((B, L), i32) for k in ("input_ids", "attention_mask", "loss_mask",
                                             *packed)}
        if setup.ref_params is not None and a == "dpo":
            shapes.update({"ref_chosen_logps": ((B,), f32), "ref_rejected_logps": ((B,), f32)})
    elif a == "reward":
        G, T = c.reward.batch_size, P + R
        shapes = {"input_ids": ((G, 2, T), i32), "attention_mask": ((G, 2, T), i32),
                  "ranks": ((G, 2), i32)}
    elif a in ("dpo", "orpo"):
        B, T = c.dpo.batch_size, P + R
        shapes = {f"{side}_{k}": ((B, T), i32) for side in ("chosen", "rejected")
                  for k in ("ids", "mask", "loss_mask")}
        if setup.ref_params is not None and a == "dpo":
            shapes.update({"ref_chosen_logps": ((B,), f32), "ref_rejected_logps": ((B,), f32)})
    else:
        B = (c.ppo.rollout_batch_size if a == "ppo"
             else c.grpo.prompts_per_iteration * c.grpo.group_size)
        shapes = {"input_ids": ((B, P + N), i32), "attention_mask": ((B, P + N), i32),
                  "response_mask": ((B, N), i32), "logprobs": ((B, N), f32),
                  "ref_logprobs": ((B, N), f32), "scores": ((B,), f32),
                  "sampler_logprobs": ((B, N), f32)}
        if a == "ppo":
            shapes["values"] = ((B, N), f32)
    batch_sh = None if setup.mesh is None else sharding.batch_sharding(setup.mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for k, (shape, dtype) in shapes.items()}
