"""The JSONL log on the CPU: what it holds back, when it writes, and that its own formatting of the
per-step lines says what pydantic's serialiser says. (Accelerators: tests/test_speedrun.py.)"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from minitrain.engine import events as ev
from minitrain_plugins.jsonl import JsonlLog

CPU = SimpleNamespace(device=torch.device("cpu"))


def fit_start(run_dir) -> ev.FitStart:
    return ev.FitStart(epochs=1, start_epoch=1, global_step=0, steps_per_epoch=None, device="cpu", run_dir=str(run_dir))


def step_events(step: int, loss) -> list[ev.Event]:
    return [
        ev.BatchStart(epoch=1, batch_idx=step, global_step=step, batch_size=8),
        ev.BatchEnd(epoch=1, batch_idx=step, global_step=step + 1, batch_size=8, loss=loss),
    ]


def same_json(a: str, b: str) -> bool:
    """Equal once parsed, NaN equal to NaN (the texts may differ in how an exponent is written)."""

    def normal(value):
        return "NaN" if isinstance(value, float) and math.isnan(value) else value

    return {k: normal(v) for k, v in json.loads(a).items()} == {k: normal(v) for k, v in json.loads(b).items()}


@pytest.mark.parametrize("loss", [2.302585124969482, 0.0, -0.0, 1e-7, 1e16, 5e-324, math.nan, math.inf, -math.inf])
def test_per_step_lines_say_what_pydantic_says(tmp_path, loss):
    plugin = JsonlLog(JsonlLog.Config())
    plugin.on_fit_start(fit_start(tmp_path), CPU)
    sent = [
        fit_start(tmp_path),
        *step_events(0, torch.tensor(loss, dtype=torch.float64)),
        *step_events(1, torch.tensor(loss, dtype=torch.float32)),
    ]
    for event in sent:
        plugin.on_event(event)
    plugin.on_event(ev.FitEnd(epochs_completed=1, global_step=2, metrics={}))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    for event, line in zip(sent, lines):
        assert same_json(line, event.to_json()), (line, event.to_json())
    assert all(ev.Event.from_json(line) for line in lines)  # and replay reads them back


def test_per_step_lines_are_held_and_written_in_groups(tmp_path):
    plugin = JsonlLog(JsonlLog.Config(flush_every=3, flush_secs=3600))
    plugin.on_fit_start(fit_start(tmp_path), CPU)
    path = tmp_path / "events.jsonl"
    plugin.on_event(fit_start(tmp_path))
    written = []
    for step in range(7):
        for event in step_events(step, torch.tensor(1.0)):
            plugin.on_event(event)
        written.append(len(path.read_text().splitlines()))
    assert written == [1, 1, 7, 7, 7, 13, 13]  # every third step writes its group of three
    plugin.on_event(ev.EpochEnd(epoch=1, global_step=7, metrics={}))  # not a per-step event: at once
    assert len(path.read_text().splitlines()) == 16
    plugin.on_event(ev.FitEnd(epochs_completed=1, global_step=7, metrics={}))
    assert plugin.file is None and len(path.read_text().splitlines()) == 17


def test_per_step_lines_are_held_no_longer_than_flush_secs(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("minitrain_plugins.jsonl.time.monotonic", lambda: clock[0])
    plugin = JsonlLog(JsonlLog.Config(flush_every=1000, flush_secs=2))
    plugin.on_fit_start(fit_start(tmp_path), CPU)
    path = tmp_path / "events.jsonl"
    plugin.on_event(fit_start(tmp_path))
    written = []
    for step in range(4):
        clock[0] += 1.5
        for event in step_events(step, torch.tensor(1.0)):
            plugin.on_event(event)
        written.append(len(path.read_text().splitlines()))
    assert written == [1, 5, 5, 9]  # at 101.5 held (due 102); at 103 written; due again at 105


def test_flush_every_one_writes_every_step(tmp_path):
    plugin = JsonlLog(JsonlLog.Config(flush_every=1))
    plugin.on_fit_start(fit_start(tmp_path), CPU)
    for step in range(3):
        for event in step_events(step, torch.tensor(1.0)):
            plugin.on_event(event)
        assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 2 * (step + 1)


def test_a_failed_run_writes_everything_held(tmp_path):
    plugin = JsonlLog(JsonlLog.Config(flush_secs=3600))
    plugin.on_fit_start(fit_start(tmp_path), CPU)
    for step in range(5):
        for event in step_events(step, torch.tensor(1.0)):
            plugin.on_event(event)
    plugin.on_event(ev.ExceptionRaised(epoch=1, global_step=5, error_type="RuntimeError", message="boom", traceback=""))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 11 and json.loads(lines[-1])["event"] == "ExceptionRaised"
