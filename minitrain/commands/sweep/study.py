"""A sweep's study: where Optuna keeps it, what it searches, and which of its trials count.

The study is Optuna's, in Optuna's storage: by default a journal file in the sweep's folder
(``runs/sweeps/NAME/study.journal``: nothing to start, and safe for several processes of one
host, which SQLite under concurrent writers is not); with ``--storage URL`` an RDB (PostgreSQL,
MySQL) that several machines share. What the study searches (recipe, space, fixed ``--set``
values, plugins, metric and direction) is stored with it, so that a command that continues it
cannot silently measure something else.

Which trials count towards ``--trials N``: complete, pruned, and failed ones whose run failed
(an exception, a non-finite loss). A trial whose sweep stopped while it ran (Ctrl-C, a kill, a lost
machine) does not count: it is marked failed and its parameters are queued again, for a new trial
in a new directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitrain.engine.errors import MinitrainError, one_line
from minitrain.engine.files import write_atomic

SWEEPS = Path("runs") / "sweeps"
SWEEP_FILE = "sweep.json"
JOURNAL = "study.journal"
SETTINGS_ATTR = "minitrain_sweep"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
JOURNAL_LOCK_GRACE_S = 10  # a journal lock held this long while the journal does not grow is a dead one
HEARTBEAT_S = 60.0  # a running trial's sweep says it is alive this often...
STALE_AFTER_S = 600.0  # ...and one not heard of for this long, on another host, is taken for lost
ORPHAN_AFTER_S = 5.0
"""A RUNNING trial with no owner yet, or half of one: Optuna's ``ask`` made it, and its sweep
writes the owner at once, one attribute at a time (milliseconds), unless it was killed in
between. One this old is taken for lost."""
OWNER_KEYS = ("host", "pid", "pid_start", "alive")


def optuna():
    """Optuna, imported on first use (``import minitrain`` does not need it)."""
    try:
        import optuna as module
    except ImportError:
        raise MinitrainError(
            "minitrain sweep needs Optuna: pip install 'minitrain[sweep]' (or pip install optuna)"
        ) from None
    module.logging.set_verbosity(module.logging.WARNING)  # the sweep prints its own lines
    warnings.filterwarnings("ignore", category=module.exceptions.ExperimentalWarning)
    return module


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise MinitrainError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    return name


def sweep_dir(name_or_dir: str) -> Path:
    """``runs/sweeps/NAME``, or the folder itself when given one that holds a sweep."""
    path = Path(name_or_dir)
    if (path / SWEEP_FILE).is_file():
        return path
    return SWEEPS / name_or_dir


def masked(url: str | None) -> str | None:
    """An RDB URL without its password, fit to print and to keep in files."""
    if url is None or "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str | None, folder: Path):
    """Optuna's storage for ``--storage URL`` (an RDB URL, or the path of a journal file), or the
    journal file in the sweep's folder."""
    optuna()
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    if url is None or "://" not in url:
        # Absolute: the lock is a symlink to the journal, and Optuna follows it to tell a live lock
        # (the journal still grows) from one a killed process left behind, released after
        # JOURNAL_LOCK_GRACE_S; a relative target would point nowhere, and the wait never end.
        path = (folder / JOURNAL if url is None else Path(url)).absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
            return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        except OSError as exc:
            raise MinitrainError(f"study journal {path}: {exc.strerror or exc}") from None
    if "***" in url:
        raise MinitrainError(
            f"--storage {url}: the password was left out when it was recorded; give the URL "
            "with it (or set PGPASSWORD / use ~/.pgpass and leave it out of the URL)"
        )
    try:
        return RDBStorage(url)
    except ImportError as exc:
        missing = f"--storage {masked(url)}: the database driver is missing ({one_line(exc)})"
        raise MinitrainError(
            f"{missing}; for PostgreSQL: pip install 'psycopg[binary]' and a URL postgresql+psycopg://..."
        ) from None
    except Exception as exc:
        raise MinitrainError(f"--storage {masked(url)}: cannot open the study database: {one_line(exc)}") from None


@dataclass
class Settings:
    """What a study measures; a command that continues it must ask for the same."""

    recipe: str
    space: dict[str, str]
    fixed: list[str]
    plugins: list[str]
    disabled: list[str]
    monitor: str
    direction: str

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def differences(self, other: dict[str, Any]) -> list[str]:
        return [
            f"{key} ({other.get(key)!r} in the study, {value!r} now)"
            for key, value in self.to_dict().items()
            if other.get(key) != value
        ]


def open_study(name: str, storage, settings: Settings, sampler, pruner):
    """Create the study or load it, and check that it measures what ``settings`` asks."""
    op = optuna()
    direction = "maximize" if settings.direction == "max" else "minimize"
    try:
        study = op.create_study(
            study_name=name, storage=storage, direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True
        )
    except ValueError as exc:  # an existing study with the other direction
        raise MinitrainError(f"study {name}: {one_line(exc)}") from None
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    measured = any(counts(t) for t in study.get_trials(deepcopy=False))
    if recorded is None or (recorded != settings.to_dict() and not measured):
        study.set_user_attr(SETTINGS_ATTR, settings.to_dict())  # new, or nothing measured yet
    elif differences := settings.differences(recorded):
        raise MinitrainError(
            f"study {name} searches something else: {'; '.join(differences)}. A study measures one "
            "search: continue it with the same recipe, space, --set, plugins and metric, "
            "or start another (--study NEW)"
        )
    if study.direction.name.lower() != direction:
        raise MinitrainError(
            f"study {name} {study.direction.name.lower()}s its metric; this command asks to "
            f"{direction} it (--direction; or start another study: --study NEW)"
        )
    return study


def write_sweep_file(folder: Path, name: str, storage_url: str | None, settings: Settings) -> None:
    path = folder / SWEEP_FILE
    if path.is_file():
        return
    text = (
        json.dumps(
            {
                "study": name,
                "storage": masked(storage_url),
                "settings": settings.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )
    write_atomic(path, lambda file: file.write(text.encode()), what="sweep file")


def read_sweep_file(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def trial_dir_name(number: int) -> str:
    return f"trial-{number:04d}"


# --- which trials count, and which are lost -------------------------------------------------------


def counts(trial) -> bool:
    """Whether a finished trial counts towards ``--trials``: it ran to an outcome (complete,
    pruned, or failed while training), rather than being cut short by its sweep's end."""
    state = trial.state.name
    if state in ("COMPLETE", "PRUNED"):
        return True
    attrs = trial.user_attrs
    return state == "FAIL" and "error" in attrs and not attrs.get("bad_input") and not attrs.get("surplus")


def owner() -> dict[str, Any]:
    """Who runs a trial: this host and process (its start time tells a reused pid apart)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "alive": time.time(),
    }


def _process_start(pid: int) -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, counted after the command name
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return start is None or _process_start(pid) == start


def is_lost(trial, now: float | None = None) -> bool:
    """A RUNNING trial whose sweep is gone: on this host, its process has ended; elsewhere, it has
    not said it is alive for ``STALE_AFTER_S``."""
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    if not _owned(trial):  # asked for, its owner never written whole (or being written now)
        return now - _started(trial, now) > ORPHAN_AFTER_S
    if attrs.get("host") == socket.gethostname() and "pid" in attrs:
        return not _process_alive(attrs["pid"], attrs.get("pid_start"))
    return now - (attrs.get("alive") or _started(trial, now)) > STALE_AFTER_S


def _owned(trial) -> bool:
    return all(key in trial.user_attrs for key in OWNER_KEYS)


def _started(trial, now: float) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else now


def orphan_wait(study, now: float | None = None) -> float:
    """Seconds until every RUNNING trial without an owner is old enough to be taken for lost (0:
    there is none). A sweep that finds its study full only because of such trials waits this long
    and looks again, rather than stopping short of ``--trials``."""
    op = optuna()
    now = time.time() if now is None else now
    ages = [
        now - _started(t, now)
        for t in study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,))
        if not _owned(t)
    ]
    return max((ORPHAN_AFTER_S - age + 0.1 for age in ages), default=0.0)


def fail_lost_trials(study) -> list[int]:
    """Mark the study's lost trials failed and queue their parameters again; returns their numbers."""
    op = optuna()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,)):
        if not is_lost(trial):
            continue
        try:
            study.tell(trial.number, state=op.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue  # another sweep process got there first
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
        failed.append(trial.number)
    return failed


def taken(study, before: int | None = None) -> int:
    """Trials that count or may yet count (running), among those numbered below ``before``."""
    op = optuna()
    running = op.trial.TrialState.RUNNING
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if (before is None or t.number < before) and (counts(t) or t.state == running)
    )
