"""GRPO on multi-turn episodes with a tool: the calculator task on the embedded
SmolLM2-135M-Instruct (derived from `configs/grpo_math.py`).

Each sampled row is an episode (`env.enabled`, `jrlhf.envs`): the policy may write
`<calc>37 * 48 + 12</calc>`, the environment (`jrlhf.tasks.calculator`) answers
`<result>1788</result>` as a tool turn of the chat template, and a turn without a call is the
final answer (reward 1 when its last number is right). The policy first learns the call format
from synthetic tool traces (the task's `sft.jsonl`, two chat rows per trace), then GRPO runs
from that policy. Two commands, one run folder:

    jrlhf sft --config configs/grpo_tools.py
    jrlhf grpo --config configs/grpo_tools.py --set model.source=runs/grpo_tools/sft/export

The first exports its policy (LoRA merged) to `runs/grpo_tools/sft/export`; the second starts
from it (its reference too). The `grpo/eval` stage at the end plays one episode per held-out
problem with the starting policy and with the trained one (`rollouts.play_batched`): its
scores are the tool task's accuracy before and after GRPO.
"""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("grpo_math.py")), {
        "data.task": "calculator",
        # The question with its instruction, and the trace's second row (question, call and
        # tool result), fit the prompt; a call or an answer fits the response.
        "data.max_prompt_length": 128,
        "data.max_response_length": 32,
        "data.num_sft_examples": 256,
        # A short SFT: the policy half-learns the call format (held-out 32.8%), so GRPO has
        # something to learn (95.3% after 8 iterations). 60 steps reach 100% by SFT alone, and
        # then every group scores all 1s: no GRPO signal.
        "sft.steps": 8,
        "sft.batch_size": 8,
        "sft.learning_rate": 3e-4,
        "env.enabled": True,
        "env.max_turn_tokens": 32,
        "env.max_episode_tokens": 96,
        "env.max_turns": 3,
        "env.groups": 2,
        "grpo.iterations": 8,
        # The episode's response region: what `jrlhf plan` / `bench` size the rollout with.
        "rollout.max_new_tokens": 96,
        "run.out_dir": "runs/grpo_tools",
    })
