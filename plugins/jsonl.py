"""Every event, one JSON line each, to ``events.jsonl`` in the run directory.

Lines are flushed as they are written, so a crash loses at most the line being written. On an
accelerator, events that carry device tensors (a batch loss) are held back and written in a
group every ``flush_every`` steps and at every epoch boundary, so logging never forces a
host–device sync per step.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.events import BatchEnd, ExceptionRaised, FitEnd, Interrupted

FINAL = (FitEnd, ExceptionRaised, Interrupted)


class JsonlLog:
    enabled_by_default = True

    class Config(PluginConfig):
        filename: str = "events.jsonl"
        flush_every: int = Field(100, ge=1, description="steps between writes of held-back events (accelerators only)")

    def __init__(self, config: Config):
        self.config = config
        self.file = None
        self.held: list = []

    @hookimpl(tryfirst=True)
    def on_fit_start(self, event, trainer) -> None:
        if event.run_dir is None:
            return
        self.file = open(Path(event.run_dir) / self.config.filename, "a", encoding="utf-8")
        self.defer = trainer.device.type != "cpu"

    @hookimpl
    def on_event(self, event) -> None:
        if self.file is None:
            return
        if self.defer and isinstance(event, BatchEnd):
            self.held.append(event)
            if len(self.held) >= self.config.flush_every:
                self._write_held()
            return
        self._write_held()
        self.file.write(event.to_json() + "\n")
        self.file.flush()
        if isinstance(event, FINAL):
            self.file.close()
            self.file = None

    def _write_held(self) -> None:
        if not self.held:
            return
        losses = torch.stack([e.loss for e in self.held]).tolist()  # one sync for the group
        self.file.write("".join(e.model_copy(update={"loss": v}).to_json() + "\n" for e, v in zip(self.held, losses)))
        self.file.flush()
        self.held.clear()
