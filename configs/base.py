"""Base config: every jrlhf default. Variants load it and change only what differs:

    from pathlib import Path
    from jrlhf.config import derive, load_config

    def get_config():
        return derive(load_config(Path(__file__).with_name("base.py")), {"ppo.kl_coef": 0.1})
"""

from jrlhf.config import Config


def get_config() -> Config:
    return Config()
