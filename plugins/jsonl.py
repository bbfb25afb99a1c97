"""Every event, one JSON line each, to ``events.jsonl`` in the run directory.

Lines are flushed as they are written, so a crash loses at most the lines not yet written. On
an accelerator the log never makes the host wait for the device: events queue, in order, and
every ``flush_every`` steps — and at each event that is not a per-step one (epoch boundaries) —
the queue becomes a group whose batch losses are copied to the host in the background. A group
is written at a later ``BatchEnd``, once its copy has landed (by then the device is busy with
steps queued since), and every group is written at the end of the run.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.device import HostCopy
from minitrain.events import BatchEnd, BatchStart, Event, ExceptionRaised, FitEnd, Interrupted

FINAL = (FitEnd, ExceptionRaised, Interrupted)
PER_STEP = (BatchStart, BatchEnd)


class JsonlLog:
    enabled_by_default = True
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        filename: str = "events.jsonl"
        flush_every: int = Field(100, ge=1, description="steps between writes of held-back events (accelerators only)")

    def __init__(self, config: Config):
        self.config = config
        self.file = None
        self.held: list[Event] = []  # queued, not yet grouped
        self.groups: deque[tuple[list[Event], HostCopy | None]] = deque()  # with their losses' copy

    @hookimpl(tryfirst=True)
    def on_fit_start(self, event, trainer) -> None:
        if event.run_dir is None:
            return
        # unbuffered: each group of lines reaches the OS in one write, with no separate flush
        self.file = open(Path(event.run_dir) / self.config.filename, "ab", buffering=0)
        self.defer = trainer.device.type != "cpu"

    @hookimpl
    def on_event(self, event) -> None:
        if self.file is None:
            return
        if not self.defer:
            self._write([event])
        else:
            self.held.append(event)
            if not isinstance(event, PER_STEP) or len(self.held) >= 2 * self.config.flush_every:
                self._group()
            if isinstance(event, (*FINAL, BatchEnd)):
                self._write_groups(wait=isinstance(event, FINAL))
        if isinstance(event, FINAL):
            self.file.close()
            self.file = None

    def _group(self) -> None:
        losses = [e.loss for e in self.held if isinstance(e, BatchEnd)]
        self.groups.append((self.held, HostCopy(torch.stack(losses)) if losses else None))
        self.held = []

    def _write_groups(self, wait: bool) -> None:
        while self.groups and (wait or self.groups[0][1] is None or self.groups[0][1].ready()):
            events, copy = self.groups.popleft()
            losses = iter(copy.get().tolist() if copy is not None else [])
            self._write([e.model_copy(update={"loss": next(losses)}) if isinstance(e, BatchEnd) else e
                         for e in events])

    def _write(self, events: list[Event]) -> None:
        self.file.write("".join(e.to_json() + "\n" for e in events).encode())
