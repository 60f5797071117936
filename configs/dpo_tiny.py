"""DPO on the tiny model (`jrlhf dpo --config configs/dpo_tiny.py --set data.rankings_path=F`);
`jrlhf orpo` reads the same file. Use configs/smollm2_135m.py-derived settings for the real model."""

from pathlib import Path

from jrlhf.config import derive, load_config


def get_config():
    return derive(load_config(Path(__file__).with_name("tiny.py")), {
        "dpo.beta": 0.1,
        "dpo.steps": 10,
        "dpo.batch_size": 4,
        "dpo.learning_rate": 1e-3,
        "run.out_dir": "runs/dpo_tiny",
    })
