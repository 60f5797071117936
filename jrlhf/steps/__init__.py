"""Pure `(state, batch) -> (state, metrics)` steps and their jitted, sharded factories."""

from jrlhf.steps.common import (apply_gradients, jit_step, minibatch_epochs, place_state,
                                state_shardings)
from jrlhf.steps.grpo import grpo_step, make_grpo_step, rloo_step
from jrlhf.steps.preference import dpo_step, make_dpo_step, orpo_step, reference_logps
from jrlhf.steps.ppo import make_ppo_step, ppo_step, rollout_advantages
from jrlhf.steps.reward import make_reward_step, pairs_to_groups, reward_step
from jrlhf.steps.sft import make_sft_step, sft_step

__all__ = [
    "apply_gradients", "minibatch_epochs", "dpo_step", "grpo_step", "make_dpo_step", "make_grpo_step", "orpo_step", "reference_logps",
    "rloo_step", "jit_step", "make_ppo_step", "make_reward_step", "make_sft_step", "pairs_to_groups",
    "place_state", "ppo_step", "reward_step", "rollout_advantages", "sft_step",
    "state_shardings",
]
