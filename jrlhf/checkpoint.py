"""Orbax checkpoints: the one module that knows Orbax's API.

A checkpoint holds the train state's arrays (params, optimizer state, step, RNG key data,
KL coefficient), plus JSON metadata: the data iterator's state, the resolved config and any
loop state (e.g. reward-normalisation moments). Saving is asynchronous; restoring places
arrays onto the shardings of a template state (which may come from a different mesh).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jrlhf.state import TrainState


def _arrays(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng),
            "kl_coef": state.kl_coef if state.kl_coef is not None else np.zeros((), np.float32)}


class Checkpointer:
    """Keep-last-N checkpoints of a TrainState plus JSON metadata under `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any] | None = None,
             force: bool = True) -> None:
        """Start an asynchronous save of `state` (and `meta`) as checkpoint `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)),
                                  meta=ocp.args.JsonSave(meta or {}))
        self.manager.save(step, args=args, force=force)

    def restore(self, template: TrainState, step: int | None = None):
        """`(state, meta)` of checkpoint `step` (default: latest), laid out like `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _arrays(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        arrays = restored["state"]
        rng = jax.random.wrap_key_data(arrays["rng"], impl=jax.random.key_impl(template.rng))
        state = template.replace(
            params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"], rng=rng,
            kl_coef=None if template.kl_coef is None else arrays["kl_coef"])
        return state, dict(restored["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
