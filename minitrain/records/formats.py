"""Figures as a person reads them in a table, a page or a report: durations and metric values."""

from __future__ import annotations


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
