"""`write_atomically` and the clean-up of what a killed write leaves (kills of whole runs:
tests/test_faults.py)."""

import errno
import os
from pathlib import Path

import pytest

from jrlhf import report
from jrlhf.report import remove_temp_files, write_atomically


def test_the_temp_file_is_on_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """The order of system calls: the temp file, holding every byte, is fsynced; then it is
    renamed over the file; then the folder is fsynced (a power loss keeps the rename)."""
    path = tmp_path / "summary.json"
    path.write_text("old")
    text = '{"score": "caf\u00e9"}\n' * 1000
    calls = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append(("fsync", target.name, target.read_bytes() if target.is_file() else None))
        fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    write_atomically(path, text)
    assert calls == [("fsync", "summary.json.tmp", text.encode("utf-8")),
                     ("replace", "summary.json.tmp", "summary.json"),
                     ("fsync", tmp_path.name, None)]
    assert path.read_bytes() == text.encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "leaderboard.txt"
    path.write_bytes(b"old board\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, "new board\n")
    assert path.read_bytes() == b"old board\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.txt"]


def test_remove_temp_files_removes_only_write_atomically_leftovers(tmp_path):
    """Plain `*.tmp` files anywhere below; not folders so named, not links, nothing behind a
    linked folder, not other names."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared.tmp").write_text("not ours")
    run = tmp_path / "run"
    for name in ("metrics.jsonl.tmp", "sft/inputs.json.tmp",
                 "sft/checkpoints/4/jrlhf_files.json.tmp", "round1/samples.jsonl.tmp"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("half")
    kept = ["metrics.jsonl", "notes.tmpl", "sft/checkpoints/4.orbax-checkpoint-tmp-7/x",
            "keep.tmp/inside.json"]
    for name in kept:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("keep")
    (run / "link.tmp").symlink_to(outside / "shared.tmp")
    (run / "linked").symlink_to(outside)
    removed = remove_temp_files(run)
    assert [str(p.relative_to(run)) for p in removed] == [
        "metrics.jsonl.tmp", "round1/samples.jsonl.tmp", "sft/checkpoints/4/jrlhf_files.json.tmp",
        "sft/inputs.json.tmp"]
    assert not any(p.exists() for p in removed)
    for name in kept:
        assert (run / name).read_text() == "keep"
    assert (run / "link.tmp").is_symlink() and (outside / "shared.tmp").read_text() == "not ours"
    assert remove_temp_files(run) == []
    assert remove_temp_files(tmp_path / "missing") == []
    assert report.TEMP_SUFFIX == ".tmp"  # the name tests/test_multihost.py looks for
