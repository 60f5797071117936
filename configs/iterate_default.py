"""Iterative RLHF on the embedded default (SmolLM2-135M): `jrlhf iterate --config
configs/iterate_default.py`. Two rounds; each samples from the current and the earlier policy
versions, has the annotator rank them, refreshes the reward model on all rankings so far and
runs PPO from the current policy."""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("default.py")), {
        "iterate.rounds": 2,
        "reward.steps": 30,
        "ppo.iterations": 12,
        "run.out_dir": "runs/iterate_default",
    })
