"""jrlhf: accelerator-native RLHF in JAX/Flax.

Top-level names are imported lazily (so `jrlhf annotate` starts without loading JAX):
`jrlhf.generate`, `jrlhf.make_setup` (one setup per algorithm), `jrlhf.train` (the host loop
over a setup), `jrlhf.run_pipeline`, and the modules `jrlhf.rl`, `jrlhf.losses`, `jrlhf.models`,
`jrlhf.steps`, `jrlhf.elo`.
"""

import importlib

_LAZY = {"generate": ("jrlhf.sampling", "generate"), "make_setup": ("jrlhf.setups", "make_setup"),
         "train": ("jrlhf.loops", "train"), "Reward": ("jrlhf.rollouts", "Reward"),
         "run_pipeline": ("jrlhf.stages", "run_pipeline")}
__all__ = [*_LAZY, "elo", "losses", "models", "rl", "steps"]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("elo", "losses", "models", "rl", "steps"):
        return importlib.import_module(f"jrlhf.{name}")
    raise AttributeError(f"module 'jrlhf' has no attribute {name!r}")
