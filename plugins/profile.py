"""``torch.profiler`` over a window of training steps: skip ``wait`` steps, warm up for ``warmup``,
record ``active``; then write the trace and print the operators that took the most time.

    minitrain run recipe.py --plugin profile:wait=10,warmup=2,active=5

Written into the run directory: ``profile/trace.json``, a Chrome trace (open it in
https://ui.perfetto.dev or ``chrome://tracing``), and ``profile/tensorboard/``, TensorBoard's
profile (``tensorboard --logdir RUN_DIR/profile/tensorboard`` with the torch-tb-profiler plugin).
The table of the top operators goes to the console. Before the window a step costs a counter;
once the trace is written the plugin leaves the run, so the steps after it cost nothing.

PyTorch's profiler library (Kineto) logs from C++ straight to the process's standard error:
``USDT: ... profiler_start`` and ``profiler_stop`` at every window, and on a machine without a
GPU ``ERROR: ... gpuGetDeviceCount failed with code 35``, even when it is told to record the CPU
only (as it is here on the CPU). ``KINETO_LOG_LEVEL=6`` would hide them, but Kineto reads it once,
when a process first profiles, and it hides its real errors too. So while the profiler starts,
steps and stops, file descriptor 2 goes to a temporary file, and what was written there goes on
to standard error afterwards, less those lines (:func:`kineto_noise`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl

FOLDER = "profile"
KINETO_LINE = re.compile(r"^(?P<severity>[A-Z]+):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] (?P<message>.*)")
"""A line Kineto logs: ``USDT:2026-12-03 01:58:17 10833:10833 SyncActivityProfilerHandler.cpp:39] profiler_start``."""


def kineto_noise(line: str, cuda: bool) -> bool:
    """Whether ``line`` is one Kineto writes that says nothing to a user: its ``USDT`` markers
    (for tracing tools: ``profiler_start``, ``profiler_stop``) and, in a run that is not on a GPU,
    that it found no GPU (``gpuGetDeviceCount failed``)."""
    found = KINETO_LINE.match(line)
    if found is None:
        return False
    return found["severity"] == "USDT" or (not cuda and found["message"].startswith("gpuGetDeviceCount failed"))


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
        self.cuda = False  # (set by on_fit_start)

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
        with self._quiet():
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
        with self._quiet():
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
        with self._quiet():
            self.profiler.stop()
        self.profiler = None
        trainer.remove_plugin(self)  # the window is over: no more calls at every step

    @hookimpl
    def on_fit_end(self, trainer) -> None:
        if self.profiler is not None:  # the run ended inside the window: keep what was recorded
            self._finish(trainer)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Standard error (file descriptor 2, which Kineto writes to from C++) into a temporary
        file for the block, then on to standard error, less Kineto's noise (:func:`kineto_noise`).
        Where there is no descriptor 2 to redirect, the block runs as it is."""
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None:
            yield
            return
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.flush()  # what Python wrote meanwhile, in its place among the lines
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                lines = capture.read().splitlines(keepends=True)
                kept = memoryview(
                    b"".join(line for line in lines if not kineto_noise(line.decode(errors="replace"), self.cuda))
                )
                while kept:  # the bytes as they were written, whatever their encoding
                    kept = kept[os.write(2, kept) :]
