"""The plugin surface: what a plugin may read and call on the trainer, named and typed here.

Two protocols. :class:`RunView` is what every plugin may rely on, in a live run and in a replay
(``minitrain replay`` and ``report`` feed a recorded run's events to observers through a stand-in
that has no model). :class:`TrainerView` adds what only a live run has: the model, optimizer and
loaders, and the calls that reach into training. Notification hooks receive a ``RunView``;
pipeline hooks, which never run in a replay, a ``TrainerView``; a plugin that acts on training
(``checkpoint``, ``ema``) is never replayed, so it may use a ``TrainerView`` anywhere.

What the step's plugins share among themselves is :class:`Shared` (``trainer.shared``), and a
plugin's options are a :class:`PluginConfig`. Whatever is not here (the plugin manager, the
loop's resolved calls, private attributes) may change without notice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict

from minitrain.engine.state import RunState, StopKind

if TYPE_CHECKING:
    from minitrain.engine.events import Event


class PluginConfig(BaseModel):
    """Base of a plugin's options (its ``Config``): unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    changeable_on_resume: ClassVar[frozenset[str]] = frozenset()
    """Options that a resume may change even where the plugin changes training (early stopping's
    ``patience``: a stopped run goes on with a larger one), as ``RecipeConfig``'s own."""


@dataclass
class Shared:
    """What the plugins of one step share, rather than flags of their own on the trainer."""

    stepping: bool = True
    """Whether this batch's ``optimizer_step`` updates the weights. ``accumulate`` sets it per
    batch from ``train_step`` on; ``clip`` and ``ema`` act only when it is true."""
    grad_scaler: torch.amp.GradScaler | None = None
    """The scaler that scales the loss (``amp`` in fp16), if any: a plugin that reads gradients
    unscales them through it first (``clip``)."""
    step_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-step device scalars that plugins publish (``clip``'s ``grad_norm``). Readers show them
    every N steps with the loss (``console``, ``tensorboard``, ``mlflow``): never read them every step."""
    epoch_metrics: dict[str, Callable[[dict[str, float]], float]] = field(default_factory=dict)
    """Epoch metrics that plugins derive from the trainer's own (``throughput``'s ``flops_per_s``
    from ``samples_per_s``): name -> function of the epoch's metrics, called once per epoch when
    the trainer builds ``EpochEnd``, so the value lands in the event itself and in every reader."""
    compute_dtype: torch.dtype | None = None
    """The floating-point type the step computes in where a plugin chose it (``amp``: bf16 or
    fp16), else None: the model's own. ``throughput`` picks the peak to compare with by it."""


@runtime_checkable
class RunView(Protocol):
    """What every plugin may read and call on the trainer, live or replayed."""

    run_dir: Path | None
    """Where the run writes its files, or None (a trainer built by hand without one)."""
    device: torch.device
    config: dict[str, Any]
    """The recipe's config, as JSON values."""
    class_names: list[str] | None
    epochs: int
    """Epochs the run is to train in all."""
    state: RunState
    """Progress (epoch, batch, step, the last epoch's metrics) and the stop asked for."""
    shared: Shared
    replaying: bool
    """A replayed log (``minitrain replay``, ``report``): no model, and a loss is a CPU tensor."""

    def request_stop(self, reason: str, kind: StopKind = StopKind.REQUESTED) -> None:
        """End the run after the current batch (under torchrun, at the end of the epoch)."""

    def emit(self, event: Event) -> None:
        """Deliver an event (a plugin's own, declared with its hookspec) to every plugin."""

    def plugin_options(self) -> dict[str, dict[str, Any]]:
        """The run's plugins by name, each with its options as JSON values."""

    def remove_plugin(self, plugin: object) -> None:
        """Take a plugin out of the run: no more calls to it (``profile``, once its window ends)."""


@runtime_checkable
class TrainerView(RunView, Protocol):
    """What a plugin may also use while the run trains."""

    module: torch.nn.Module
    """The recipe's model, whose weights are saved."""
    model: torch.nn.Module
    """What the loop calls: the module, or a wrapper of it that ``setup`` put in place (DDP)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scheduler_interval: str
    """``epoch`` or ``step``: when the default ``optimizer_step`` steps the scheduler."""
    loss_fn: Callable[..., torch.Tensor]
    train_loader: Iterable
    val_loader: Iterable | None
    nonfinite_loss: str
    """``stop`` or ``skip``: what a NaN or infinite loss does."""
    hook: Any
    """pluggy's hook callers, for a call outside the loop (``compile`` retries a step eagerly)."""

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches an epoch trains (its limit applied), if the loader has a length."""

    def metric_names(self) -> list[str]:
        """The metrics an epoch reports, for a ``check`` that validates a ``monitor``."""

    def metric_mode(self, name: str) -> str | None:
        """``min`` or ``max``: which way is better for metric ``name``, where the run knows."""

    def check_finite(self, weights: bool = False) -> bool:
        """Whether the epoch's losses so far (and the weights) are finite: one host sync."""

    def state_dict(self, gather: bool = False) -> dict[str, Any]:
        """Everything a checkpoint holds to go on exactly (``gather``: every rank's part)."""
