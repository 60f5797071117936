"""Algorithms as records: all that differs between two algorithms, in one place.

An `Algorithm` is a record of data and pure functions, as an optax `GradientTransformation` is
a record of `init` and `update`: its optimizer schedule, the tree it trains, its step factory,
its batch shapes and cost (what `jrlhf bench` times and `jrlhf plan` sizes), its data, its
driver (plain, fed a frozen reference, or a rollout loop), its summary keys and its CLI help.
`setups.make_setup`, the training stages and loop, bench, plan and the CLI read the record and
never compare an algorithm's name.

`register(record)` adds one (a research algorithm from its own module); `get(name)` finds one,
or raises one error listing the known names. The built-in records are at the end of this file.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jrlhf import distill
from jrlhf.config import Config
from jrlhf.heads import reward_model_init, with_scalar_head, without_scalar_head
from jrlhf.models.config import ModelConfig
from jrlhf.rollouts import RolloutLoop, RolloutSpec
from jrlhf.steps.distill import make_distill_step, teacher_rescorer
from jrlhf.steps.distill import single_pass as distill_single_pass
from jrlhf.steps.grpo import make_grpo_step, prompt_group_size, single_pass
from jrlhf.steps.ppo import make_ppo_step
from jrlhf.steps.preference import make_dpo_step, reference_logps
from jrlhf.steps.reward import make_reward_step
from jrlhf.steps.sft import make_sft_step

# Where a rollout algorithm's command takes its reward from (`Algorithm.reward_source`).
REWARD_MODEL_PATH = "reward.model_path"  # weights loaded from that config field's folder
ANNOTATOR = "annotator"  # the task's annotator as a host reward function
ANNOTATOR_OR_MODEL = "reward.model_path|annotator"  # the model if the field is set, else it

I32, F32 = jnp.int32, jnp.float32


@dataclasses.dataclass(frozen=True)
class Schedule:
    """An algorithm's stage length: its learning rate, the optimizer steps its schedule spans,
    and the loop's steps (optimizer steps, or rollout iterations)."""

    learning_rate: float
    optimizer_steps: int
    loop_steps: int


@dataclasses.dataclass(frozen=True)
class ModelPass:
    """One model's forward and backward pass over the rows of one update: what its FLOPs
    (`bench.model_flops`) and activations (`plan.activation_estimate`) are computed from.

    rows: rows through the model per update, all epochs together.
    length: tokens per row.
    live_rows: rows whose activations are held at once (a minibatch or micro-batch).
    lm_positions: positions per row through the LM head (None: every position).
    read_positions: positions per row whose final hidden state is read (None: every position;
        a reward model reads one).
    group_size / prompt_positions: K > 1 rows in a row share their first `prompt_positions`
        tokens, run once per group (`transformer.token_outputs(group_size=K)`).
    """

    cfg: ModelConfig
    rows: int
    length: int
    live_rows: int
    lm_positions: int | None = None
    read_positions: int | None = None
    group_size: int = 1
    prompt_positions: int = 0

    def tokens(self, rows: int) -> int:
        """Tokens through the backbone for `rows` of its rows (a shared prompt counted once
        per group)."""
        return rows * self.length - (rows - rows // self.group_size) * self.prompt_positions


@dataclasses.dataclass(frozen=True)
class Cost:
    """One update's model passes, the samples it trains on, and the loop structure bench
    prints beside its timing (e.g. `{"epochs": 4, "minibatches": 2}`)."""

    passes: tuple[ModelPass, ...]
    samples: int
    details: dict = dataclasses.field(default_factory=dict)


def identity_weights(config: Config, cfg: ModelConfig, params):
    return cfg, params


def policy_tree(config: Config, cfg: ModelConfig, params):
    """The policy alone, any scalar head dropped: `(cfg, None, params)`."""
    cfg, params = without_scalar_head(cfg, params)
    return cfg, None, params


def plain_driver(setup, config: Config, **_) -> Callable:
    """The setup's update as it is: `(state, batch) -> (state, metrics)`."""
    return setup.step


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Everything the outer modules know of one algorithm. Fields are data, or pure functions
    of the config (and the `Setup` under construction, see `setups.make_setup`).

    name / help: its `jrlhf <name>` command and the command's one-line help.
    schedule(config) -> Schedule.
    make_step(setup, config) -> the jitted update `(state, batch) -> (state, metrics)` for the
        setup's state, labels, mesh and model configs (`setup.step` is not yet set).
    batch(setup, config) -> `{key: (shape, dtype)}` of one update's batch (bench, plan).
    cost(setup, config) -> Cost of one update on that batch.
    data: the data file it reads (a `data.build_dataset` kind and a `Run.files` key):
        "sft", "rankings" or "prompts".
    example(encoder, source, config) -> the example function of its loader.
    batch_size(config) -> loader rows per step.
    summary_keys: the metrics of its one-line progress summary.
    driver(setup, config, *, reward, eos_token_id, pad_token_id, prompts, tokenizer) -> what
        the loop calls each step: `plain_driver`, `reference_driver`, `rollout_driver` or
        `distill_driver` (the run's `tokenizer`: to check a teacher's against).
    rollout(config) -> RolloutSpec, for an algorithm that samples (None: it does not).
    reward_source: (rollout) where its command's reward comes from.
    trained_tree(config, cfg, params) -> `(model_cfg, value_cfg, tree)`: the trained weights
        with the heads the algorithm needs; `value_cfg` is a separate critic's (or None).
    policy_key: the trained tree holds models under keys (`{"policy", "value"?}`); None: the
        tree is the policy itself.
    freeze(config) -> the freeze rules (regexes over parameter paths inside a model).
    lora: LoRA (`lora.enabled`) applies to it.
    reference: it keeps a frozen copy of the initial policy (with LoRA the base weights serve).
    kl_coef(config) -> the initial β in the train state's `RLState` (None: the algorithm's KL
        weight is a fixed coefficient of its config); an algorithm that samples gets an
        `RLState` (iteration counter, reward-normaliser moments) either way.
    initial_weights(config, cfg, params) -> `(cfg, params)` it starts from, given a policy's.
    exported(cfg, policy_params) -> `(cfg, params)` as exported (LoRA already merged).
    settings: config values the algorithm fixes, e.g. `(("grpo.estimator", "rloo"),)`.
    packs_examples: its loader packs whole examples into rows with `data.pack` (SFT; others
        pack in their example function).
    logs_tokenization: log the encoder's truncation counts after the stage.
    """

    name: str
    help: str
    schedule: Callable[[Config], Schedule]
    make_step: Callable[..., Callable]
    batch: Callable[..., dict]
    cost: Callable[..., Cost]
    data: str
    example: Callable[..., Callable]
    batch_size: Callable[[Config], int]
    summary_keys: tuple[str, ...]
    driver: Callable[..., Callable] = plain_driver
    rollout: Callable[[Config], RolloutSpec] | None = None
    reward_source: str = ""
    trained_tree: Callable = policy_tree
    policy_key: str | None = None
    freeze: Callable[[Config], tuple[str, ...]] = lambda c: tuple(c.optim.freeze)
    lora: bool = True
    reference: bool = False
    kl_coef: Callable[[Config], float | None] = lambda c: None
    initial_weights: Callable = identity_weights
    exported: Callable = lambda cfg, params: (cfg, params)
    settings: tuple[tuple[str, Any], ...] = ()
    packs_examples: bool = False
    logs_tokenization: bool = False


_REGISTRY: dict[str, Algorithm] = {}


def register(record: Algorithm) -> Algorithm:
    """Add `record` under its name (replacing one of the same name); returns it."""
    if not isinstance(record, Algorithm):
        raise TypeError(f"register takes an Algorithm record, not {type(record).__name__}")
    _REGISTRY[record.name] = record
    return record


def get(algorithm: str | Algorithm) -> Algorithm:
    """The record named `algorithm` (a record is returned as it is)."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    if algorithm not in _REGISTRY:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(names())}")
    return _REGISTRY[algorithm]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def records() -> tuple[Algorithm, ...]:
    return tuple(_REGISTRY.values())


# ----------------------------------------------------------------------------------------------
# Drivers: what the training loop calls per step.


def reference_driver(setup, config: Config, **_) -> Callable:
    """The update fed the frozen reference's log-probs of the batch (`ref_chosen_logps`,
    `ref_rejected_logps`; DPO), computed by their own jitted forward. Without a reference
    copy (LoRA: the step reads its base weights itself) the plain update."""
    if setup.ref_params is None:
        return setup.step
    ref_fn = jax.jit(functools.partial(reference_logps, setup.model_cfg))

    def with_reference(state, batch):
        return setup.step(state, dict(batch, **ref_fn(setup.ref_params, batch)))

    return with_reference


def rollout_driver(setup, config: Config, *, reward=None, eos_token_id=None, pad_token_id=0,
                   prompts=None, tokenizer=None, environment=None, **_) -> Callable:
    """A `RolloutLoop` (generate → score → update) against `reward`, refilling dynamic-sampling
    batches from `prompts` (the stage's own batches); the run's `tokenizer` plays multi-turn
    episodes (`env.enabled`) against `environment()` (default: `data.task`'s)."""
    if reward is None:
        raise ValueError(f"the {setup.name} stage needs a reward")
    return RolloutLoop(setup, config, reward, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, more_prompts=prompts, tokenizer=tokenizer,
                       environment=environment)


# ----------------------------------------------------------------------------------------------
# Batches and costs shared by several records.


def _packed(config: Config) -> tuple[str, ...]:
    return ("segment_ids", "positions") if config.data.pack else ()


def _dpo_reference_logps(setup, B: int) -> dict:
    """DPO's reference log-probs, fed by `reference_driver` when there is a reference copy."""
    if setup.ref_params is None:
        return {}
    return {"ref_chosen_logps": ((B,), F32), "ref_rejected_logps": ((B,), F32)}


def pair_batch(pairs: int, config: Config) -> dict:
    """A batch of `pairs` preference pairs (`steps.preference`): `chosen_*` and `rejected_*`
    rows of P + R tokens, or with `data.pack` one pair per row of `data.row_length` tokens."""
    L = config.data.row_length
    if config.data.pack:
        return {k: ((pairs, L), I32) for k in ("input_ids", "attention_mask", "loss_mask",
                                               *_packed(config))}
    return {f"{side}_{k}": ((pairs, L), I32) for side in ("chosen", "rejected")
            for k in ("ids", "mask", "loss_mask")}


def pair_cost(setup, config: Config, pairs: int) -> Cost:
    """One forward and backward of the trained model over `pair_batch(pairs, config)`."""
    L = config.data.row_length
    rows = pairs if config.data.pack else 2 * pairs  # packed: one pair per row
    return Cost((ModelPass(setup.model_cfg, rows, L, rows // config.optim.grad_accum_steps),),
                pairs)


def pair_example(enc, source, config: Config):
    """The loader's example function of a pair algorithm: a (chosen, rejected) pair of a
    ranking row, packed into one row with `data.pack`."""
    if config.data.pack:
        return functools.partial(enc.packed_preference_pair, length=config.data.row_length)
    return enc.preference_pair


def _rollout_batch(rows: int, config: Config, *, values: bool, logprobs: bool = True) -> dict:
    """A scored rollout batch of `rows` rows (`steps.rollout.score_rollout`, with the
    sampler's log-probs): prompts of `data.max_prompt_length` + `rollout.max_new_tokens` new
    tokens; `logprobs=False`: a single-pass update's, without the policy's log-probs."""
    P, N = config.data.max_prompt_length, config.rollout.max_new_tokens
    shapes = {"input_ids": ((rows, P + N), I32), "attention_mask": ((rows, P + N), I32),
              "response_mask": ((rows, N), I32), "temperature": ((rows,), F32),
              "ref_logprobs": ((rows, N), F32), "scores": ((rows,), F32),
              "sampler_logprobs": ((rows, N), F32)}
    return (shapes | ({"logprobs": ((rows, N), F32)} if logprobs else {})
            | ({"values": ((rows, N), F32)} if values else {}))


def _rollout_cost(setup, config: Config, rows: int, epochs: int, minibatch: int,
                  accum: int = 1, group_size: int = 1) -> Cost:
    """The policy's backbone on every position and its LM head on the response positions, a
    separate critic as a backbone, `epochs` times over `rows` rows; `group_size` K > 1: the
    policy runs each group's prompt once."""
    P, N = config.data.max_prompt_length, config.rollout.max_new_tokens
    live = (minibatch or rows) // accum
    passes = [ModelPass(setup.model_cfg, rows * epochs, P + N, live, lm_positions=N,
                        group_size=group_size, prompt_positions=P if group_size > 1 else 0)]
    if setup.value_cfg is not None:
        passes.append(ModelPass(setup.value_cfg, rows * epochs, P + N, live))
    return Cost(tuple(passes), rows,
                {"epochs": epochs, "minibatches": rows // (minibatch or rows)})


def _max_responses(source) -> int:
    return max(len(source[i]["ranks"]) for i in range(len(source)))


# ----------------------------------------------------------------------------------------------
# The built-in records.


def _sft_batch(setup, config: Config) -> dict:
    B, L = config.sft.batch_size, config.data.row_length
    return {k: ((B, L), I32) for k in ("input_ids", "attention_mask", "loss_mask",
                                       *_packed(config))}


def _sft_cost(setup, config: Config) -> Cost:
    B, L = config.sft.batch_size, config.data.row_length
    return Cost((ModelPass(setup.model_cfg, B, L, B // config.optim.grad_accum_steps),), B)


SFT = register(Algorithm(
    name="sft", help="supervised fine-tuning of model.source on data.sft_path",
    schedule=lambda c: Schedule(c.sft.learning_rate, c.sft.steps, c.sft.steps),
    make_step=lambda s, c: make_sft_step(
        s.model_cfg, lora_scale=s.lora_scale, grad_accum_steps=c.optim.grad_accum_steps,
        labels=s.labels, state=s.state, mesh=s.mesh),
    batch=_sft_batch, cost=_sft_cost,
    data="sft", example=lambda enc, src, c: enc.sft_example,
    batch_size=lambda c: c.sft.batch_size, packs_examples=True, logs_tokenization=True,
    summary_keys=("sft/loss",)))


def _reward_tree(config: Config, cfg: ModelConfig, params):
    if not cfg.scalar_head:
        raise ValueError("the reward setup trains a reward model: start it from "
                         "setups.reward_model_init (or setups.initial_weights)")
    return cfg, None, params


def _reward_initial(config: Config, cfg: ModelConfig, params):
    """The reward model grown from a policy's weights (unless they already are one)."""
    if cfg.scalar_head:
        return cfg, params
    return reward_model_init(cfg, params, config.reward.num_layers)


def _reward_batch(setup, config: Config) -> dict:
    G, L = config.reward.batch_size, config.data.row_length
    if config.data.pack:  # one group of 2 per row
        return ({k: ((G, L), I32) for k in ("input_ids", "attention_mask", *_packed(config))}
                | {"ranks": ((G, 2), I32)})
    return {"input_ids": ((G, 2, L), I32), "attention_mask": ((G, 2, L), I32),
            "ranks": ((G, 2), I32)}


def _reward_cost(setup, config: Config) -> Cost:
    """The reward model reads one position per response (`steps.reward.group_rewards`)."""
    G, L = config.reward.batch_size, config.data.row_length
    rows, read = (G, 2) if config.data.pack else (2 * G, 1)
    return Cost((ModelPass(setup.model_cfg, rows, L, rows // config.optim.grad_accum_steps,
                           read_positions=read),), G)


def _reward_example(enc, source, config: Config):
    if config.data.pack:
        return functools.partial(enc.packed_ranking_example, length=config.data.row_length,
                                 max_responses=_max_responses(source))
    return functools.partial(enc.ranking_example, max_responses=_max_responses(source))


REWARD = register(Algorithm(
    name="reward", help="reward model from data.rankings_path",
    schedule=lambda c: Schedule(c.reward.learning_rate, c.reward.steps, c.reward.steps),
    make_step=lambda s, c: make_reward_step(
        s.model_cfg, per_prompt=c.reward.per_prompt, grad_accum_steps=c.optim.grad_accum_steps,
        labels=s.labels, state=s.state, mesh=s.mesh),
    batch=_reward_batch, cost=_reward_cost,
    data="rankings", example=_reward_example, batch_size=lambda c: c.reward.batch_size,
    summary_keys=("reward/loss", "reward/accuracy"),
    trained_tree=_reward_tree, initial_weights=_reward_initial,
    freeze=lambda c: tuple(c.reward.freeze), lora=False))


def _preference(name: str, help: str, *, orpo: bool, summary_keys: tuple[str, ...]):
    return Algorithm(
        name=name, help=help,
        schedule=lambda c: Schedule(c.dpo.learning_rate, c.dpo.steps, c.dpo.steps),
        make_step=lambda s, c: make_dpo_step(
            s.model_cfg, c.dpo, orpo=orpo, lora_scale=s.lora_scale,
            grad_accum_steps=c.optim.grad_accum_steps, labels=s.labels, state=s.state,
            mesh=s.mesh),
        batch=lambda s, c: pair_batch(c.dpo.batch_size, c) | (
            {} if orpo else _dpo_reference_logps(s, c.dpo.batch_size)),
        cost=lambda s, c: pair_cost(s, c, c.dpo.batch_size),
        data="rankings", example=pair_example, batch_size=lambda c: c.dpo.batch_size,
        summary_keys=summary_keys,
        driver=plain_driver if orpo else reference_driver, reference=not orpo)


DPO = register(_preference("dpo", "DPO / IPO of model.source on data.rankings_path", orpo=False,
                           summary_keys=("dpo/loss", "dpo/accuracy", "dpo/margin")))
ORPO = register(_preference("orpo", "ORPO of model.source on data.rankings_path", orpo=True,
                            summary_keys=("orpo/loss", "orpo/accuracy", "orpo/log_odds_ratio")))


def _ppo_schedule(c: Config) -> Schedule:
    per_iteration = c.ppo.epochs * c.ppo.num_minibatches(c.ppo.prompts_per_iteration)
    return Schedule(c.ppo.learning_rate, c.ppo.iterations * per_iteration, c.ppo.iterations)


def _ppo_tree(config: Config, cfg: ModelConfig, params):
    """`{"policy"}` with a value head on the policy (`ppo.critic="shared"`), else `{"policy",
    "value"}`: a separate critic, a copy of the backbone with a scalar head."""
    cfg, params = without_scalar_head(cfg, params)
    if config.ppo.critic == "shared":
        cfg, params = with_scalar_head(cfg, params)
        return cfg, None, {"policy": params}
    value_cfg, value = with_scalar_head(cfg, params, lm_head=False)
    return cfg, value_cfg, {"policy": params, "value": value}


PPO = register(Algorithm(
    name="ppo", help="PPO of model.source against reward.model_path",
    schedule=_ppo_schedule,
    make_step=lambda s, c: make_ppo_step(
        s.model_cfg, c.ppo, value_cfg=s.value_cfg, lora_scale=s.lora_scale, labels=s.labels,
        state=s.state, mesh=s.mesh),
    batch=lambda s, c: _rollout_batch(c.ppo.prompts_per_iteration, c, values=True),
    cost=lambda s, c: _rollout_cost(s, c, c.ppo.prompts_per_iteration, c.ppo.epochs,
                                    c.ppo.minibatch_size),
    data="prompts", example=lambda enc, src, c: enc.prompt_example,
    batch_size=lambda c: c.ppo.prompts_per_iteration,
    summary_keys=("score/mean", "ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/response_length",
                  "ppo/clipfrac", "value/error"),
    driver=rollout_driver, reward_source=REWARD_MODEL_PATH,
    rollout=lambda c: RolloutSpec(update_epochs=c.ppo.epochs, tis_cap=c.ppo.tis_cap,
                                  tis_cap_key="ppo.tis_cap"),
    trained_tree=_ppo_tree, policy_key="policy", reference=True,
    kl_coef=lambda c: c.ppo.kl_coef,
    exported=lambda cfg, params: without_scalar_head(cfg, params)))


def _grpo_schedule(c: Config) -> Schedule:
    rows = c.grpo.prompts_per_iteration * c.grpo.group_size
    per_iteration = c.grpo.epochs * (rows // (c.grpo.minibatch_size or rows))
    return Schedule(c.grpo.learning_rate, c.grpo.iterations * per_iteration, c.grpo.iterations)


def _grpo_rows(c: Config) -> int:
    return c.grpo.prompts_per_iteration * c.grpo.group_size


def _grpo_single_pass(c: Config) -> bool:
    """The update takes its pre-update log-probs from its own forward (`single_pass`)."""
    return single_pass(c.grpo, _grpo_rows(c))


def _group_relative(name: str, help: str, settings=()) -> Algorithm:
    """GRPO and its estimators (`grpo.estimator`: grpo | rloo | reinforce++): K samples per
    prompt, advantages relative to the group, no critic."""
    return Algorithm(
        name=name, help=help, schedule=_grpo_schedule,
        make_step=lambda s, c: make_grpo_step(
            s.model_cfg, c.grpo, lora_scale=s.lora_scale, labels=s.labels, state=s.state,
            mesh=s.mesh),
        batch=lambda s, c: _rollout_batch(_grpo_rows(c), c, values=False,
                                          logprobs=not _grpo_single_pass(c)),
        cost=lambda s, c: _rollout_cost(s, c, _grpo_rows(c), c.grpo.epochs,
                                        c.grpo.minibatch_size, c.grpo.grad_accum_steps,
                                        prompt_group_size(c.grpo, _grpo_rows(c))),
        data="prompts", example=lambda enc, src, c: enc.prompt_example,
        batch_size=lambda c: c.grpo.prompts_per_iteration,
        summary_keys=("score/mean", *(f"{e}/{k}" for e in ("grpo", "rloo", "reinforce++")
                                      for k in ("mean_score", "kl", "clipfrac"))),
        driver=rollout_driver, reward_source=ANNOTATOR_OR_MODEL,
        rollout=lambda c: RolloutSpec(
            group_size=c.grpo.group_size, shared_prompt=c.grpo.shared_prompt,
            dynamic_sampling=c.grpo.dynamic_sampling,
            max_refills=c.grpo.max_refills, update_epochs=c.grpo.epochs,
            # A single-pass update's own forward gives the log-probs and the entropy metric.
            score_policy=not _grpo_single_pass(c), with_entropy=not _grpo_single_pass(c),
            tis_cap=c.grpo.tis_cap, tis_cap_key="grpo.tis_cap"),
        reference=True, settings=settings)


GRPO = register(_group_relative(
    "grpo", "GRPO (grpo.estimator) against reward.model_path (or the task's annotator)"))
RLOO = register(_group_relative(
    "rloo", "RLOO against reward.model_path (or the task's annotator)",
    settings=(("grpo.estimator", "rloo"),)))


def _distill_rows(c: Config) -> int:
    return c.distill.prompts_per_iteration * c.distill.group_size


def _distill_single_pass(c: Config) -> bool:
    """The update takes its pre-update log-probs from its own forward (`single_pass`)."""
    return distill_single_pass(c.distill, _distill_rows(c))


def _distill_schedule(c: Config) -> Schedule:
    rows = _distill_rows(c)
    per_iteration = c.distill.epochs * (rows // (c.distill.minibatch_size or rows))
    return Schedule(c.distill.learning_rate, c.distill.iterations * per_iteration,
                    c.distill.iterations)


def _distill_batch(setup, c: Config) -> dict:
    """The rollout batch without the reference's log-probs, with the teacher's
    (`steps.distill.teacher_rescorer`): `teacher_logprobs [B, N]`, and `teacher_hidden
    [B, N, D_t]` with the JSD term (D_t read from the teacher's metadata)."""
    rows, N = _distill_rows(c), c.rollout.max_new_tokens
    shapes = _rollout_batch(rows, c, values=False, logprobs=not _distill_single_pass(c))
    shapes = {k: v for k, v in shapes.items() if k != "ref_logprobs"}
    shapes["teacher_logprobs"] = ((rows, N), F32)
    if c.distill.jsd_coef:
        shapes["teacher_hidden"] = ((rows, N, distill.teacher_width(c)), F32)
    return shapes


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _distill_step(s, c: Config):
    """The update, with the teacher's LM head bound for the JSD term (abstract for `jrlhf
    plan`, whose state is)."""
    return make_distill_step(
        s.model_cfg, c.distill, labels=s.labels, lora_scale=s.lora_scale,
        teacher_head=distill.teacher_head(c, abstract=_is_abstract(s.state.params)),
        state=s.state, mesh=s.mesh)


def distill_driver(setup, config: Config, *, tokenizer=None, **inputs) -> Callable:
    """`rollout_driver`, after refusing a teacher (`distill.teacher_source`) whose vocabulary
    is not the student's: its size, and every token's text when the run's `tokenizer` is
    given (`distill.check_vocabularies`: one line)."""
    teacher_cfg, _ = distill.load_teacher(config)
    distill.check_vocabularies(setup.model_cfg.vocab_size, teacher_cfg.vocab_size, tokenizer,
                               None if tokenizer is None else distill.teacher_tokenizer(config))
    return rollout_driver(setup, config, **inputs)


DISTILL = register(Algorithm(
    name="distill",
    help="on-policy distillation of distill.teacher_source into model.source (reverse-KL "
         "advantages on the student's samples)",
    schedule=_distill_schedule, make_step=_distill_step, batch=_distill_batch,
    cost=lambda s, c: _rollout_cost(s, c, _distill_rows(c), c.distill.epochs,
                                    c.distill.minibatch_size, c.distill.grad_accum_steps),
    data="prompts", example=lambda enc, src, c: enc.prompt_example,
    batch_size=lambda c: c.distill.prompts_per_iteration,
    summary_keys=("score/mean", "distill/reverse_kl", "distill/advantage_mean", "distill/jsd",
                  "distill/clipfrac", "response_length"),
    driver=distill_driver, reward_source=ANNOTATOR_OR_MODEL,
    rollout=lambda c: RolloutSpec(
        group_size=c.distill.group_size, update_epochs=c.distill.epochs,
        # A single-pass update's own forward gives the student's log-probs; no reference.
        score_policy=not _distill_single_pass(c), score_reference=False,
        tis_cap=c.distill.tis_cap, tis_cap_key="distill.tis_cap", rescore=teacher_rescorer)))
