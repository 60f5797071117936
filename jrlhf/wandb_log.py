"""Weights & Biases beside metrics.jsonl and TensorBoard, on when `run.wandb_project` is set
(`pip install 'jrlhf[wandb]'`).

One W&B run per run folder, written by process 0 only (the one writer, as for every file the
processes share): the resolved config, every metrics row (each stage's keys under
`<stage>/`, plotted against `<stage>/step`), the report PNG and each evaluation's held-out
samples as a table. Its id is kept in `<run folder>/wandb_run.json`, so `--resume` continues
the same W&B run. W&B keeps its own files in `<run folder>/wandb/` (or `$WANDB_DIR/wandb/`);
`WANDB_MODE=offline` keeps them there for a later `wandb sync`.

The W&B run starts when there is something to log (a stage's first metrics row, a report, a
samples table), after the stage has accepted the run folder: a run refused there (e.g. a
second run without `--resume`) never replaces the saved id. Only the stage runner and the
host loop call this module; steps and rollouts know nothing of it.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from jrlhf import distributed
from jrlhf.config import Config, to_dict
from jrlhf.report import write_atomically

ID_FILE = "wandb_run.json"
MISSING = ("run.wandb_project is set but the wandb package is not installed: "
           "pip install 'jrlhf[wandb]'")


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ValueError(MISSING) from None
    return wandb


class Session:
    """The W&B run of one run folder in this process, started at its first log call."""

    def __init__(self, config: Config, out_dir: Path, resume: bool):
        self.wandb = _import_wandb()  # a missing package is found before any work is done
        self.config, self.out_dir, self.resume = config, out_dir, resume
        self.run = None
        self._stages: set[str] = set()

    def _started(self):
        if self.run is None:
            self.run = self._init()
        return self.run

    def _init(self):
        r, wandb = self.config.run, self.wandb
        id_path = self.out_dir / ID_FILE
        run_id = saved_id(self.out_dir) if self.resume else None
        if run_id is None:  # a fresh run (or a resumed one that never logged to W&B)
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))  # W&B's own id form
            write_atomically(id_path, json.dumps({"id": run_id}) + "\n")
        try:
            return wandb.init(
                project=r.wandb_project, entity=r.wandb_entity or None,
                name=r.wandb_name or self.out_dir.resolve().name, id=run_id, resume="allow",
                config=to_dict(self.config), reinit="create_new",
                dir=None if os.environ.get("WANDB_DIR") else str(self.out_dir))
        except wandb.errors.Error as err:
            raise ValueError(f"W&B (run.wandb_project={r.wandb_project!r}): {err} (WANDB_MODE="
                             "offline logs to disk only)") from None

    def log_metrics(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """One metrics.jsonl row: `<stage>/<key>` for each metric, at x = `<stage>/step`."""
        run = self._started()
        if stage not in self._stages:
            run.define_metric(f"{stage}/step")
            run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self._stages.add(stage)
        run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def log_image(self, key: str, path: Path) -> None:
        self._started().log({key: self.wandb.Image(str(path))})

    def log_table(self, key: str, rows: list[dict]) -> None:
        """Rows of equal keys (the columns, in the first row's order)."""
        columns = list(rows[0]) if rows else []
        table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self._started().log({key: table})

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


_SESSIONS: dict[Path, Session] = {}  # by run folder (resolved): this process's W&B runs


def open_session(config: Config, out_dir, resume: bool) -> Session | None:
    """The run folder's W&B session: the one open in this process, else a new one (the W&B
    run itself starts at its first log call). None when W&B is off or on processes other
    than 0. Raises ValueError (one line) when the wandb package is missing."""
    if not config.run.wandb_project or not distributed.is_writer():
        return None
    key = Path(out_dir).resolve()
    if key not in _SESSIONS:
        _SESSIONS[key] = Session(config, Path(out_dir), resume)
    return _SESSIONS[key]


def session(out_dir) -> Session | None:
    """The session `open_session` opened for the folder (None: W&B off, or not process 0)."""
    return _SESSIONS.get(Path(out_dir).resolve())


def log_image(out_dir, key: str, path) -> None:
    if (s := session(out_dir)) is not None:
        s.log_image(key, Path(path))


def log_table(out_dir, key: str, rows: list[dict]) -> None:
    if (s := session(out_dir)) is not None:
        s.log_table(key, rows)


def close_session(out_dir, failed: bool = False) -> None:
    """Finish the folder's W&B run (if one started) and forget the session; a later run in
    this process starts a new one (`--resume`: the same W&B run)."""
    s = _SESSIONS.pop(Path(out_dir).resolve(), None)
    if s is not None:
        s.finish(failed)


def saved_id(out_dir) -> str | None:
    """The W&B run id the run folder's earlier run logged to, if any."""
    try:
        return json.loads((Path(out_dir) / ID_FILE).read_text())["id"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or not ours
        return None
