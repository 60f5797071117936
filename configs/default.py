"""The embedded default (`make run`): the real SmolLM2-135M pipeline on a CPU-sized budget."""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("smollm2_135m.py")), {
        "data.max_response_length": 24,
        "data.num_sft_examples": 256,
        "data.num_ranking_prompts": 48,
        "data.num_eval_prompts": 32,
        "sft.steps": 40,
        "reward.steps": 40,
        "ppo.iterations": 24,
        "rollout.max_new_tokens": 24,
        "run.out_dir": "runs/default",
    })
