"""TFDS builders for local files, written as array_record (no TensorFlow needed).

Read back with `builder.as_data_source()` (random access; what grain consumes). `tfds.load`
and `as_dataset` need TensorFlow and are deliberately not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jrlhf.data.rows import load_rows

_TEXT = tfds.features.Text()
FEATURES = {
    "sft": {"prompt": _TEXT, "messages": _TEXT, "response": _TEXT},
    "rankings": {"prompt": _TEXT, "messages": _TEXT,
                 "responses": tfds.features.Sequence(tfds.features.Text()),
                 "ranks": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32))},
    "prompts": {"prompt": _TEXT, "messages": _TEXT,
                "max_new_tokens": tfds.features.Scalar(dtype=np.int32)},
}


def source_fingerprint(path: str | os.PathLike, on_bad_row: str) -> str:
    """Changes whenever the file's path, size or modification time (or the bad-row policy) does;
    for a `datasets` folder, whenever any file in it is added, removed or changed."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = "|".join([str(path), on_bad_row] + [
        f"{f.relative_to(path) if f != path else ''}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in files])
    return hashlib.sha1(key.encode()).hexdigest()[:12]


class _LocalFile(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A local JSONL(.gz) / Parquet file (or a `datasets` save_to_disk folder) of one kind as a
    one-split (`train`) TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    KIND = ""

    def __init__(self, *, source: str | os.PathLike, on_bad_row: str = "error", **kwargs):
        self.source = Path(source)
        self.on_bad_row = on_bad_row
        self.report = None
        config = tfds.core.BuilderConfig(name="src-" + source_fingerprint(source, on_bad_row),
                                         description=str(self.source))
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, description=f"jrlhf {self.KIND} rows from {self.source}",
            features=tfds.features.FeaturesDict(FEATURES[self.KIND]))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rows, self.report = load_rows(self.source, self.KIND, self.on_bad_row)
        for i, row in enumerate(rows):
            yield i, row


class SftFile(_LocalFile):
    KIND = "sft"


class RankingsFile(_LocalFile):
    KIND = "rankings"


class PromptsFile(_LocalFile):
    KIND = "prompts"
    VERSION = tfds.core.Version("1.1.0")  # 1.1: each row's max_new_tokens


BUILDERS = {"sft": SftFile, "rankings": RankingsFile, "prompts": PromptsFile}


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS talks as if it downloaded a hub dataset (absl warnings about the per-file builder
    config, "Downloading and preparing dataset Unknown size", progress bars): for a local file
    none of it says anything, so it is silenced; our own one-line build summary is logged."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)


def build_dataset(kind: str, source: str | os.PathLike, data_dir: str | os.PathLike,
                  on_bad_row: str = "error", log=print):
    """Build (once per source version) and open a local file as a TFDS data source.

    Returns `(data_source, summary)`: the `train` split as a random-access source of dicts
    (text fields as bytes) and the build summary (rows kept, bad rows skipped).
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown data kind {kind!r}; choose from {', '.join(BUILDERS)}")
    with _quiet_tfds():
        builder = BUILDERS[kind](source=source, on_bad_row=on_bad_row, data_dir=str(data_dir))
    summary_path = Path(builder.data_dir) / "jrlhf_build_summary.json"
    if not summary_path.exists():
        with _quiet_tfds():
            builder.download_and_prepare()
        report = builder.report
        summary = {"source": str(source), "kind": kind, "rows": report.rows,
                   "skipped": report.skipped, "errors": report.errors[:20]}
        summary_path.write_text(json.dumps(summary, indent=2))
        if log:
            log(report.summary())
    summary = json.loads(summary_path.read_text())
    return builder.as_data_source()["train"], summary
