"""GRPO on a verifiable task: arithmetic word problems on the embedded SmolLM2-135M-Instruct.

`jrlhf grpo --config configs/grpo_math.py`: the reward is a program (`jrlhf.tasks.arithmetic`:
1 when the response's last number is the exact answer, else 0); held-out accuracy of the
starting model and of the trained one is printed at the end (the `grpo/eval` stage). LoRA on the
upper half of the layers, as in `configs/smollm2_135m.py`.
"""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("smollm2_135m.py")), {
        "data.task": "arithmetic",
        "data.num_eval_prompts": 64,
        "grpo.group_size": 8,
        "grpo.prompts_per_iteration": 4,
        "grpo.iterations": 20,
        "grpo.learning_rate": 1e-3,
        "grpo.kl_coef": 0.01,
        "grpo.loss_aggregation": "seq-mean-token-sum-norm",
        "grpo.scale_advantages": False,
        "rollout.max_new_tokens": 48,
        "rollout.temperature": 0.6,
        "rollout.missing_eos_penalty": 0.0,
        "run.out_dir": "runs/grpo_math",
        "run.log_every": 5,
    })
