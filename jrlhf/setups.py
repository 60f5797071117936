"""One setup per algorithm: the config and the initial weights become what its step needs.

`make_setup(algorithm, config, model_cfg, params)` builds, once, the train state (scalar heads
grafted or dropped, LoRA adapters added, the frozen base quantized with `model.quantize`, freeze
labels, the optimizer with the stage's learning rate and schedule length), the frozen reference
weights and the jitted, sharded update step, all as the algorithm's record (`jrlhf.algorithms`)
says. The training stages, `jrlhf bench` and `jrlhf plan` all call it: the stages and bench with
arrays, plan with `jax.ShapeDtypeStruct`s (the same construction under `jax.eval_shape`, so
nothing is allocated). What plan sizes and bench times is the state training builds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jrlhf import algorithms, lora, optim, quant, sharding
from jrlhf.algorithms import Algorithm
from jrlhf.config import Config, derive
from jrlhf.heads import reward_model_init, with_scalar_head, without_scalar_head
from jrlhf.models.config import ModelConfig
from jrlhf.partial import pool_groups
from jrlhf.rng import stream_key, stream_seed
from jrlhf.state import RLState, RolloutPool, TrainState
from jrlhf.steps.common import state_shardings

__all__ = ["Setup", "batch_shapes", "check_expert_mesh", "default_mesh", "initial_weights",
           "make_setup", "reward_model_init", "stream_key", "stream_seed", "with_scalar_head",
           "without_scalar_head"]


def initial_weights(algorithm: str | Algorithm, config: Config, model_cfg: ModelConfig,
                    params):
    """What `make_setup(algorithm, ...)` starts from, given a policy's weights (the reward
    model grown from them for "reward", unless they already are one)."""
    return algorithms.get(algorithm).initial_weights(config, model_cfg, params)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything one algorithm's step needs, built once by `make_setup`.

    `step` is the jitted update `(state, batch) -> (state, metrics)`; `num_steps` the stage's
    loop length (optimizer steps, or rollout iterations for ppo / grpo). `state` holds arrays,
    or `ShapeDtypeStruct`s with shardings when built from abstract weights (for `jrlhf plan`).
    """

    algorithm: Algorithm
    name: str
    state: TrainState
    labels: Any
    step: Callable | None
    num_steps: int
    model_cfg: ModelConfig  # the trained model: the policy (the reward model for "reward")
    mesh: Any = None
    value_cfg: ModelConfig | None = None  # PPO's separate critic
    ref_params: Any = None  # frozen reference; None: no reference, or LoRA's own base weights
    lora_scale: float = 0.0

    def policy_params(self, params):
        """The policy's weights for sampling: LoRA merged (beside a quantized base kernel,
        which stays quantized), critic parts left out."""
        key = self.algorithm.policy_key
        return lora.merge_lora(params[key] if key else params, self.lora_scale)

    def exported(self, params) -> tuple[ModelConfig, Any]:
        """`(cfg, params)` of the trained model as it is exported: LoRA merged, a quantized
        base dequantized to float32 (and, for PPO, the value head and separate critic
        dropped)."""
        policy = quant.dequantize_params(self.policy_params(params))
        return self.algorithm.exported(self.model_cfg, policy)


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _optimizer(record: Algorithm, config: Config, tree, use_lora: bool):
    """`(freeze labels, optax transformation)` of the trained tree: the stage's learning rate
    and schedule length, the algorithm's freeze rules, LoRA training only adapters and scalar
    heads. A tree of models under keys (PPO's `policy/`, `value/`) has its rules match the
    paths inside each model, as for every other algorithm."""
    freeze, train_only = record.freeze(config), lora.LORA_TRAINABLE if use_lora else ()
    if record.policy_key:
        models = "|".join(tree)
        freeze, train_only = ([f"(?:{models})/(?:{rx})" for rx in rules]
                              for rules in (freeze, train_only))
    labels = optim.trainable_labels(tree, tuple(freeze), train_only=tuple(train_only))
    schedule = record.schedule(config)
    return labels, optim.make_optimizer(config.optim, labels,
                                        learning_rate=schedule.learning_rate,
                                        total_steps=schedule.optimizer_steps)


def default_mesh(config: Config):
    """The configured mesh, or None for 1x1x1 (plain jit on the default device). With several
    processes (a pod) 1x1x1 means data parallel over every device of every process: a host
    never trains alone."""
    if config.mesh.size == 1:
        if jax.process_count() == 1:
            return None
        return sharding.make_mesh(dataclasses.replace(config.mesh, data=jax.device_count()))
    return sharding.make_mesh(config.mesh)


def check_expert_mesh(expert: int, *model_cfgs: ModelConfig | None) -> None:
    """Refuse a `mesh.expert` (size `expert`) that does not divide a mixture of experts'
    expert count: each device of an expert group holds E / mesh.expert whole experts. Checked
    from the configs alone, before weights or data, rather than when the first step is traced
    (`jrlhf.models.expert_parallel`). Dense models (0 experts) and None pass."""
    for cfg in model_cfgs:
        E = 0 if cfg is None else cfg.num_experts
        if E and E % expert:
            raise ValueError(f"mesh.expert={expert} does not divide the model's {E} experts; "
                             f"choose a divisor of {E}")


def _quantization(config: Config, use_lora: bool) -> str:
    """How the policy's frozen base is stored: `model.quantize`, or "none" where LoRA does not
    apply (the algorithm's `lora=False`). Refused without LoRA: quantized weights cannot train."""
    if config.model.quantize != "none" and not config.lora.enabled:
        raise ValueError(f"model.quantize={config.model.quantize} stores the base weights "
                         "frozen, so only LoRA adapters can train: set lora.rank > 0")
    return config.model.quantize if use_lora else "none"


def _adapted(policy, config: Config, name: str, quantize: str):
    """The policy with LoRA adapters (float32), its base then quantized unless `quantize` is
    "none" (`jrlhf.quant`)."""
    adapted = lora.add_lora(policy, config.lora, stream_key(config.run.seed, name, "lora"))
    return adapted if quantize == "none" else quant.quantize_params(adapted, quantize)


def make_setup(algorithm: str | Algorithm, config: Config, model_cfg: ModelConfig, params, *,
               name: str | None = None, mesh=None) -> Setup:
    """Build the state, reference and jitted step of `algorithm` from its initial weights.

    Args:
        algorithm: a record of `jrlhf.algorithms` or its name (`algorithms.names()`).
        config: the run config (optimizer, LoRA, freezing, the algorithm's section, rollout);
            the record's own `settings` are applied to it.
        model_cfg, params: the initial weights (arrays, or `ShapeDtypeStruct`s for planning);
            for "reward" a reward model (see `initial_weights`).
        name: the stage name that names the RNG streams (default: the algorithm's).
        mesh: the device mesh (default: `config.mesh`; None on 1x1x1).
    """
    record = algorithms.get(algorithm)
    if record.settings:
        config = derive(config, dict(record.settings))
    name = name or record.name
    expert = config.mesh.expert if mesh is None else mesh.shape.get("expert", 1)
    check_expert_mesh(expert, model_cfg)  # before any mesh, weights or step is built
    mesh = default_mesh(config) if mesh is None else mesh
    use_lora = config.lora.enabled and record.lora
    quantize = _quantization(config, use_lora)
    key = record.policy_key
    configs = {}

    def trained(p):
        """`(tree, reference)`: the trained weights (LoRA added) and the initial policy."""
        cfg, value_cfg, tree = record.trained_tree(config, model_cfg, p)
        configs.update(model=cfg, value=value_cfg)  # static facts, the same on every trace
        policy = tree[key] if key else tree
        if use_lora:
            adapted = _adapted(policy, config, name, quantize)
            tree = dict(tree, **{key: adapted}) if key else adapted
        return tree, policy

    tree_shape = jax.eval_shape(lambda p: trained(p)[0], params)
    labels, tx = _optimizer(record, config, tree_shape, use_lora)

    def build(p):
        # The state owns its copy of the weights: steps donate their state, the caller's
        # arrays stay valid (and a separate critic gets buffers of its own).
        tree, policy = trained(p)
        tree = jax.tree.map(jnp.array, tree)
        reference = None
        if record.reference and not use_lora:  # with LoRA the base weights serve
            reference = jax.tree.map(jnp.array, policy)
        rl = None if record.rollout is None else RLState.create(
            record.kl_coef(config), rollout_pool(record, config, model_cfg))
        state = TrainState.create(tree, tx, stream_key(config.run.seed, name, "state"), rl=rl,
                                  copy=False)
        return state, reference

    if _is_abstract(params):
        state, reference = jax.eval_shape(build, params)
        state = state.replace(tx=tx)  # eval_shape rebuilt the static optimizer: keep ours
    else:
        state, reference = build(params)
    state, reference = _place(state, reference, mesh)
    setup = Setup(record, name, state, labels, None, record.schedule(config).loop_steps,
                  configs["model"], mesh, configs["value"], reference,
                  config.lora.scale if use_lora else 0.0)
    return dataclasses.replace(setup, step=record.make_step(setup, config))


def rollout_pool(record, config: Config, model_cfg: ModelConfig) -> RolloutPool | None:
    """The empty pool partial rollouts carry groups in (`rollout.max_staleness > 0`), of
    `partial.pool_groups` entries; with routing replay on a mixture of experts, room for every
    carried row's recorded experts too."""
    if not config.rollout.max_staleness:
        return None
    groups, group_size = record.batch_size(config), record.rollout(config).group_size
    experts = None
    if config.rollout.routing_replay != "off" and model_cfg.is_moe:  # rollouts.records_experts
        experts = (len(model_cfg.sparse_layers), model_cfg.experts_per_token)
    return RolloutPool.empty(pool_groups(groups, group_size, config.rollout.slots), group_size,
                             config.data.max_prompt_length, config.rollout.max_new_tokens,
                             experts=experts)


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


def batch_shapes(setup: Setup, config: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of one batch of `setup.step` for the config's sizes (for bench and plan),
    as its algorithm's record gives them, split over the mesh's batch axes."""
    batch_sh = None if setup.mesh is None else sharding.batch_sharding(setup.mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for k, (shape, dtype) in setup.algorithm.batch(setup, config).items()}
