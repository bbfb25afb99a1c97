"""``torch.profiler`` over a window of training steps: skip ``wait`` steps, warm up for ``warmup``,
record ``active``; then write the trace and print the operators that took the most time.

    minitrain run recipe.py --plugin profile:wait=10,warmup=2,active=5

Written into the run directory: ``profile/trace.json``, a Chrome trace (open it in
https://ui.perfetto.dev or ``chrome://tracing``), and ``profile/tensorboard/``, TensorBoard's
profile (``tensorboard --logdir RUN_DIR/profile/tensorboard`` with the torch-tb-profiler plugin).
The table of the top operators goes to the console. Before the window a step costs a counter;
once the trace is written the plugin leaves the run, so the steps after it cost nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl

FOLDER = "profile"


class Profile:
    enabled_by_default = False
    role = "observer"  # it watches; a failure disables it and training goes on
    main_process_only = True  # under torchrun, rank 0 is profiled

    class Config(PluginConfig):
        wait: int = Field(5, ge=0, description="steps to skip first (start-up, first compilations)")
        warmup: int = Field(2, ge=0, description="steps the profiler runs without recording")
        active: int = Field(5, ge=1, description="steps recorded")
        record_shapes: bool = Field(False, description="record operator input shapes")
        memory: bool = Field(False, description="record memory allocations")
        with_stack: bool = Field(False, description="record Python stacks (costly)")
        top: int = Field(15, ge=0, description="operators printed, by total time (0: none)")

    def __init__(self, config: Config):
        self.config = config
        self.profiler: torch.profiler.profile | None = None
        self.steps = 0
        self.folder: Path | None = None

    @hookimpl
    def on_fit_start(self, event, trainer) -> None:
        self.folder = Path(event.run_dir) / FOLDER if event.run_dir else None
        self.cuda = trainer.device.type == "cuda"

    @hookimpl
    def on_batch_end(self, trainer) -> None:
        self.steps += 1
        if self.profiler is None:
            if self.steps == self.config.wait:
                self._start()
            return
        self.profiler.step()
        if self.steps >= self.config.wait + self.config.warmup + self.config.active:
            self._finish(trainer)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if self.cuda else []
        )
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=self.config.warmup, active=self.config.active, repeat=1),
            on_trace_ready=self._write,
            record_shapes=self.config.record_shapes,
            profile_memory=self.config.memory,
            with_stack=self.config.with_stack,
        )
        self.profiler.start()

    def _write(self, profiler: torch.profiler.profile) -> None:
        if self.folder is not None:  # one trace, in TensorBoard's folder under the name its plugin looks for
            board = self.folder / "tensorboard"
            board.mkdir(parents=True, exist_ok=True)
            trace = board / f"{socket.gethostname()}_{os.getpid()}.{time.time_ns() // 1_000_000}.pt.trace.json"
            profiler.export_chrome_trace(str(trace))  # (a profile can be exported once)
            shutil.copyfile(trace, self.folder / "trace.json")
        if self.config.top:
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            print(
                f"profile of {self.config.active} steps (after {self.steps - self.config.active}), "
                f"top {self.config.top} operators by {sort.replace('_', ' ')}:",
                flush=True,
            )
            print(profiler.key_averages().table(sort_by=sort, row_limit=self.config.top), flush=True)
        if self.folder is not None:
            print(f"profile: wrote {self.folder / 'trace.json'} and {self.folder / 'tensorboard'}", flush=True)

    def _finish(self, trainer) -> None:
        assert self.profiler is not None  # both callers check it
        self.profiler.stop()
        self.profiler = None
        trainer.remove_plugin(self)  # the window is over: no more calls at every step

    @hookimpl
    def on_fit_end(self, trainer) -> None:
        if self.profiler is not None:  # the run ended inside the window: keep what was recorded
            self._finish(trainer)
