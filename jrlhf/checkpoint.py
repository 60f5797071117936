"""Orbax checkpoints: the one module that knows Orbax's API.

A checkpoint holds the train state's arrays (params, optimizer state, step, RNG key data, and
an RL run's `RLState`: β, reward-normaliser moments, iteration counter), plus JSON metadata: the
data iterator's state, the resolved config, a checksum per array (`array_checksums`:
computed on the devices where the array lies, the same for any mesh or number of processes, so
multi-host checkpoints are checked like single-host ones and no array is skipped) and a CRC-32
of the metadata itself.
Saving is asynchronous; once a save is committed, a list of its files and their sizes
(`jrlhf_files.json`) is written beside it. Restoring checks that list first (a missing or
truncated file is found without reading through Orbax, whose failed asynchronous reads print
pages of "Event loop is closed" tracebacks), then places arrays onto the shardings of a
template state (which may come from a different mesh) and checks the digest: a checkpoint that
cannot be read or does not match is reported in one line and the previous intact one is used.
Each checkpoint also records its arrays' paths, shapes and dtypes: a template that asks for
others (a changed `lora.rank` or `model.arch`) is `LayoutMismatch`, which is the config's doing,
not damage, so nothing is moved aside. A background save that fails (disk full, read-only) is
`CheckpointWriteError` (an OSError naming the file) from the next `check()`, `save()` or `wait()`;
Orbax's own tracebacks for failures it also raises, and the "Event loop is closed" noise of reads
it cancelled, are kept off the terminal (`_quiet_orbax`).
With several processes every process takes part in each save and restore (Orbax writes each
process's shards); whether a checkpoint is intact is agreed by all of them, process 0 moves a bad
one aside, and all fall back to the same previous step.
Checkpoints written before the `RLState` (β as a top-level `kl_coef` array, the iteration
counter and moments as JSON `loop` metadata) are restored into one (`_legacy_arrays`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jrlhf import distributed, sharding
from jrlhf.report import TEMP_SUFFIX, write_atomically
from jrlhf.state import RLState, TrainState

FILE_LIST = "jrlhf_files.json"


def _rl_arrays(rl: RLState) -> dict:
    arrays = {"moments": {"count": rl.moments.count, "mean": rl.moments.mean,
                          "var": rl.moments.var}, "iteration": rl.iteration}
    if rl.kl_coef is not None:
        arrays["kl_coef"] = rl.kl_coef
    if rl.pool is not None:  # partial rollouts: the groups carried to the next iteration
        # (a field the pool does not carry, e.g. experts without routing replay, is left out)
        arrays["pool"] = {f.name: getattr(rl.pool, f.name) for f in dataclasses.fields(rl.pool)
                          if getattr(rl.pool, f.name) is not None}
    return arrays


def _arrays(state: TrainState) -> dict:
    """What a checkpoint holds of `state`, as a dict of arrays (the `RLState`, if any, under
    `rl`)."""
    arrays = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
              "rng": jax.random.key_data(state.rng)}
    if getattr(state, "rl", None) is not None:
        arrays["rl"] = _rl_arrays(state.rl)
    return arrays


def _legacy_arrays(state: TrainState) -> dict:
    """What checkpoints held before the `RLState`: β as a top-level `kl_coef` (zeros when the
    state had none)."""
    rl = getattr(state, "rl", None)
    kl_coef = rl.kl_coef if rl is not None and rl.kl_coef is not None else np.zeros((), np.float32)
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng), "kl_coef": kl_coef}


def _is_legacy(held: dict | None) -> bool:
    """Whether a checkpoint's recorded layout is the one before the `RLState` (one without a
    recorded layout is older still)."""
    return held is None or "kl_coef" in held


def _restored_rl(template: RLState | None, arrays: dict, meta: dict, legacy: bool):
    """The `RLState` of restored `arrays` (laid out like `template`'s): from its `rl` arrays, or
    for a legacy checkpoint from its `kl_coef` array and JSON `loop` metadata (iteration and
    moments; without them, the stage's step count, which a rollout stage's iterations equal)."""
    if template is None:
        return None
    if not legacy:
        held = arrays["rl"]
        pool = None if template.pool is None else template.pool.replace(**held["pool"])
        return template.replace(kl_coef=held.get("kl_coef"),
                                moments=template.moments.replace(**held["moments"]),
                                iteration=held["iteration"], pool=pool)
    loop = meta.get("loop", {})
    count, mean, var = loop.get("moments", (0.0, 0.0, 1.0))
    values = template.replace(
        kl_coef=None if template.kl_coef is None else arrays["kl_coef"],
        moments=template.moments.replace(count=count, mean=mean, var=var),
        iteration=loop.get("iteration", meta.get("stage_step", 0)))

    def placed(value, like):
        if isinstance(value, jax.Array):
            return value
        return sharding.put(np.asarray(value, like.dtype), like.sharding)

    return jax.tree.map(placed, values, template)


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


class LayoutMismatch(ValueError):
    """The arrays a template asks for are not those a checkpoint holds: a config change, not
    damage (the checkpoint stays where it is)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder, permissions)."""


def array_layout(arrays) -> dict[str, list]:
    """`path -> [shape, dtype]` of every array in `arrays` (what a checkpoint records)."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): [list(x.shape), str(x.dtype)]
            for path, x in jax.tree_util.tree_flatten_with_path(arrays)[0]}


def layout_difference(asked: dict[str, list], held: dict[str, list]) -> str | None:
    """One line on how the arrays a template asks for differ from those a checkpoint holds, or
    None when they are the same."""
    def shown(entry):
        return f"{tuple(entry[0])} {entry[1]}"

    differences = []
    for key in sorted(set(asked) | set(held)):
        if key not in held:
            differences.append(f"the config asks for {key} {shown(asked[key])}, the checkpoint "
                               "holds no such array")
        elif key not in asked:
            differences.append(f"the checkpoint holds {key} {shown(held[key])}, the config asks "
                               "for no such array")
        elif asked[key] != held[key]:
            differences.append(f"the config asks for {key} {shown(asked[key])}, the checkpoint "
                               f"holds {shown(held[key])}")
    if not differences:
        return None
    more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
    return differences[0] + more


def write_error(err: BaseException, what: str) -> CheckpointWriteError:
    """One-line `CheckpointWriteError` for an Orbax/TensorStore write failure: the file and the
    system's reason when the message names them ("Failed writing: "<path>": ... : <reason>
    [os_error_code=...]"), else the first line of the message."""
    text = str(err)
    found = re.search(r'Failed writing: "([^"]+)".*?: ([^:\[]+?) \[os_error_code', text)
    if found:
        return CheckpointWriteError(f"cannot write {what}: {found.group(2)} ({found.group(1)})")
    if isinstance(err, OSError) and err.strerror:
        return CheckpointWriteError(f"cannot write {what}: {err.strerror} ({err.filename})")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return CheckpointWriteError(f"cannot write {what}: {first[:300]}")


class _OrbaxReported(logging.Filter):
    """Drops the log records of Orbax's failures (its own, asyncio's "Task exception was never
    retrieved" for its abandoned write tasks, and "Future exception was never retrieved" for the
    TensorStore reads of a damaged checkpoint it abandoned after the first failed one): each
    failure is also raised to jrlhf, which reports it in one line (a failed save) or falls back
    from it (a damaged checkpoint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        orbax = f"{os.sep}orbax{os.sep}"
        if orbax in (record.pathname or ""):
            return False
        if record.exc_info and "tensorstore_spec=" in str(record.exc_info[1]):
            return False  # a TensorStore error: it carries the spec of the array it failed on
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if orbax in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


def _quiet_orbax() -> None:
    """Keep Orbax's duplicate failure reports off the terminal (idempotent): its ERROR log
    records with tracebacks, and the `RuntimeError: Event loop is closed` that TensorStore
    callbacks of reads Orbax cancelled raise after its event loop is gone (unraisable: Python
    would print each). Other unraisable errors still reach the previous hook."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxReported) for f in logger.filters):
            logger.addFilter(_OrbaxReported())
    previous = sys.unraisablehook
    if getattr(previous, "jrlhf_quiet_orbax", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook.jrlhf_quiet_orbax = True
    sys.unraisablehook = hook


def _entries(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.is_dir() else 0


class Checkpointer:
    """Keep-last-N checkpoints of a TrainState plus JSON metadata under `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        except OSError as err:
            raise write_error(err, f"checkpoints to {self.directory}") from None
        self._saving: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict[str, Any] | None = None,
             force: bool = True) -> None:
        """Start an asynchronous save of `state` (and `meta`, plus the arrays' checksums and
        layout) as checkpoint `step`."""
        arrays = _arrays(state)
        meta = dict(meta or {}, checksums=array_checksums(arrays), arrays=array_layout(arrays))
        meta["meta_digest"] = meta_digest(meta)
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                  meta=ocp.args.JsonSave(meta))
        # Orbax finishes the previous save before it starts this one anyway; waiting here first
        # lets the previous checkpoint's file list be written.
        self.wait()
        self._saving = step
        try:
            self.manager.save(step, args=args, force=force)
        except Exception as err:  # noqa: BLE001 - any failure to write is one line
            raise write_error(err, f"checkpoint step {step} to {self.directory}") from None

    def check(self) -> None:
        """Raise `CheckpointWriteError` now if the save in the background has failed (cheap:
        call it every step, so a full disk is reported when it happens, not at the next save)."""
        if self._saving is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 - any failure to write is one line
            step, self._saving = self._saving, None
            raise write_error(err, f"checkpoint step {step} to {self.directory}") from None

    def saved_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` alone (no arrays are read); raises
        `CorruptCheckpoint` when it fails its digest."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"] or {})
        expected = meta.pop("meta_digest", None)
        if expected is not None and meta_digest(meta) != expected:
            raise CorruptCheckpoint("metadata digest mismatch")
        return meta

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
                     for p in sorted(folder.rglob("*"))
                     if p.is_file() and not p.name.endswith(TEMP_SUFFIX)}  # a kill's leftover
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
            except LayoutMismatch:  # the config's doing: nothing is moved
                raise
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
        target = self.corrupt_folder / str(step)
        if not distributed.is_writer():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{step}.{len(list(target.parent.iterdir()))}")
        os.replace(self.directory / str(step), target)
        return target

    def set_all_aside(self) -> Path:
        """Move every checkpoint to `replaced_checkpoints/<n>` beside this folder (a stage that
        starts over keeps what it had) and reopen it empty; returns where they went."""
        self.close()
        folder = self.directory.parent / "replaced_checkpoints"
        target = folder / str(_entries(folder))
        distributed.barrier("replacing_checkpoints")  # every process named it before the move
        if distributed.is_writer():
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory, target)
        distributed.barrier("checkpoints_replaced")
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)
        return target

    @property
    def corrupt_folder(self) -> Path:
        """Where checkpoints that fail to read or verify are moved (beside this folder)."""
        return self.directory.parent / "corrupt_checkpoints"

    def set_aside_count(self) -> int:
        """How many checkpoints of this folder were set aside as corrupt."""
        return _entries(self.corrupt_folder)

    def _read_step(self, template: TrainState, step: int):
        """`(arrays, meta, legacy)` of checkpoint `step` as this process reads them (may raise):
        the file list, then the metadata and its digest, then whether the template asks for the
        arrays the checkpoint holds (`LayoutMismatch`: no array is read), then the arrays."""
        self._check_files(step)
        meta = self.saved_meta(step)
        held = meta.pop("arrays", None)  # checkpoints before layouts were recorded: not compared
        legacy = _is_legacy(held)
        asked = (_legacy_arrays if legacy else _arrays)(template)
        if held is not None:
            difference = layout_difference(array_layout(asked), held)
            if difference:
                raise LayoutMismatch(f"checkpoint step {step} in {self.directory} holds other "
                                     f"arrays than the config builds: {difference}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            asked)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return restored["state"], meta, legacy

    def _restore_step(self, template: TrainState, step: int):
        error = None
        try:
            arrays, meta, legacy = self._read_step(template, step)
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
            params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"], rng=rng)
        if getattr(template, "rl", None) is not None:
            state = state.replace(rl=_restored_rl(template.rl, arrays, meta, legacy))
        return state, meta

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure to write is one line
            step, self._saving = self._saving, None
            raise write_error(err, f"checkpoint step {step} to {self.directory}") from None
        self._saving = None
        self._list_committed_files()

    def close(self) -> None:
        self.wait()
        self.manager.close()
