"""Validation metrics: the recipe's own torchmetrics objects, accumulated on the device during
validation and read back once at its end.

A recipe names its metrics in ``Components.metrics``: a torchmetrics ``Metric``, a
``MetricCollection`` or a dict of metrics by name. Without one, a classifier (a recipe that names
its classes, or trains with cross-entropy) gets accuracy and a confusion matrix; anything else
gets the validation loss alone. Every metric's name is prefixed ``val_`` (``acc`` ->
``val_acc``); a vector result becomes one metric per element (``val_f1_0``, ``val_f1_1``, ...);
a square matrix whose name holds ``confusion`` becomes ``ValidationEnd.confusion``.

``val_loss`` is the recipe's loss (or the evaluation loss it names), averaged over samples. Under
torchrun torchmetrics sums the states over ranks when the results are computed, so every rank
sees the figures of the whole validation set.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from minitrain.engine.errors import MinitrainError

PREFIX = "val_"
CLASSIFIER_LOSSES = (F.cross_entropy, F.nll_loss)


def is_classifier(loss_fn: Callable, class_names: list[str] | None) -> bool:
    return (
        class_names is not None
        or loss_fn in CLASSIFIER_LOSSES
        or isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
    )


def classification(classes: int) -> MetricCollection:
    """Accuracy (the fraction right, over all samples) and the confusion matrix. Argument checks
    are off: they read the targets on the host at every batch."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(classes, average="micro", validate_args=False),
            "confusion": MulticlassConfusionMatrix(classes, validate_args=False),
        },
        compute_groups=False,
    )


def collection(metrics: Metric | MetricCollection | dict[str, Metric] | None) -> MetricCollection | None:
    """The recipe's metrics as one collection (``None`` stays ``None``)."""
    if metrics is None or isinstance(metrics, MetricCollection):
        return metrics
    if isinstance(metrics, Metric):
        return MetricCollection({_snake(type(metrics).__name__): metrics}, compute_groups=False)
    if isinstance(metrics, dict) and all(isinstance(m, Metric) for m in metrics.values()):
        return MetricCollection(dict(metrics), compute_groups=False)
    raise MinitrainError(
        f"metrics must be a torchmetrics Metric, a MetricCollection or a dict of them, not {type(metrics).__name__}"
    )


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def metric_name(key: str) -> str:
    return key if key.startswith(PREFIX) else PREFIX + key


class MeanLoss(Metric):
    """The mean of per-sample losses, from batch sums. (torchmetrics' ``MeanMetric`` either
    checks for NaN, reading the host at every batch, or, with that check disabled, ignores the
    weights in version 1.9.)"""

    full_state_update = False
    higher_is_better = False
    total: torch.Tensor  # states made by add_state
    count: torch.Tensor

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")  # float32: MPS has no float64
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, batch_sum: torch.Tensor, samples: int) -> None:
        self.total += batch_sum
        self.count += samples

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class Validation:
    """What one validation accumulates: the loss and the recipe's metrics, on the device."""

    def __init__(
        self, metrics: MetricCollection | None, loss_fn: Callable, classifier: bool, classes: int | None = None
    ):
        self.metrics, self.loss_fn, self.classifier = metrics, loss_fn, classifier
        if metrics is None and classifier and classes:
            self.metrics = classification(classes)
        self.loss = MeanLoss()
        self.sum_loss = getattr(loss_fn, "reduction", "mean") == "sum"

    def names(self) -> list[str]:
        """The scalar metrics a validation reports (vector metrics add ``_i`` suffixes)."""
        keys: list[str] = (
            cast("list[str]", list(self.metrics.keys()))  # a MetricCollection's keys are str
            if self.metrics is not None
            else ["acc"]
            if self.classifier
            else []
        )
        return ["val_loss", *(metric_name(k) for k in keys if "confusion" not in k)]

    def mode(self, name: str) -> str | None:
        """``"max"`` or ``"min"`` for a metric whose torchmetrics class says which way is better."""
        if name == "val_loss":
            return "min"
        if self.metrics is None:
            return "max" if self.classifier and name == "val_acc" else None
        for key, metric in self.metrics.items(keep_base=False):
            if metric_name(key) == name:
                better = getattr(metric, "higher_is_better", None)
                return None if better is None else "max" if better else "min"
        return None

    def to(self, device: torch.device) -> Validation:
        self.loss.to(device)
        if self.metrics is not None:
            self.metrics.to(device)
        return self

    def reset(self) -> None:
        self.loss.reset()
        if self.metrics is not None:
            self.metrics.reset()

    def update(self, outputs: Any, targets: Any) -> None:
        if self.metrics is None and self.classifier:  # classes unnamed: known from the first outputs
            self.metrics = classification(outputs.shape[-1]).to(outputs.device)
        predictions = outputs.float() if isinstance(outputs, torch.Tensor) and outputs.is_floating_point() else outputs
        loss = self.loss_fn(predictions, targets).detach()
        n = len(predictions)
        self.loss.update(loss if self.sum_loss else loss * n, n)
        if self.metrics is not None:
            self.metrics.update(predictions, targets)

    def results(self) -> tuple[dict[str, float], list[list[int]] | None]:
        """``(metrics, confusion matrix or None)``, synchronised over ranks and read in one copy."""
        computed = {"val_loss": self.loss.compute()}
        if self.metrics is not None:
            computed |= {metric_name(k): v for k, v in self.metrics.compute().items()}
        values = torch.cat([v.detach().double().flatten() for v in computed.values()]).tolist()  # the one read
        metrics, confusion, at = {}, None, 0
        for name, tensor in computed.items():
            flat, at = values[at : at + tensor.numel()], at + tensor.numel()
            if "confusion" in name and tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1]:
                n = tensor.shape[0]
                confusion = [[int(v) for v in flat[i * n : (i + 1) * n]] for i in range(n)]
            elif tensor.dim() == 0:
                metrics[name] = flat[0]
            else:
                for index, value in zip(itertools.product(*map(range, tensor.shape)), flat):
                    metrics[f"{name}_{'_'.join(map(str, index))}"] = value
        return metrics, confusion
