"""Pure `(state, batch) -> (state, metrics)` steps and their jitted, sharded factories."""

from jrlhf.steps.common import (apply_gradients, forward_params, jit_step, minibatch_epochs,
                                place_state, state_shardings)
from jrlhf.steps.distill import distill_step, make_distill_step
from jrlhf.steps.grpo import grpo_step, make_grpo_step, rloo_step
from jrlhf.steps.ppo import make_ppo_step, ppo_step, rollout_advantages
from jrlhf.steps.preference import (dpo_step, make_dpo_step, orpo_step, pair_logps,
                                    reference_logps)
from jrlhf.steps.reward import make_reward_step, pairs_to_groups, reward_step
from jrlhf.steps.sft import make_sft_step, sft_step

__all__ = [
    "apply_gradients", "distill_step", "dpo_step", "forward_params", "grpo_step", "jit_step",
    "make_distill_step", "make_dpo_step", "make_grpo_step", "make_ppo_step", "make_reward_step",
    "make_sft_step", "minibatch_epochs", "orpo_step", "pair_logps", "pairs_to_groups",
    "place_state", "ppo_step", "reference_logps",
    "reward_step", "rloo_step", "rollout_advantages", "sft_step", "state_shardings",
]
