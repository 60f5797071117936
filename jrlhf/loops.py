"""The host loop: it only orchestrates the jitted pieces (sample, score, update), logs and saves.

`run_stage` is the one loop every training stage uses: step, check for NaN/inf, log
(metrics.jsonl, TensorBoard, a one-line summary every `run.log_every` steps), save periodically
with the data iterator's state, resume exactly from the latest checkpoint, and on SIGTERM
(preemption) save and stop cleanly. `train(setup, ...)` runs a `Setup`'s stage with it.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jrlhf import distributed, wandb_log
from jrlhf import resume as resume_binding
from jrlhf.checkpoint import Checkpointer
from jrlhf.config import Config, config_json, to_dict
from jrlhf.report import MetricsWriter, NoMetrics, check_finite, one_line, write_atomically
from jrlhf.setups import Setup
from jrlhf.state import TrainState


def progress(iterable, total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm progress bar on stderr when enabled and stderr is a terminal (else the iterable:
    a log file gets the one-line summaries instead)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                initial=initial)


class Preemption:
    """Turns SIGTERM into a flag checked between steps (a training loop) or between stages
    (`jrlhf.stages.run_stages`); nested uses restore the outer handler (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            if self.requested and callable(self._previous):
                self._previous(signal.SIGTERM, None)  # an outer Preemption learns of it too


class StageResult(NamedTuple):
    state: TrainState
    history: list[dict]
    preempted: bool


def _open_stage(name: str, config: Config, out_dir: Path, resume: bool, train: bool,
                inputs: dict[str, str]):
    """The stage's checkpointer (checked by `resume.open_checkpoints`) and metrics writer (W&B
    too when `run.wandb_project` is set); process 0 records the config and data digests
    beside them."""
    ckpt = resume_binding.open_checkpoints(name, config, out_dir, resume, train, inputs)
    distributed.barrier("stage_checked")  # every process compared before process 0 writes
    if not distributed.is_writer():
        return ckpt, NoMetrics()
    write_atomically(out_dir / name / "config.json", config_json(config))
    write_atomically(out_dir / name / "inputs.json",
                     json.dumps(inputs, indent=2, sort_keys=True) + "\n")
    return ckpt, MetricsWriter(out_dir, name, wandb_log.open_session(config, out_dir, resume))


def _save(ckpt: Checkpointer, name: str, step: int, state, batches, config: Config,
          inputs: dict[str, str] | None) -> None:
    """Checkpoint `step` with the data iterator's position and the config and data digests it
    was made with (what `--resume` is checked against)."""
    meta = {"stage_step": step, "stage": name, "config": to_dict(config),
            "inputs": inputs or {}}
    if hasattr(batches, "get_state"):
        meta["data"] = batches.get_state()
    ckpt.save(step, state, meta)


def run_stage(name: str, config: Config, state: TrainState, step_fn: Callable, batches: Iterator,
              num_steps: int, *, out_dir: str | Path | None = None, resume: bool = False,
              log: Callable[[str], None] | None = print, train: bool = True,
              inputs: dict[str, str] | None = None, summary_keys=None) -> StageResult:
    """Run `num_steps` of `state, metrics = step_fn(state, next(batches))` with checkpoints.

    Args:
        name / config: metrics rows' stage and `out_dir/name/checkpoints`; its `run.*` settings.
        state: the initial state (also the layout restored checkpoints take); whatever a
            run carries across steps (an RL run's `RLState`) is in it.
        batches: iterator; if it has `get_state`/`set_state` (grain) its position is saved.
        out_dir: where metrics.jsonl, TensorBoard files and checkpoints go (None: nothing saved).
        resume: continue from the stage's latest checkpoint (`resume.restore`); refused if the
            config or `inputs` (`{name: digest}` of the data files) differ from its own.
        train: False restores the latest checkpoint (resume) and returns without stepping;
        summary_keys: the metrics of the one-line summaries (None: every metric).
    """
    run, history, start, preempted, ckpt, writer = config.run, [], 0, False, None, NoMetrics()
    try:
        if out_dir is not None:
            ckpt, writer = _open_stage(name, config, Path(out_dir), resume, train, inputs or {})
            if resume and ckpt.latest_step() is not None:
                state, start = resume_binding.restore(ckpt, name, config, state, batches, log)
            # Rows a killed run wrote past its last checkpoint (or its first) are replayed.
            writer.truncate_after(start)
        with Preemption() as preemption:
            end = num_steps if train else start
            bar = progress(range(start, end), num_steps, name, run.progress and train,
                           initial=start)
            for step in bar:
                started, waited = time.perf_counter(), distributed.waited_seconds()
                state, metrics = step_fn(state, next(batches))
                dispatched = time.perf_counter()
                if ckpt:
                    ckpt.check()  # a background save that failed is reported now
                metrics = {k: float(v) for k, v in metrics.items()}
                check_finite(step + 1, metrics, name, state)
                if log and run.log_every and (step + 1) % run.log_every == 0:
                    # Through the bar when there is one, so the line does not break it.
                    getattr(bar, "write", log)(one_line(name, step + 1, metrics, summary_keys))
                # Agreed last, so a SIGTERM that arrived during this step (or its log line)
                # stops at this step.
                stop = _agreed_stop(preemption.requested, metrics, started, dispatched, waited)
                history.append(metrics)
                writer.write(step + 1, metrics)
                done = step + 1 == num_steps
                if ckpt and (done or stop or
                             (run.save_every and (step + 1) % run.save_every == 0)):
                    _save(ckpt, name, step + 1, state, batches, config, inputs)
                if stop and not done:
                    preempted = True
                    if log:
                        log(f"[{name}] SIGTERM: saved step {step + 1}, stopping")
                    break
    finally:
        if ckpt is not None:
            ckpt.close()
        writer.close()
    return StageResult(state, history, preempted)


def _agreed_stop(requested: bool, metrics: dict, started: float, dispatched: float,
                 waited: float) -> bool:
    """Whether to stop after this step: SIGTERM on any process stops all at the same step.
    With several processes the step's `host_metrics` are added to `metrics`."""
    if distributed.process_count() == 1:
        return requested
    busy = dispatched - started - (distributed.waited_seconds() - waited)
    table = distributed.gather_floats([float(requested), busy, time.perf_counter() - started])
    metrics.update(host_metrics(table[:, 1], table[:, 2]))
    return bool(table[:, 0].max() > 0)


def host_metrics(busy, step_seconds) -> dict[str, float]:
    """Stragglers, from every process's `busy [P]` (seconds of its own work before it could
    dispatch the step: waits on other processes excluded) and `step_seconds [P]` (its wall
    time): the slowest process and how far behind the quickest it was."""
    busy = np.asarray(busy)
    return {"hosts/busy_max": float(busy.max()), "hosts/busy_min": float(busy.min()),
            "hosts/slowest": float(np.argmax(busy)), "hosts/lag": float(busy.max() - busy.min()),
            "hosts/step_seconds": float(np.max(step_seconds))}


def stage_step(setup: Setup, config: Config, **inputs) -> Callable:
    """What the loop calls per step for a setup: its algorithm's driver around its update (the
    update itself, DPO's fed the frozen reference's log-probs, or a `RolloutLoop`). `inputs`:
    what a rollout driver needs (`reward`, `eos_token_id`, `pad_token_id`, and `prompts`, the
    stage's own batches, for dynamic-sampling refills)."""
    return setup.algorithm.driver(setup, config, **inputs)


def train(setup: Setup, config: Config, batches: Iterator, *, step_fn: Callable | None = None,
          out_dir=None, resume: bool = False, log=print, train: bool = True,
          inputs: dict[str, str] | None = None, **step_kwargs) -> StageResult:
    """Run `setup`'s stage: `setup.num_steps` steps with checkpoints under
    `out_dir/<setup.name>`. `step_fn` defaults to `stage_step(setup, config, **step_kwargs)`."""
    step_fn = step_fn or stage_step(setup, config, prompts=batches, **step_kwargs)
    return run_stage(setup.name, config, setup.state, step_fn, batches, setup.num_steps,
                     out_dir=out_dir, resume=resume, log=log, train=train, inputs=inputs,
                     summary_keys=setup.algorithm.summary_keys)
