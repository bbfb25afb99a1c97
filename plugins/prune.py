"""Pruning for sweeps: report the monitored metric to the study after every validation, and stop
the trial when the study's pruner rejects it.

``minitrain sweep`` enables it in every trial it starts, with the study's name and the trial's
number as options (so both are in the trial's ``run.json``) and the metric the study optimises:

    minitrain run RECIPE ... --plugin prune:study=NAME,trial=7,monitor=val_acc,direction=max

After each epoch that validated it sends ``monitor`` to the sweep, which reports it to Optuna
(``trial.report(value, epoch)``) and asks the pruner (``trial.should_prune()``), except after the
last epoch: a trial that has trained all its epochs is complete. A rejected trial
is stopped through ``trainer.request_stop``, so it ends between two steps like an early-stopped
run, with ``FitEnd.stop_reason`` saying it was pruned; the sweep records it as pruned. When the
fit ends it sends the final value. Outside a sweep there is no study to report to, and the
plugin refuses to start.

**The channel** between the sweep and the trial is defined here, at the trial's end: the sweep
gives the trial one end of a socket pair and puts its file descriptor in ``CHANNEL_ENV``; the
plugin sends a ``report`` after every validation and waits for the answer (prune or go on), and
an ``end`` when the fit ends. Messages are JSON objects. Only the sweep talks to Optuna, so a
trial needs neither Optuna nor the study's storage (nor its password).
"""

from __future__ import annotations

import json
import os
from multiprocessing.connection import Connection
from typing import Any, Literal

from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import MinitrainError
from minitrain_plugins._metric import resolve_monitor

NAME = "prune"
"""Its entry point's name (pyproject.toml), by which `minitrain sweep` enables it in each trial."""
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


class Prune:
    enabled_by_default = False
    role = "critical"  # it decides when a trial ends
    main_process_only = True  # one line to the sweep; under torchrun a stop reaches every rank

    class Config(PluginConfig):
        study: str = Field(description="the Optuna study this run is a trial of (set by minitrain sweep)")
        trial: int = Field(ge=0, description="the trial's number in the study (set by minitrain sweep)")
        monitor: str = Field("val_acc", description="the epoch metric the study optimises")
        direction: Literal["max", "min"] = Field("max", description="whether the study maximises or minimises it")

    def __init__(self, config: Config):
        self.config = config
        self.conn: Connection | None = None  # set by check, which fails without one
        self.last: float | None = None  # the last value reported

    @hookimpl
    def check(self, trainer) -> None:
        monitor, mode = resolve_monitor("prune", self.config.monitor, "auto", trainer)
        declared = trainer.metric_mode(monitor)
        if declared is not None and declared != self.config.direction:
            better = "higher" if declared == "max" else "lower"
            raise MinitrainError(
                f"prune: the study {'maximises' if self.config.direction == 'max' else 'minimises'} "
                f"{monitor}, but for this recipe {better} is better; use --direction {declared}"
            )
        self.conn = connect()
        if self.conn is None:
            raise MinitrainError(
                "prune: this plugin reports to the study of a `minitrain sweep`, which enables it in "
                "the trials it starts; a run of its own has no study (leave --plugin prune out)"
            )

    @hookimpl
    def on_epoch_end(self, event, trainer) -> None:
        value = event.metrics.get(self.config.monitor)
        if value is None:
            return  # an epoch without validation (the validation plugin)
        self.last = value
        final = event.epoch >= trainer.epochs  # reported, but not judged: stopping now would save nothing
        assert self.conn is not None  # check() ensured it
        try:
            send(self.conn, {"kind": "report", "epoch": event.epoch, "value": value, "final": final})
            answer = receive(self.conn)
        except (EOFError, OSError):
            trainer.request_stop("the sweep that started this trial is gone")
            return
        if answer.get("prune"):
            trainer.request_stop(
                f"pruned by the sweep's {answer.get('pruner', '')} pruner: "
                f"{self.config.monitor} {value:.4g} after epoch {event.epoch}".replace("  ", " ")
            )

    @hookimpl
    def on_fit_end(self, event) -> None:
        value = event.metrics.get(self.config.monitor, self.last)
        assert self.conn is not None  # check() ensured it
        try:
            send(
                self.conn,
                {"kind": "end", "epochs": event.epochs_completed, "value": value, "stop_reason": event.stop_reason},
            )
        except OSError:
            pass  # the sweep is gone; it records nothing either way
