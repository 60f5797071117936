"""Orbax checkpoints: the one module that knows Orbax's API.

A checkpoint holds the train state's arrays (params, optimizer state, step, RNG key data,
KL coefficient), plus JSON metadata: the data iterator's state, the resolved config, any
loop state (e.g. reward-normalisation moments), a checksum per array (`array_checksums`:
computed on the devices where the array lies, the same for any mesh or number of processes, so
multi-host checkpoints are checked like single-host ones and no array is skipped) and a CRC-32
of the metadata itself.
Saving is asynchronous; once a save is committed, a list of its files and their sizes
(`jrlhf_files.json`) is written beside it. Restoring checks that list first (a missing or
truncated file is found without reading through Orbax, whose failed asynchronous reads print
pages of "Event loop is closed" tracebacks), then places arrays onto the shardings of a
template state (which may come from a different mesh) and checks the digest: a checkpoint that
cannot be read or does not match is reported in one line and the previous intact one is used.
With several processes every process takes part in each save and restore (Orbax writes each
process's shards); whether a checkpoint is intact is agreed by all of them, process 0 moves a bad
one aside, and all fall back to the same previous step.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jrlhf import distributed
from jrlhf.report import write_atomically
from jrlhf.state import TrainState

FILE_LIST = "jrlhf_files.json"


def _arrays(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng),
            "kl_coef": state.kl_coef if state.kl_coef is not None else np.zeros((), np.float32)}


def arrays_digest(arrays) -> list[int] | None:
    """CRC-32 of each array's bytes (in tree order); None when some array spans other
    processes' devices. What checkpoints before `array_checksums` held (still checked)."""
    leaves = jax.tree.leaves(arrays)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return None
    return [zlib.crc32(np.ascontiguousarray(jax.device_get(x)).tobytes()) for x in leaves]


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of each element of `x` as uint32 (narrower types zero-extended)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(width)
    if unsigned is None:
        raise ValueError(f"no checksum for {x.dtype} arrays")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """`Σ_i bits(x_i) · (2i + 1) mod 2³²` over the row-major flat index i: exact in any
    reduction order (modular sums), so any sharding gives the same value; a change of one
    element always changes it (odd multipliers are invertible mod 2³²)."""
    x = jnp.asarray(x)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride)
        stride = stride * x.shape[dim] % 2**32
    return jnp.sum(_as_uint32(x) * (2 * index + 1), dtype=jnp.uint32)


_checksums = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def array_checksums(arrays) -> list[int]:
    """One `_checksum` per array (tree order), computed where the arrays lie: no host copy,
    and with several processes every process gets the same values (a collective: all call
    it)."""
    return [int(c) for c in _checksums(jax.tree.leaves(arrays))]


def meta_digest(meta: dict) -> int:
    """CRC-32 of the metadata (data position, loop state, config, the arrays' digest) as
    canonical JSON: a changed byte there is caught like one in the arrays."""
    return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


class CorruptCheckpoint(ValueError):
    pass


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
        """Start an asynchronous save of `state` (and `meta`, plus the arrays' digest) as
        checkpoint `step`."""
        arrays = _arrays(state)
        meta = dict(meta or {}, checksums=array_checksums(arrays))
        meta["meta_digest"] = meta_digest(meta)
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                  meta=ocp.args.JsonSave(meta))
        # Orbax finishes the previous save before it starts this one anyway; waiting here first
        # lets the previous checkpoint's file list be written.
        self.wait()
        self.manager.save(step, args=args, force=force)

    def _list_committed_files(self) -> None:
        """Write the file list of each committed checkpoint that has none yet (process 0; a
        kill before it is written leaves a checkpoint checked by its digest alone)."""
        if not distributed.is_writer():
            return
        for step in self.manager.all_steps():
            folder = self.directory / str(step)
            if (folder / FILE_LIST).exists() or not folder.is_dir():
                continue
            sizes = {str(p.relative_to(folder)): p.stat().st_size
                     for p in sorted(folder.rglob("*")) if p.is_file()}
            write_atomically(folder / FILE_LIST, json.dumps(sizes, indent=0))

    def _check_files(self, step: int) -> None:
        listed = self.directory / str(step) / FILE_LIST
        if not listed.exists():
            return
        for name, size in json.loads(listed.read_text()).items():
            path = listed.parent / name
            if not path.is_file():
                raise CorruptCheckpoint(f"{name} is missing")
            if path.stat().st_size != size:
                raise CorruptCheckpoint(f"{name} holds {path.stat().st_size} bytes, "
                                        f"{size} were written")

    def restore(self, template: TrainState, step: int | None = None,
                log: Callable[[str], None] | None = print):
        """`(state, meta)` of checkpoint `step`, or by default of the latest intact one: a
        checkpoint that cannot be read or fails its digest is reported through `log` and the
        one before it is tried. Arrays are laid out like `template`."""
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        for i, candidate in enumerate(steps):
            try:
                return self._restore_step(template, candidate)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                why = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                why = why.split(" See full TensorStore details")[0][:200]
                moved = self._set_aside(candidate)
                distributed.barrier("checkpoint_set_aside")
                self.manager.reload()
                rest = (f"; using step {steps[i + 1]}" if i + 1 < len(steps)
                        else "; no earlier checkpoint")
                if log:
                    log(f"checkpoint step {candidate} in {self.directory} is unreadable or "
                        f"corrupt ({type(err).__name__}: {why}); moved to {moved}{rest}")
        raise FileNotFoundError(f"no intact checkpoint in {self.directory}")

    def _set_aside(self, step: int) -> Path:
        """Move a bad checkpoint out of the manager's folder (kept for inspection), so the
        resumed run can write that step again."""
        target = self.directory.parent / "corrupt_checkpoints" / str(step)
        if not distributed.is_writer():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{step}.{len(list(target.parent.iterdir()))}")
        os.replace(self.directory / str(step), target)
        return target

    def _read_step(self, template: TrainState, step: int):
        """`(arrays, meta)` of checkpoint `step` as this process reads them (may raise)."""
        self._check_files(step)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _arrays(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"] or {})
        expected_meta = meta.pop("meta_digest", None)
        if expected_meta is not None and meta_digest(meta) != expected_meta:
            raise CorruptCheckpoint("metadata digest mismatch")
        return restored["state"], meta

    def _restore_step(self, template: TrainState, step: int):
        error = None
        try:
            arrays, meta = self._read_step(template, step)
        except Exception as err:  # noqa: BLE001 - reported below, once every process knows
            error = err
        # Each process read its own shards: all must have succeeded before any array is used.
        if not distributed.all_processes(error is None, "checkpoint_read"):
            raise error or CorruptCheckpoint("another process could not read it")
        expected = meta.pop("checksums", None)
        if expected is not None and array_checksums(arrays) != expected:
            raise CorruptCheckpoint("array checksum mismatch")
        expected = meta.pop("digest", None)  # checkpoints before checksums
        if expected is not None and arrays_digest(arrays) != expected:
            raise CorruptCheckpoint("array digest mismatch")
        rng = jax.random.wrap_key_data(arrays["rng"], impl=jax.random.key_impl(template.rng))
        state = template.replace(
            params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"], rng=rng,
            kl_coef=None if template.kl_coef is None else arrays["kl_coef"])
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._list_committed_files()

    def close(self) -> None:
        self.wait()
        self.manager.close()
