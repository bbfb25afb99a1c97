"""Learning-rate schedules the recipes share."""

from __future__ import annotations

import torch


def triangular(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.2, start: float = 0.0, end: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear rise from ``start`` to 1 over the first ``warmup`` fraction of steps, then linear
    fall to ``end`` (factors of each group's base lr), held after ``total_steps``; stepped once
    per optimizer step. Size it in a recipe's ``make_scheduler`` with ``steps.total``, the steps
    the run really makes, so that it ends where the run does."""
    peak = max(1, round(total_steps * warmup))

    def factor(step: int) -> float:
        if step < peak:
            return start + (1 - start) * step / peak
        return max(end, 1 - (1 - end) * (step - peak) / max(1, total_steps - peak))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
