"""What a run directory says about its run, read from its event log and ``run.json`` alone: the
recipe, how the run ended, its epochs and metrics, how long it took. ``minitrain runs`` lists run
directories with it, ``minitrain compare`` draws several runs from it, and the ``viz`` and
``mlflow`` plugins state the same status and times.

A run's status is that of its last start (a resumed run has one ``FitStart`` per start in its
log), from the event that ended it:

* ``finished``: ``FitEnd`` without a stop reason; ``stopped``: ``FitEnd`` with one (early
  stopping, a plugin's stop request);
* ``failed``: ``ExceptionRaised``; ``interrupted``: ``Interrupted`` (Ctrl-C, SIGTERM);
* ``running``: none of these yet, and a process holds the run directory's lock;
* ``killed``: none of these, and no process holds the lock: the process ended without a word
  (SIGKILL, the out-of-memory killer, a lost machine). A run from before minitrain locked its
  run directories cannot tell the two apart and shows ``running``, with how long its log has
  been quiet.

What a resume redoes replaces what was recorded before it: a start at epoch E drops the earlier
records of epoch E and later, and of the steps after its first.

A run's duration is its wall time, and :func:`wall_time` is the one place that computes it, for
``runs``, ``compare`` and ``viz``'s report alike: the last start's wall time, from ``run.json``'s
start time (written once the recipe is built, so set-up such as ``torch.compile`` counts) to the
log's last write, or to now while it runs, plus, for each earlier start, the training time of its
epochs (the log does not record when an earlier start ended, so its set-up, validation and the
part of an epoch it did not finish are left out).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import read_json
from minitrain.engine.lock import in_use
from minitrain.records.losses import MEAN, per_sample, per_sample_metrics, recorded_reduction

STATUSES = ("finished", "stopped", "failed", "interrupted", "running", "killed")
FINAL = {"FitEnd", "ExceptionRaised", "Interrupted"}
QUIET = 15 * 60
"""Seconds without a line in the log after which a running run is shown as quiet."""
_BATCH_START = '{"event":"BatchStart"'
_BATCH_END = '{"event":"BatchEnd"'
_HIGHER_IS_BETTER = ("acc", "f1", "precision", "recall", "auc", "iou", "dice", "map", "r2", "samples_per_s")


@dataclass
class Run:
    """One run directory, as its files describe it."""

    path: Path
    recipe: str | None = None  # the recipe's name (its file's stem)
    recipe_path: str | None = None
    status: str = "unknown"  # one of STATUSES, or "unknown" when there is no event log
    stop_reason: str | None = None
    error: str | None = None  # "Type: message" of the ExceptionRaised that ended it
    signal: str | None = None  # of the Interrupted that ended it
    epochs: int | None = None  # the epochs the last start was asked for
    epochs_done: int = 0
    global_step: int = 0
    steps_per_epoch: int | None = None
    device: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    plugins: dict[str, dict] = field(default_factory=dict)
    starts: int = 0  # FitStarts in the log
    started: float | None = None  # when the first start began (seconds since the epoch)
    last_start: float | None = None  # when the last start began (run.json), to the second
    last_write: float | None = None  # the log's last change
    training_times: list[float] = field(default_factory=list)  # training time (epoch_time) of each start's epochs
    duration: float | None = None  # wall time (see wall_time)
    epoch_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch (from 1) -> EpochEnd metrics
    steps: list[tuple[int, float]] | None = None  # (global step, batch loss), when read with steps=True
    loss_reduction: str = MEAN  # "sum": the training losses above were summed per batch, and are shown per sample
    bad_lines: int = 0  # lines that are not JSON (a last line cut short by a kill)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def quiet_for(self) -> float | None:
        """Seconds since the log last changed, for a run that has not ended."""
        if self.status != "running" or self.last_write is None:
            return None
        return max(0.0, time.time() - self.last_write)

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(epoch, value)`` of an epoch metric, in epoch order."""
        return [(epoch, m[metric]) for epoch, m in sorted(self.epoch_metrics.items()) if metric in m]

    def best(self, metric: str) -> float | None:
        values = [v for _, v in self.values(metric) if not math.isnan(v)]
        if not values:
            return None
        return max(values) if higher_is_better(metric) else min(values)

    def last(self, metric: str) -> float | None:
        values = self.values(metric)
        return values[-1][1] if values else None

    @property
    def final_metrics(self) -> dict[str, float]:
        return dict(self.epoch_metrics[max(self.epoch_metrics)]) if self.epoch_metrics else {}

    def settings(self) -> dict[str, str]:
        """The recipe config and the plugins' options, flattened to ``key: value`` text (plugin
        options as ``plugin.NAME.OPTION``; the set of plugins as ``plugins``)."""
        flat = flatten(self.config)
        for plugin, options in sorted(self.plugins.items()):
            flat.update(flatten(options, f"plugin.{plugin}"))
        flat["plugins"] = ",".join(sorted(self.plugins))
        return flat

    def to_json(self, metric: str | None = None) -> dict[str, Any]:
        data = {
            "run": str(self.path),
            "name": self.name,
            "recipe": self.recipe,
            "status": self.status,
            "stop_reason": self.stop_reason,
            "error": self.error,
            "signal": self.signal,
            "epochs_done": self.epochs_done,
            "epochs": self.epochs,
            "global_step": self.global_step,
            "starts": self.starts,
            "device": self.device,
            "duration_s": self.duration,
            "started": _iso(self.started),
            "last_write": _iso(self.last_write),
            "quiet_s": self.quiet_for,
            "metrics": self.final_metrics,
            "bad_lines": self.bad_lines,
            "loss_reduction": self.loss_reduction,
        }
        if metric:
            data |= {"metric": metric, "best": self.best(metric), "last": self.last(metric)}
        return data


def higher_is_better(metric: str) -> bool:
    """Which way a metric improves, from its name (accuracies, F1, AUC... up; losses, errors down)."""
    name = metric.lower()
    return any(word in name for word in _HIGHER_IS_BETTER) and "loss" not in name and "err" not in name


def read_run(path: str | Path, steps: bool = False) -> Run:
    """Read one run directory; ``steps`` also keeps every batch loss of the log (for curves). A
    training loss summed over each batch (``run.json``'s ``loss_reduction``) is read per sample."""
    path = Path(path)
    info = read_json(path / "run.json")
    run = Run(path, steps=[] if steps else None)
    run.recipe_path = info.get("recipe")
    run.recipe = Path(run.recipe_path).stem if run.recipe_path else None
    run.plugins = info.get("plugins") or {}
    run.device = info.get("device")
    run.loss_reduction = recorded_reduction(info)
    run.config = read_json(path / "config.json")
    starts = [t for t in (parse_time(h.get("started")) for h in info.get("history") or []) if t is not None]
    run.started = starts[0] if starts else None
    run.last_start = starts[-1] if starts else None
    log = path / (info.get("event_log") or "events.jsonl")
    if not log.is_file():
        return run
    run.last_write = log.stat().st_mtime
    run.status = "running"
    final: dict | None = None
    with open(log, encoding="utf-8", errors="replace") as file:
        for line in file:
            if line.startswith(_BATCH_START):
                continue
            if line.startswith(_BATCH_END):
                if steps:
                    assert run.steps is not None  # a list whenever steps=True
                    try:
                        data = json.loads(line)
                        loss = per_sample(float(data["loss"]), data.get("batch_size"), run.loss_reduction)
                        run.steps.append((data["global_step"], loss))
                    except (ValueError, KeyError, TypeError):
                        run.bad_lines += 1
                continue
            try:
                data = json.loads(line)
            except ValueError:
                run.bad_lines += 1 if line.strip() else 0
                continue
            kind = data.get("event") if isinstance(data, dict) else None
            try:
                final = _follow(run, kind, data, final)
            except (KeyError, TypeError, ValueError, AttributeError):  # a line of the wrong shape
                run.bad_lines += 1
    run.epochs_done = max(run.epoch_metrics, default=0)
    batch_size = run.config.get("batch_size") if isinstance(run.config.get("batch_size"), int) else None
    run.epoch_metrics = {e: per_sample_metrics(m, batch_size, run.loss_reduction) for e, m in run.epoch_metrics.items()}
    if final is not None:
        kind = final["event"]
        if kind == "FitEnd":
            run.stop_reason = final.get("stop_reason")
            run.status = "stopped" if run.stop_reason else "finished"
        elif kind == "ExceptionRaised":
            run.status, run.error = "failed", f"{final.get('error_type')}: {final.get('message')}"
        else:
            run.status, run.signal = "interrupted", final.get("signal")
    elif in_use(path) is False:
        run.status = "killed"
    end = run.last_write
    if run.status == "running" and (run.quiet_for or 0) < QUIET:
        end = time.time()
    run.duration = wall_time(run.training_times, run.last_start, end)
    return run


def wall_time(training_times: list[float], last_start: float | None, end: float | None) -> float | None:
    """A run's duration, the one definition every report uses: the wall time of its last start
    (``last_start`` to ``end``) plus the training time of each earlier start's epochs
    (``training_times``: the epochs' training time per start, as the log records no clock time of an
    earlier start's end). Without the last start's times, its epochs' training time stands in;
    ``None`` for a run with no start in its log."""
    if not training_times:
        return None
    earlier = sum(training_times[:-1])
    if last_start is None or end is None or end < last_start:
        return earlier + training_times[-1]
    return earlier + (end - last_start)


def _follow(run: Run, kind: str | None, data: dict, final: dict | None) -> dict | None:
    """Take one event (not a per-step one) into ``run``; returns the final event of the current
    start, if it has one yet."""
    if kind == "FitStart":  # a start: what it redoes replaces what was recorded before
        run.starts += 1
        start_epoch, step = data.get("start_epoch", 1), data.get("global_step", 0)
        run.epoch_metrics = {e: m for e, m in run.epoch_metrics.items() if e < start_epoch}
        if run.steps:
            run.steps = [(s, loss) for s, loss in run.steps if s <= step]
        run.epochs, run.steps_per_epoch = data.get("epochs"), data.get("steps_per_epoch")
        run.device = data.get("device") or run.device
        run.config = data.get("config") or run.config
        run.global_step = step
        run.training_times.append(0.0)
        return None
    if kind == "EpochEnd":
        metrics = data.get("metrics") or {}
        run.epoch_metrics[int(data["epoch"])] = metrics
        run.global_step = data.get("global_step", run.global_step)
        if run.training_times:
            run.training_times[-1] += float(metrics.get("epoch_time", 0.0))
    elif kind in FINAL:
        run.global_step = data.get("global_step", run.global_step)
        return data
    return final


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory (one holding ``run.json``) at or under ``root``, not looking inside
    run directories or hidden folders."""
    root = Path(root)
    if not root.is_dir():
        raise MinitrainError(f"{root} is not a directory")
    found = []
    for folder, subfolders, files in os.walk(root):
        if "run.json" in files:
            found.append(Path(folder))
            subfolders.clear()
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
    return found


def check_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MinitrainError(f"{path} is not a directory")
    if not (path / "run.json").is_file():
        raise MinitrainError(f"{path} is not a minitrain run directory (it has no run.json)")
    return path


def differing(runs: list[Run]) -> dict[str, list[str]]:
    """The settings whose values are not the same in every run (``-``: the run has no such
    setting), as key -> one value per run. A plugin's options count only where every run has
    the plugin: otherwise ``plugins`` already shows the difference."""
    settings = [run.settings() for run in runs]
    everywhere = set.intersection(*(set(run.plugins) for run in runs)) if runs else set()
    keys = sorted({key for s in settings for key in s})
    out = {}
    for key in keys:
        if key.startswith("plugin.") and key.split(".")[1] not in everywhere:
            continue
        values = [s.get(key, "-") for s in settings]
        if len(set(values)) > 1:
            out[key] = values
    return out


def main_metric(runs: list[Run], wanted: str | None = None) -> str | None:
    """The metric a table of runs leads with: ``wanted``, else the first of val_acc, val_loss and
    train_loss that some run reports."""
    if wanted:
        return wanted
    for metric in ("val_acc", "val_loss", "train_loss"):
        if any(run.values(metric) for run in runs):
            return metric
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; strings as they are, anything else as JSON."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if not prefix:
        return {}
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch from ``run.json``'s ``2024-05-01T12:00:00+0200``."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")
