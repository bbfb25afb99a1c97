"""Every hook a minitrain plugin can implement, in the order a run calls them.

Two kinds:

* **Notification hooks** (``on_*``) receive one event (read-only) and the trainer, as a
  :class:`~minitrain.engine.surface.RunView`: a replay feeds them a recorded run too. All
  implementations run; return values are ignored. Each is named after its event class.
* **Pipeline hooks** are the loop itself, and get the trainer as a
  :class:`~minitrain.engine.surface.TrainerView`. The core's defaults (``minitrain.engine.default_protocol``) are an
  ordinary plugin registered ``trylast``; a plugin overrides a step by returning a non-None
  value first (``firstresult``), or surrounds it with ``@hookimpl(wrapper=True)`` (mixed
  precision, gradient clipping, accumulation).

Implement any of them with ``@minitrain.hookimpl``; arguments may be omitted from the right-hand
side of the signature (pluggy passes only the names an implementation asks for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from minitrain.engine import events as ev
    from minitrain.engine.surface import RunView, TrainerView

PROJECT = "minitrain"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

PIPELINE_HOOKS = frozenset({"check", "setup", "train_step", "backward", "optimizer_step", "eval_step"})
"""The hooks the loop runs through; every other hook (custom ones too) is a notification."""
STEP_HOOKS = PIPELINE_HOOKS - {"check"}
"""The pipeline hooks that compute training: a plugin implementing one changes training."""


# --- pipeline hooks -----------------------------------------------------------------------------


@hookspec
def check(trainer: TrainerView) -> None:
    """Refuse settings that cannot work before anything is written or trained: raise
    ``MinitrainError`` with one line naming the option and the reason (a ``monitor`` naming a
    metric the run never produces, a folder that cannot be written). Every implementation runs,
    observers' too, unguarded. Called once per fit, after a resume has restored the trainer and
    before ``setup``; ``trainer.metric_names()`` lists the epoch metrics the run will report."""


@hookspec
def setup(trainer: TrainerView) -> None:
    """Prepare ``trainer.model`` / ``trainer.optimizer`` before the first step; called once per fit.

    Every implementation runs. The default (tryfirst) moves the model to ``trainer.device``;
    later implementations may replace ``trainer.model`` (torch.compile, channels-last, DDP).
    """


@hookspec(firstresult=True)
def train_step(trainer: TrainerView, batch: Any) -> torch.Tensor:  # type: ignore[empty-body]  # a spec: never run
    """Forward pass and loss for one training batch; return the loss tensor (not yet backwarded).

    Default: move ``batch = (inputs, targets)`` to the device, ``trainer.loss_fn(model(x), y)``.
    Wrap it to change numerics (autocast) or override it for models that need more.
    """


@hookspec(firstresult=True)
def backward(trainer: TrainerView, loss: torch.Tensor) -> bool:  # type: ignore[empty-body]  # a spec: never run
    """Back-propagate ``loss``. Default: ``loss.backward()``; a gradient scaler overrides it."""


@hookspec(firstresult=True)
def optimizer_step(trainer: TrainerView) -> bool:  # type: ignore[empty-body]  # a spec: never run
    """Apply the gradients. Default: ``optimizer.step()``, ``zero_grad(set_to_none=True)`` and,
    when the recipe's scheduler steps per batch, ``scheduler.step()``. Wrap it for gradient
    clipping or accumulation."""


@hookspec(firstresult=True)
def eval_step(  # type: ignore[empty-body]  # a spec: never run
    trainer: TrainerView, batch: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate one validation batch under ``torch.no_grad``; return ``(outputs, targets)``.

    The core feeds these to the validation loss and the recipe's metrics (``minitrain.engine.metrics``),
    on the device. Override it for test-time augmentation.
    """


# --- notification hooks -------------------------------------------------------------------------


@hookspec
def on_event(event: ev.Event, trainer: RunView) -> None:
    """Every event, core or plugin-defined, right after its own hook: for plugins that record
    or forward all of them (the JSONL log, a remote logger) without knowing each one."""


@hookspec
def on_fit_start(event: ev.FitStart, trainer: RunView) -> None:
    """After ``setup``, before the first epoch (also when resuming)."""


@hookspec
def on_epoch_start(event: ev.EpochStart, trainer: RunView) -> None:
    """Before the first batch of each training epoch."""


@hookspec
def on_batch_start(event: ev.BatchStart, trainer: RunView) -> None:
    """Before each training batch's ``train_step``."""


@hookspec
def on_batch_end(event: ev.BatchEnd, trainer: RunView) -> None:
    """After each ``optimizer_step``. ``event.loss`` is a device tensor: reading it syncs."""


@hookspec
def on_validation_start(event: ev.ValidationStart, trainer: RunView) -> None:
    """Before the validation loop of an epoch (model already in eval mode)."""


@hookspec
def on_validation_end(event: ev.ValidationEnd, trainer: RunView) -> None:
    """After validation; ``event.metrics`` holds val_loss and the recipe's metrics as plain floats."""


@hookspec
def on_epoch_end(event: ev.EpochEnd, trainer: RunView) -> None:
    """After training and validation of an epoch. Early stopping calls
    ``trainer.request_stop(reason)`` here; checkpointing saves here."""


@hookspec
def on_fit_end(event: ev.FitEnd, trainer: RunView) -> None:
    """After the last epoch or a stop request. Close files, write reports."""


@hookspec
def on_exception_raised(event: ev.ExceptionRaised, trainer: RunView) -> None:
    """The run is failing; flush what you hold. The exception propagates afterwards."""


@hookspec
def on_interrupted(event: ev.Interrupted, trainer: RunView) -> None:
    """The run was interrupted (SIGINT or SIGTERM, ``event.signal``), normally at a step boundary;
    flush what you hold. The interrupt propagates afterwards."""
