"""Where a run is: one object that the loop advances, checkpoints save, events report and plugins
read (``trainer.state``), and why it stopped, as a typed value rather than text to parse."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class StopKind(enum.StrEnum):
    """Why a run ended before its last epoch."""

    REQUESTED = "requested"  # a plugin asked (early stopping, a pruned sweep trial)
    SIGNAL = "signal"  # SIGINT or SIGTERM
    MAX_TIME = "max_time"  # a run limit: the run can go on from where it stopped
    MAX_STEPS = "max_steps"
    NONFINITE = "nonfinite"  # a NaN or infinite loss or weight


LIMITS = (StopKind.MAX_TIME, StopKind.MAX_STEPS)


@dataclass(frozen=True)
class Stop:
    """A stop request: its kind, and one line for a person."""

    kind: StopKind
    reason: str

    @property
    def at_limit(self) -> bool:
        """The run stopped at a limit it was given (``max_time``, ``max_steps``), not at its end."""
        return self.kind in LIMITS


@dataclass(frozen=True)
class Limits:
    """The run limits every recipe's config has (``max_steps``, ``max_time``,
    ``limit_train_batches``, ``limit_val_batches``): a number of batches, seconds, and an int
    number of batches or a float fraction of them per epoch."""

    max_steps: int | None = None
    max_time: float | None = None
    train_batches: int | float | None = None
    val_batches: int | float | None = None


@dataclass(frozen=True)
class Steps:
    """The optimizer steps a run will make, known once its loaders, limits and plugins are: what a
    recipe's ``make_scheduler`` sizes a schedule from, so that a warm-up and a decay end where the
    run ends (``limit_train_batches``, ``max_steps`` and gradient accumulation counted)."""

    per_epoch: int
    """Optimizer steps in a full epoch: its batches (after ``limit_train_batches``), divided by the
    batches each step takes (``accumulate``), rounded up, as the epoch's last batch steps."""
    total: int
    """Optimizer steps in the whole run, from its first step: ``epochs * per_epoch``, or fewer where
    ``max_steps`` ends it sooner. A per-step schedule is stepped this many times."""
    epochs: int
    """Epochs the run trains, the last perhaps in part (``max_steps``): what an epoch schedule spans."""


@dataclass
class RunState:
    """Progress, counted so that a checkpoint can stop and resume the loop between any two
    batches. ``epoch`` counts epochs completed (events number the one running from 1)."""

    epoch: int = 0
    batch_idx: int = 0  # the next batch to run within `epoch`
    global_step: int = 0  # batches trained
    in_step: bool = False  # inside a batch, from its train_step until its progress is counted: a state
    #                        saved in between (random generators used, weights half updated) cannot resume exactly
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # this epoch's, on the device
    skipped: int = 0  # steps of this epoch skipped for a non-finite loss (nonfinite_loss=skip)
    metrics: dict[str, float] = field(default_factory=dict)  # the last completed epoch's
    stop: Stop | None = None  # the stop asked for in this fit, if any

    @property
    def stop_reason(self) -> str | None:
        return None if self.stop is None else self.stop.reason
