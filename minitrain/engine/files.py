"""Writing a file so that a crash leaves the old version or the new one, never half of one.

Checkpoints, the run's ``config.json`` and ``run.json`` and rewrites of ``metrics.csv`` all go
through :func:`write_atomic`; a plugin author may use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from minitrain.engine.errors import MinitrainError, one_line


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], what: str = "file") -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, flush it to disk, rename it over
    ``path``, then make the rename durable. A failure removes the temporary file, leaves ``path``
    as it was and raises one MinitrainError line that says ``what`` could not be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MinitrainError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # mkstemp's file is private; a run's files are not
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        raise MinitrainError(
            f"could not write {what} {path} ({one_line(exc)}); any previous file there is unchanged"
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # still there only if the rename did not happen
    _fsync_dir(path.parent)


def read_json(path: str | Path) -> dict:
    """A run file's JSON object (run.json, config.json), or ``{}`` when it is missing or unreadable:
    for readers that make do without it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_writable(path: str | Path, what: str = "folder") -> None:
    """Refuse, before any work, a ``path`` (a folder a plugin or command will write to) that this
    user cannot create or write: it, or its nearest existing parent, must be a writable folder."""
    problem = writable_problem(path, what)
    if problem:
        raise MinitrainError(problem)


def writable_problem(path: str | Path, what: str = "folder") -> str | None:
    """Why this user cannot create or write the folder ``path``, in one line that starts with
    ``what`` and ``path`` (``--run-dir runs/a: ...``), or None. Checks the path itself, else its
    nearest existing parent: a file on the way (``/etc/passwd/run``) is named as the culprit, not
    reported as a permission problem; so is a link that leads nowhere."""
    path = Path(path)
    for existing in (path, *path.absolute().parents):
        if existing.is_symlink() and not existing.exists():
            return f"{what} {path}: {existing} is a link to {os.readlink(existing)}, which does not exist"
        if existing.exists():
            break
    if not existing.is_dir():
        return f"{what} {path}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {path} is not writable: {existing} does not let this user create files"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable. Skipped where directories cannot be opened (Windows) or
    synced (some network filesystems): the file is already complete and in place by then."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
