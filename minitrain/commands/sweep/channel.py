"""The line between a sweep and one of its trials.

A trial is an ordinary ``minitrain run`` in a child process; the sweep gives it one end of a
socket pair and puts its file descriptor in ``MINITRAIN_SWEEP_CHANNEL``. The ``prune`` plugin, in
the trial, sends a ``report`` after every validation (``final`` after the last epoch, which is
not judged) and waits for the answer (prune or go on), and an ``end`` when the fit ends. Messages are JSON objects; only the sweep talks to Optuna, so a trial
needs neither Optuna nor the study's storage (nor its password).
"""
from __future__ import annotations

import json
import os
from multiprocessing.connection import Connection
from typing import Any

CHANNEL_ENV = "MINITRAIN_SWEEP_CHANNEL"


def connect() -> Connection | None:
    """This trial's end of the channel, or None in a run that no sweep started."""
    fd = os.environ.get(CHANNEL_ENV)
    if not fd:
        return None
    try:
        return Connection(os.dup(int(fd)))
    except (OSError, ValueError):
        return None


def send(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def receive(conn: Connection) -> dict[str, Any]:
    """The next message; EOFError when the other side is gone."""
    return json.loads(conn.recv_bytes())
