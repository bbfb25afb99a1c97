"""Every event, one JSON line each, to ``events.jsonl`` in the run directory.

An event that is not a per-step one (fit, epoch, validation, checkpoint, failure) is written at
once, with everything held before it (on an accelerator, once the losses held before it have
reached the host, see below). The per-step events, ``BatchStart`` and ``BatchEnd``, are
held and written together, every ``flush_every`` steps or ``flush_secs`` seconds, whichever comes
first: writing and formatting two lines at every step cost more than the rest of the framework
did (benchmarks/overhead.py). A process killed outright therefore loses at most that many steps
of per-step lines, never an epoch's; a run that fails or is interrupted writes everything.
``flush_every=1`` writes every line as it comes.

On an accelerator the log never makes the host wait for the device: a group's batch losses are
copied to the host in the background, and the group is written at a later ``BatchEnd``, once its
copy has landed (by then the device is busy with steps queued since), or at the end of the run.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.device import HostCopy
from minitrain.engine.events import BatchEnd, BatchStart, Event, ExceptionRaised, FitEnd, Interrupted
from minitrain.engine.files import check_writable

FINAL = (FitEnd, ExceptionRaised, Interrupted)


class JsonlLog:
    enabled_by_default = True
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        filename: str = "events.jsonl"
        flush_every: int = Field(100, ge=1, description="most steps whose per-step lines are held before writing")
        flush_secs: float = Field(2.0, gt=0, description="longest time in seconds a per-step line is held")

    def __init__(self, config: Config):
        self.config = config
        self.event_log = config.filename  # recorded in run.json, where report and replay look for it
        self.file: BinaryIO | None = None
        self.held: list[Event] = []  # not yet grouped
        self.held_limit = 2 * config.flush_every  # two events per step
        self.deadline = 0.0  # when the held events must be grouped, whatever their number
        self.groups: deque[tuple[list[Event], HostCopy | None]] = deque()  # with their losses' copy

    @hookimpl
    def check(self, trainer) -> None:
        if trainer.run_dir is not None:
            check_writable((Path(trainer.run_dir) / self.config.filename).parent, "jsonl folder")

    @hookimpl(tryfirst=True)
    def on_fit_start(self, event, trainer) -> None:
        if event.run_dir is None:
            return
        # unbuffered: each group of lines reaches the OS in one write, with no separate flush
        self.file = open(Path(event.run_dir) / self.config.filename, "ab", buffering=0)

    @hookimpl
    def on_event(self, event) -> None:
        held = self.held
        if self.file is None:
            return
        held.append(event)
        kind = type(event)
        if kind is BatchStart:
            return
        if kind is BatchEnd:
            if len(held) < self.held_limit and time.monotonic() < self.deadline:
                if self.groups:
                    self._write_groups(wait=False)
                return
        self._group()
        self._write_groups(wait=isinstance(event, FINAL))
        if isinstance(event, FINAL):
            self.file.close()
            self.file = None

    def _group(self) -> None:
        """Close the held events into a group, and start bringing its losses to the host: in one
        copy (on the CPU, one read) for the group, not one per line."""
        losses = [e.loss for e in self.held if type(e) is BatchEnd]
        self.groups.append((self.held, HostCopy(torch.stack(losses)) if losses else None))
        self.held = []
        self.deadline = time.monotonic() + self.config.flush_secs

    def _write_groups(self, wait: bool) -> None:
        """Write the groups that are ready, in order. The per-step events, most of the lines, are
        formatted here directly: pydantic's serialiser took twice as long."""
        while self.groups and (wait or self.groups[0][1] is None or self.groups[0][1].ready()):
            events, copy = self.groups.popleft()
            losses = iter(copy.get().tolist() if copy is not None else ())
            lines = []
            for e in events:
                if type(e) is BatchStart:
                    lines.append(
                        f'{{"event":"BatchStart","epoch":{e.epoch},"batch_idx":{e.batch_idx},'
                        f'"global_step":{e.global_step},"batch_size":{e.batch_size}}}\n'
                    )
                elif type(e) is BatchEnd:
                    loss = next(losses)
                    lines.append(
                        f'{{"event":"BatchEnd","epoch":{e.epoch},"batch_idx":{e.batch_idx},'
                        f'"global_step":{e.global_step},"batch_size":{e.batch_size},"loss":{_number(loss)}}}\n'
                    )
                else:
                    lines.append(e.to_json() + "\n")
            assert self.file is not None  # on_event writes only with the file open
            self.file.write("".join(lines).encode())


def _number(value: float) -> str:
    """As pydantic writes a float into JSON, NaN and infinities included (a test compares them)."""
    if value - value == 0:  # finite
        return repr(value)
    return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
