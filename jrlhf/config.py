"""Typed configuration: frozen dataclasses nested by concern.

Each step factory takes only the sections it needs (`OptimConfig`, `PPOConfig`, ...), so research
code can build them directly without a full run config.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup then constant / cosine / linear decay, global-norm clipping.

    `freeze` lists regexes over parameter paths (`layers/0/attn/q_proj/kernel`, see
    `jrlhf.paths`): matching parameters get no updates and no optimizer moments.
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear
    total_steps: int = 1000  # schedule length (decay ends here)
    end_lr_ratio: float = 0.0  # final lr = learning_rate * end_lr_ratio (cosine / linear)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step (sft / reward)
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.decay must be constant|cosine|linear, got {self.decay!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (alpha / rank) · A·B on the kernels matched by `targets`.

    rank 0 disables LoRA. With LoRA on, every base parameter is frozen.
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = (r".*attn/(q_proj|v_proj)/kernel",)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes: data parallel, fully-sharded data parallel, tensor parallel."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    per_prompt: bool = True  # weight ranked pairs so each prompt counts once


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO update hyper-parameters (Ziegler et al. 2019 / Ouyang et al. 2022 defaults)."""

    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    adaptive_kl: bool = False
    target_kl: float = 6.0  # per-sequence KL target of the adaptive controller
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    ppo_epochs: int = 4
    num_minibatches: int = 1
    whiten_advantages: bool = True
    temperature: float = 1.0  # the sampling temperature; scoring divides logits by it too
    critic: str = "shared"  # shared (value head on the policy backbone) | separate

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ValueError(f"ppo.kl_estimator must be k1|k2|k3|abs, got {self.kl_estimator!r}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"ppo.critic must be shared|separate, got {self.critic!r}")
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature must be > 0, got {self.temperature}")
