"""How minitrain draws a run's curves, in ``viz``'s plots and ``compare``'s page alike: one colour
per run, a smoothed line over faint raw values, whole epochs on the x axis, and a log scale for
values spread over decades."""

from __future__ import annotations

import math
from collections.abc import Sequence

COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]  # matplotlib's tab10, in its order


def smooth(values: Sequence[float], span: int | None = None) -> list[float]:
    """An exponential moving average over about ``span`` points (default: a thirtieth of them),
    debiased so that it starts at the first value, as TensorBoard's smoothing does. Non-finite
    values are left out of the average (and come out as NaN)."""
    span = span or max(1, len(values) // 30)
    beta = 1 - 2 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        average = beta * average + (1 - beta) * value
        weight = beta * weight + (1 - beta)
        out.append(average / weight)
    return out


def log_scale_if_wide(ax, values: list[float]) -> None:
    """A log scale for positive values that span more than two decades (a run that diverged
    would otherwise flatten the others)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def epoch_axis(ax) -> None:
    """Whole epochs on the x axis; a single epoch is shown as 1 with room on both sides, rather
    than as ticks at 0.96, 0.98, ..."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    xs = {x for line in ax.get_lines() for x in line.get_xdata()}
    if len(xs) == 1:
        x = xs.pop()
        ax.set_xlim(x - 1, x + 1)
