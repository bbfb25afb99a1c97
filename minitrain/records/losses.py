"""The training loss as a person reads it: per sample.

A recipe may train on a loss summed over each batch rather than averaged (the speedrun recipe's
``CrossEntropyLoss(reduction="sum")``, whose gradient grows with the batch). The optimizer gets
that sum as it is; what is shown (the console, ``viz``'s plot and report, ``runs``, ``compare``,
``lr-find``) is divided by the batch's size, so that the training loss reads on the scale of the
validation loss beside it, whatever the batch size.

A loss is summed when it says so the way torch's loss modules do: a ``reduction`` attribute of
``"sum"`` (``nn.CrossEntropyLoss(reduction="sum")``), or a ``functools.partial`` given
``reduction="sum"``. A recipe's own callable that sums sets ``reduction = "sum"`` on itself.
A run records it in ``run.json`` (``loss_reduction``) for the readers of a finished run.
"""

from __future__ import annotations

import functools
from typing import Any

SUM = "sum"
MEAN = "mean"
NOTE = "the recipe's loss is summed over each batch; shown per sample"
"""What a reader says once where it shows a summed loss per sample."""


def loss_reduction(loss_fn: Any) -> str:
    """``"sum"`` for a loss summed over the batch, else ``"mean"``."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is None and isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction")
    return SUM if reduction == SUM else MEAN


def recorded_reduction(run_info: dict[str, Any]) -> str:
    """The reduction a run recorded in its ``run.json`` (``"mean"`` where it recorded none)."""
    return SUM if run_info.get("loss_reduction") == SUM else MEAN


def per_sample(loss: float, batch_size: int | float | None, reduction: str) -> float:
    """A batch's loss (or an epoch's mean batch loss, with the batch size) per sample."""
    if reduction != SUM or not batch_size:
        return loss
    return loss / batch_size


def per_sample_metrics(metrics: dict[str, float], batch_size: int | float | None, reduction: str) -> dict[str, float]:
    """An epoch's metrics with ``train_loss`` per sample: the mean batch loss over ``batch_size``
    (the recipe's; a smaller last batch makes it a slight underestimate). Validation metrics are
    averaged already."""
    if reduction != SUM or "train_loss" not in metrics:
        return metrics
    return metrics | {"train_loss": per_sample(metrics["train_loss"], batch_size, reduction)}
