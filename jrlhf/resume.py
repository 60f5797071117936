"""What `--resume` is bound to: the config and data a stage's checkpoints were made with.

Each checkpoint records the resolved config and the digests of its data files (older ones: the
stage's `config.json` / `inputs.json` beside them). `open_checkpoints` refuses a resume whose
config or data differ (except `RESUME_SAFE` keys and `run.allow_changed`), and a stage whose
checkpoints were all set aside as corrupt; `restore` tells a checkpoint that holds other arrays
than the config builds (a changed shape: not corruption, nothing is moved) from a damaged one,
and starts a stage over only when `run.restart_stages` names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from jrlhf.checkpoint import Checkpointer, LayoutMismatch
from jrlhf.config import RESUME_SAFE, Config, changed_keys


def open_checkpoints(name: str, config: Config, out_dir: Path, resume: bool, train: bool,
                     inputs: dict[str, str]) -> Checkpointer:
    """Stage `name`'s checkpointer under `out_dir/name/checkpoints`; refuses to overwrite an
    earlier run's checkpoints without `resume`, to export (`train=False`) without a
    checkpoint, to resume with another config or other data than the checkpoints were made
    with, and to start a stage over on `--resume` whose checkpoints were all set aside as
    corrupt (unless it is in `run.restart_stages`)."""
    ckpt = Checkpointer(out_dir / name / "checkpoints", keep=config.run.keep_checkpoints)
    latest = ckpt.latest_step()
    try:
        if latest is None and not train:
            raise FileNotFoundError(f"no checkpoint of stage {name!r} in {ckpt.directory}")
        if latest is not None and not resume:
            raise FileExistsError(
                f"{ckpt.directory} already holds checkpoints (latest step {latest}): pass "
                "--resume to continue that run, or set run.out_dir to a new folder")
        if latest is not None:
            require_same_run(name, config, out_dir / name, inputs, ckpt)
        elif resume and ckpt.set_aside_count() and name not in config.run.restart_stages:
            raise FileNotFoundError(
                f"--resume of stage {name!r}: it has no intact checkpoint "
                f"({ckpt.set_aside_count()} set aside in {ckpt.corrupt_folder}); it is not "
                f"trained over from step 0 unless asked: pass --set run.restart_stages={name}")
    except Exception:
        ckpt.close()
        raise
    return ckpt


def made_with(ckpt: Checkpointer, stage_dir: Path) -> tuple[dict | None, dict | None]:
    """`(config, inputs)` the stage's latest checkpoint was made with: from the newest
    checkpoint whose metadata reads back intact (each holds both), else from the stage's
    `config.json` / `inputs.json` (checkpoints made before they held them); None if neither."""
    for step in sorted(ckpt.manager.all_steps(), reverse=True):
        try:
            meta = ckpt.saved_meta(step)
        except Exception:  # noqa: BLE001 - a damaged checkpoint is reported when restored
            continue
        if "config" in meta:
            return meta["config"], meta.get("inputs", {})
    files = stage_dir / "config.json", stage_dir / "inputs.json"
    config, inputs = (json.loads(f.read_text()) if f.exists() else None for f in files)
    return config, inputs


def require_same_run(name: str, config: Config, stage_dir: Path, inputs: dict[str, str],
                     ckpt: Checkpointer) -> None:
    """Refuse to resume `name` when its config or data differ from what its checkpoints were
    made with, except `RESUME_SAFE` keys and those in `run.allow_changed`, listing the diff."""
    allowed = set(RESUME_SAFE) | set(config.run.allow_changed)
    saved, before = made_with(ckpt, stage_dir)
    if saved is None:
        raise ValueError(
            f"--resume of stage {name!r}: neither its checkpoints nor {stage_dir / 'config.json'} "
            "record the config they were made with, so the resume cannot be checked; restore "
            "that file, or use a new run.out_dir")
    changes = changed_keys(saved, config)
    before = before or {}
    for key in sorted(set(before) | set(inputs)):
        if before.get(key) != inputs.get(key):
            changes[f"data.{key}"] = ("file " + str(before.get(key))[:12],
                                      "file " + str(inputs.get(key))[:12])
    refused = {k: v for k, v in changes.items()
               if k not in allowed and k.rsplit(".", 1)[0] not in allowed}  # model.arch.x
    if refused:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"--resume of stage {name!r} with a config or data other than its checkpoints were "
            f"made with ({diff}); resume with the original settings, or allow the change with "
            f"--set run.allow_changed={','.join(refused)}")


def restore(ckpt: Checkpointer, name: str, config: Config, state, batches, log) -> tuple:
    """`(state, step)` of the latest intact checkpoint; the data iterator follows it. Checkpoints that hold other arrays than `state` (the config changed a shape), or
    none intact, are `(state, 0)` for a stage in `run.restart_stages` (its checkpoints moved
    to `replaced_checkpoints/`) and a one-line error otherwise; nothing is moved then."""
    try:
        state, meta = ckpt.restore(state, log=log)
    except (LayoutMismatch, FileNotFoundError) as err:
        if name not in config.run.restart_stages:
            advice = ("resume with the config the checkpoints were made with, or "
                      if isinstance(err, LayoutMismatch) else "")
            raise ValueError(f"--resume of stage {name!r}: {err}; {advice}pass --set "
                             f"run.restart_stages={name} to train it again from step 0 (its "
                             "checkpoints are kept)") from None
        moved = ckpt.set_all_aside()
        if log:
            log(f"[{name}] {err}; training it again from step 0 (run.restart_stages); its "
                f"checkpoints were moved to {moved}")
        return state, 0
    if "data" in meta and hasattr(batches, "set_state"):
        batches.set_state(meta["data"])
    step = int(meta["stage_step"])
    if log and step:
        log(f"[{name}] resumed from step {step} ({ckpt.directory})")
    return state, step
