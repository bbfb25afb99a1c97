"""One run directory, one process: an OS file lock that a run holds while it uses its directory.

The lock is ``flock`` on a file inside the directory (:data:`LOCK_FILE`). The kernel releases it
when the process ends, however it ends, so a run killed with SIGKILL never leaves a stale lock
behind; the file itself stays (removing a lock file invites two processes to lock two files of
the same name). The holder writes who it is into the file, so that a second start can name it.

A process forked from the holder (a DataLoader worker) would share the lock with it, and hold the
directory after the run has let go or died; such a child closes its copy as it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import TextIO

from minitrain.engine.errors import MinitrainError

LOCK_FILE = ".minitrain.lock"
"""In the run directory. Not part of the run: a directory holding only this file is empty."""
WAIT_S = 2.0
"""How long a start waits for a lock held by someone else before refusing: long enough for a
``minitrain runs`` that is looking at the directory, or a process that torchrun is replacing."""


_HELD: weakref.WeakSet[RunDirLock] = weakref.WeakSet()


def _close_in_child() -> None:
    """Run in a forked child: drop its copies of the parent's locks (closing a copy releases
    nothing while the parent holds the original)."""
    for lock in list(_HELD):
        if lock.file is not None:
            with contextlib.suppress(OSError):
                lock.file.close()
            lock.file = None


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLock:
    """The lock of one run directory; :meth:`acquire` creates the directory if it must."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.file: TextIO | None = None
        self.created_dir = False  # this lock created the run directory (a failed start removes it again)

    @property
    def held(self) -> bool:
        return self.file is not None

    def acquire(self, wait: float = WAIT_S) -> None:
        """Hold the lock, or raise MinitrainError naming the process that does."""
        if self.held:
            return
        if not self.run_dir.exists():
            try:
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:
                pass  # another start made it meanwhile: the lock decides
            except OSError as exc:
                raise MinitrainError(f"run directory {self.run_dir} cannot be created: {exc.strerror or exc}") from None
        try:
            file = open(self.path, "a+")
        except OSError as exc:
            raise MinitrainError(f"run directory {self.run_dir} cannot be locked: {exc.strerror or exc}") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    file.close()
                    raise MinitrainError(busy(self.run_dir)) from None
                time.sleep(0.05)
        file.seek(0)
        file.truncate()
        file.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": " ".join(["minitrain", *sys.argv[1:]]),
                }
            )
            + "\n"
        )
        file.flush()
        self.file = file
        _HELD.add(self)

    def release(self, remove_if_unused: bool = False) -> None:
        """Let go of the lock. ``remove_if_unused``: a start that failed before writing anything
        removes the directory it created, so that it leaves nothing behind."""
        if self.file is None:
            return
        if remove_if_unused and self.created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.run_dir.rmdir()
        self.file.close()  # closing the file releases the flock
        self.file = None
        _HELD.discard(self)


def in_use(run_dir: str | Path) -> bool | None:
    """Whether a process holds ``run_dir``'s lock now (None: the directory has no lock file, as
    runs made before minitrain locked its run directories have not)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        file = open(path)
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # a start waits out this instant
        except BlockingIOError:
            return True
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
        return False


def busy(run_dir: str | Path) -> str:
    """The one line that refuses a start into a run directory another process holds."""
    return (
        f"run directory {run_dir} is in use by {holder(run_dir)}: a run directory holds one run at a time. "
        "Wait for it to end, or choose another --run-dir"
    )


def holder(run_dir: str | Path) -> str:
    """Who holds (or last held) ``run_dir``'s lock, as its file says: ``process 1234 on HOST
    (minitrain run ..., since TIME)``."""
    try:
        info = json.loads((Path(run_dir) / LOCK_FILE).read_text())
        return (
            f"process {info['pid']} on {info['host']} ({info['command']}, since "
            f"{info['started'].replace('T', ' ')[:19]})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
