"""Metrics out: metrics.jsonl, TensorBoard event files, one-line summaries and a PNG report."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from jrlhf import paths

TEMP_SUFFIX = ".tmp"  # `write_atomically` writes `<name>.tmp` beside the file, then renames it


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `<name>.tmp`, fsync it, rename it over `path`, fsync the folder.

    A kill leaves the old file or the new one, never half of one, and a power loss cannot leave
    an empty or partial file under `path` either (the data is on disk before the rename). An
    error leaves the old file and no temp file; a temp file that a kill left behind is removed
    by `remove_temp_files` when a run next opens the folder (or replaced by the next write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: the old file stays, without a temp file beside
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder: the renames and removals in it so far survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files of `write_atomically` calls that a kill cut short (plain files
    named `*.tmp`) anywhere under `folder`, without following links; returns them.

    Only while nothing else writes there: a run calls it once it holds the folder, before any
    stage starts.
    """
    removed = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = Path(parent) / name
            if name.endswith(TEMP_SUFFIX) and path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
    return sorted(removed)


def check_finite(step: int, metrics: dict[str, float], stage: str, state=None) -> None:
    """Halt on NaN/inf in any metric, or on a non-finite updated state (metric `state/finite`
    is 0: the first offending parameter path is named), before anything of the step is saved."""
    if metrics.get("state/finite", 1.0) != 1.0:
        where = first_non_finite(state) if state is not None else "unknown"
        raise FloatingPointError(
            f"{stage} step {step}: the updated parameters or optimizer state are not finite "
            f"(first: {where}); stopping without saving them (checkpoints hold only finite "
            f"states)")
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise FloatingPointError(
                f"{stage} step {step}: metric {key!r} is {value}; stopping before saving "
                f"(the last good checkpoint stays the latest)")


def first_non_finite(state) -> str:
    """Path of the first non-finite leaf of a state's params, else of its optimizer state (a
    host scan, run only after the compiled step found one)."""
    for prefix, tree in (("params", state.params), ("opt_state", state.opt_state)):
        # Optimizer leaves by their path through optax's state tuples, e.g. "1/0/mu/embed".
        flat = paths.flatten(tree) if prefix == "params" else {
            jax.tree_util.keystr(path, simple=True, separator="/"): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        for path, x in flat.items():
            a = np.asarray(x)
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                return f"{prefix}/{path}"
    return "none found"


def one_line(stage: str, step: int, metrics: dict[str, float],
             keys: tuple[str, ...] | None = None) -> str:
    """`[stage step] key=value ...` for the `keys` present in `metrics` (None: all of them);
    a key under the stage's own name is shortened to its last part."""
    parts = [f"{k.split('/')[-1] if k.startswith(stage) else k}={metrics[k]:.4g}"
             for k in (metrics if keys is None else keys) if k in metrics]
    return f"[{stage} {step}] " + " ".join(parts)


class MetricsWriter:
    """Appends `{"stage", "step", ...metrics}` rows to metrics.jsonl and TensorBoard, and to
    W&B when given the run folder's `jrlhf.wandb_log.Session`."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, wandb=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.stage = stage
        self.wandb = wandb
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.out_dir / "tensorboard" / stage))

    def truncate_after(self, step: int) -> None:
        """When a stage (re)starts at `step` (0, or a restored checkpoint's): drop this stage's
        rows past it, so a resumed run's rows equal an uninterrupted run's. The rewrite is
        atomic (write, then rename): a kill during it leaves the old file or the new one."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path)
                if not (r.get("stage") == self.stage and r["step"] > step)]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"stage": self.stage, "step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log_metrics(self.stage, step, metrics)

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()


class NoMetrics:
    """A `MetricsWriter` that writes nothing: a stage run without a folder, and every process
    but process 0 (the one writer) in a multi-host run."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (a kill mid-append) is dropped.

    Any other line that is not a JSON object is an error naming the file and the line (1-based,
    blank lines counted), as are bytes that are not UTF-8 on any line: `MetricsWriter` writes
    ASCII only, so those are damage, never an interrupted append.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1)
             if raw.strip()]
    rows = []
    for k, (n, raw) in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({err.reason} at byte {err.start}): "
                             "the metrics file is damaged; remove that line") from None
        except json.JSONDecodeError:
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{n}: not a JSON row") from None
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


PANELS = (
    ("SFT loss", "sft", "sft/loss"),
    ("Reward model loss", "reward", "reward/loss"),
    ("Reward model accuracy", "reward", "reward/accuracy"),
    ("PPO: reward-model score", "ppo", "score/mean"),
    ("PPO: KL to reference (nats/response)", "ppo", "ppo/kl"),
    ("PPO: policy / value loss", "ppo", ("ppo/policy_loss", "value/loss")),
    ("PPO: response length", "ppo", "ppo/response_length"),
    ("PPO: entropy", "ppo", "ppo/entropy"),
)


def write_report(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                 title: str = "jrlhf run", notes: list[str] | None = None) -> Path:
    """Draw the run's curves (reward, KL, losses, response length) into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [p for p in PANELS if any(r.get("stage") == p[1] and
                                       any(k in r for k in (p[2] if isinstance(p[2], tuple)
                                                            else (p[2],))) for r in rows)]
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 3 * ((n + 1) // 2)),
                             squeeze=False)
    for ax, (label, stage, keys) in zip(axes.flat, panels):
        for key in keys if isinstance(keys, tuple) else (keys,):
            pts = [(r["step"], r[key]) for r in rows if r.get("stage") == stage and key in r]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 40 else None)
        ax.set_title(label)
        ax.set_xlabel(f"{stage} step")
        ax.grid(alpha=0.3)
        if isinstance(keys, tuple):
            ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title + ("\n" + " | ".join(notes) if notes else ""), fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def file_digest(path: Path) -> str:
    """SHA-256 of a data file's bytes: what a resumed stage checks its data against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Beside an evaluation's files (comparisons.jsonl, leaderboard.txt, samples.jsonl): the marker
# that vouches for them as one set.
EVALUATION_MARKER = "evaluation.json"


class IncompleteEvaluation(ValueError):
    """An evaluation folder whose files are not one evaluation's complete set."""


def write_evaluation(folder: Path, stage: str, contents: dict[str, str]) -> None:
    """Replace an evaluation's files (`contents`: name -> text) in `folder` as one set.

    The marker `evaluation.json` first says `"complete": false`; then each file is replaced
    (`write_atomically`); then the marker says `"complete": true` and names each file's
    SHA-256. A kill at any moment leaves a set its marker vouches for (the previous one, or
    this one) or a marker saying it is incomplete: `evaluation_files` refuses that, and the
    next run of the stage (`--resume` too: an evaluation always runs again) replaces it.
    """
    marker = folder / EVALUATION_MARKER
    write_atomically(marker, json.dumps({"stage": stage, "complete": False}) + "\n")
    for name, text in contents.items():
        write_atomically(folder / name, text)
    digests = {name: hashlib.sha256(text.encode("utf-8")).hexdigest()
               for name, text in contents.items()}
    write_atomically(marker, json.dumps({"stage": stage, "complete": True, "sha256": digests},
                                        indent=2) + "\n")


def evaluation_files(folder: str | Path) -> dict[str, Path]:
    """The evaluation files in `folder` (name -> path) if they are one evaluation's complete
    set: its marker says complete and each file has the SHA-256 the marker names.

    Raises:
        IncompleteEvaluation: naming the folder or file and what is wrong.
    """
    folder = Path(folder)
    marker = folder / EVALUATION_MARKER
    try:
        info = json.loads(marker.read_text())
    except FileNotFoundError:
        raise IncompleteEvaluation(f"{folder}: no {EVALUATION_MARKER}: not a complete "
                                   "evaluation") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = None
    if not isinstance(info, dict):
        raise IncompleteEvaluation(f"{marker}: not a marker that jrlhf writes")
    if not info.get("complete"):
        raise IncompleteEvaluation(f"{marker}: evaluation {info.get('stage')!r} was cut short "
                                   "while writing its files (they may mix two evaluations)")
    digests = info.get("sha256")
    if not isinstance(digests, dict) or not digests:
        raise IncompleteEvaluation(f"{marker}: not a marker that jrlhf writes")
    files = {}
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file() or file_digest(path) != digest:
            raise IncompleteEvaluation(f"{path}: not the file evaluation {info['stage']!r} "
                                       f"wrote (its SHA-256 is in {marker}): changed since")
        files[name] = path
    return files
