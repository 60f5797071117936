"""jrlhf: accelerator-native RLHF in JAX/Flax.

Top-level names are imported lazily (so `jrlhf annotate` starts without loading JAX):
`jrlhf.generate`, `jrlhf.train_ppo`, and the modules `jrlhf.rl`, `jrlhf.losses`,
`jrlhf.models`, `jrlhf.steps`, `jrlhf.elo`.
"""

import importlib

_LAZY = {"generate": ("jrlhf.sampling", "generate"), "train_ppo": ("jrlhf.loops", "train_ppo"),
         "train_sft": ("jrlhf.loops", "train_sft"), "train_reward": ("jrlhf.loops", "train_reward"),
         "run_pipeline": ("jrlhf.pipeline", "run_pipeline")}
__all__ = [*_LAZY, "elo", "losses", "models", "rl", "steps"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("elo", "losses", "models", "rl", "steps"):
        return importlib.import_module(f"jrlhf.{name}")
    raise AttributeError(f"module 'jrlhf' has no attribute {name!r}")
