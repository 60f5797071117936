"""One run per folder: `run.out_dir/run.lock`, held (flock) for the run's life.

The lock is the kernel's, on an open file: a killed run's lock is released with its process,
so a stale `run.lock` left behind is simply taken over. The file names the holder's pid, which a
second run refused the folder is told.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLocked(FileExistsError):
    """Another live run holds the folder."""


class RunLock:
    """Context manager: hold `folder/run.lock` or raise `RunLocked` naming the holder's pid."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / "run.lock"
        self._file = None
        self.previous_holder = ""  # the pid a killed run left in the file, if any

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")  # held open (and flock'd) for the run's life
        except OSError as err:
            raise ValueError(f"run.out_dir={str(self.path.parent)!r} cannot be used: "
                             f"{err.strerror or err}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunLocked(f"{self.path.parent} is in use by another jrlhf run (pid {holder}, "
                            f"lock {self.path}); wait for it to end or set run.out_dir to "
                            "another folder") from None
        f.seek(0)
        self.previous_holder = f.read().strip()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
