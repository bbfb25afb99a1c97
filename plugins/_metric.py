"""What the plugins that watch an epoch metric (checkpoint, early_stopping) share: which way is
better, whether a value beats the best so far, and a clear error for a metric that is not there."""
from __future__ import annotations

import math
from typing import Literal

from minitrain.errors import MinitrainError

Mode = Literal["auto", "min", "max"]


def resolve_mode(monitor: str, mode: Mode) -> Literal["min", "max"]:
    """``auto``: accuracies are better high, everything else (losses) low."""
    if mode != "auto":
        return mode
    return "max" if "acc" in monitor.lower() else "min"


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta``. A NaN never improves; any
    other value improves on nothing (``best=None``)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def read_metric(plugin: str, monitor: str, metrics: dict[str, float]) -> float:
    if monitor not in metrics:
        raise MinitrainError(f"{plugin}: monitor {monitor!r} is not an epoch metric "
                             f"(available: {', '.join(sorted(metrics)) or 'none'})")
    return metrics[monitor]
