"""GRPO on the tiny model against the reviews annotator (`jrlhf grpo --config
configs/grpo_tiny.py`; `jrlhf rloo` uses the same file with leave-one-out baselines)."""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("tiny.py")), {
        "grpo.group_size": 4,
        "grpo.prompts_per_iteration": 2,
        "grpo.iterations": 3,
        "rollout.max_new_tokens": 8,
        "grpo.learning_rate": 1e-3,
        "run.out_dir": "runs/grpo_tiny",
    })
