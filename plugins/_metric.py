"""What the plugins that watch an epoch metric (checkpoint, early_stopping) share: which metric and
which way is better, checked before the run starts, and whether a value beats the best so far."""

from __future__ import annotations

import math
import re
from typing import Literal

from minitrain.engine.errors import MinitrainError

Mode = Literal["auto", "min", "max"]


def resolve_monitor(plugin: str, monitor: str | None, mode: Mode, trainer) -> tuple[str, Literal["min", "max"]]:
    """The metric to watch and which way is better. ``monitor=None``: ``val_loss`` when the run
    validates, else ``train_loss``. A metric the run never reports is an error naming those it
    does. ``auto``: the direction the recipe's torchmetrics metric declares (``higher_is_better``),
    else max for accuracies and min for everything else (losses)."""
    names = trainer.metric_names()
    monitor = monitor or ("val_loss" if "val_loss" in names else "train_loss")
    base = next((n for n in names if monitor == n or re.fullmatch(rf"{re.escape(n)}(_\d+)+", monitor)), None)
    if base is None:
        raise MinitrainError(
            f"{plugin}: monitor {monitor!r} is not a metric this run reports (it reports {', '.join(names)})"
        )
    if mode == "auto":
        return monitor, trainer.metric_mode(base) or ("max" if "acc" in monitor.lower() else "min")
    return monitor, mode


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta``. A NaN never improves; any
    other value improves on nothing (``best=None``)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
