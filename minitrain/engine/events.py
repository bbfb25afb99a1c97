"""The event catalogue: one frozen, validated pydantic model per thing that happens in a run.

Each event class names the hook that announces it (``FitStart`` -> ``on_fit_start``), dumps to one
JSON line and has a JSON Schema. Tensor fields keep the tensor as given (no copy, no device sync);
it becomes a number only when serialised, which is the reader's choice, not the emitter's.

A plugin or recipe declares its own event by subclassing :class:`Event` (see docs/plugins.md).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, WithJsonSchema


def _tensor_or_number(value: Any) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError("tensor must be detached from the autograd graph")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)  # a replayed event log holds plain numbers
    raise ValueError(f"expected a tensor or a number, got {type(value).__name__}")


def _to_python(value: torch.Tensor | float) -> float | list:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


Scalar = Annotated[
    Any,
    PlainValidator(_tensor_or_number),
    PlainSerializer(_to_python, when_used="json"),
    WithJsonSchema({"type": "number", "description": "a number (a tensor until serialised)"}),
]
"""A scalar that may still live on the device: reading it is what synchronises, not emitting it."""

Count = Annotated[int, Field(ge=0, strict=True)]
EpochNumber = Annotated[int, Field(ge=1, strict=True, description="the epoch, numbered from 1")]
"""Epochs are numbered from 1 wherever a person or a plugin reads them: events, metrics.csv, the
console, plots. ``Trainer.epoch`` is a count instead: epochs completed."""
Metrics = dict[str, float]

# what pydantic's own model_construct sets, set through BaseModel's slots directly
_new, _set = object.__new__, object.__setattr__
_set_fields_set, _set_extra, _set_private = (
    BaseModel.__dict__[slot].__set__
    for slot in ("__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
)

EVENT_TYPES: dict[str, type[Event]] = {}
"""Every event class by name, core and plugin-defined alike (filled as classes are declared)."""


def _hook_name(class_name: str) -> str:
    """``CheckpointSaved`` -> ``on_checkpoint_saved``; ``LRChanged`` -> ``on_lr_changed``."""
    return "on_" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", class_name).lower()


class Event(BaseModel):
    """Base of every event. Subclass it to declare a new one; its hook is ``on_<snake_name>``
    unless the class sets ``hook``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, ser_json_inf_nan="constants"
    )  # a NaN loss is logged as NaN, not null

    hook: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "hook" not in cls.__dict__:
            cls.hook = _hook_name(cls.__name__)
        EVENT_TYPES[cls.__name__] = cls

    @classmethod
    def trusted(cls, **fields: Any) -> Event:
        """The event, built without validation, from every one of its fields. Only for values that
        cannot be wrong, such as the loop's own counters and detached loss: the loop builds two
        events per step, and validating them cost more than the rest of its per-step work
        (benchmarks/overhead.py). Everyone else, replay included, builds events validated."""
        event = _new(cls)
        _set(event, "__dict__", fields)
        _set_fields_set(event, set(fields))
        _set_extra(event, None)
        _set_private(event, None)
        return event

    def to_json(self) -> str:
        """One JSON line: ``{"event":"<ClassName>", ...fields}``, by pydantic's compiled serialiser."""
        body = self.__pydantic_serializer__.to_json(self).decode()
        return f'{{"event":"{type(self).__name__}"' + ("}" if body == "{}" else "," + body[1:])

    @staticmethod
    def from_json(line: str) -> Event:
        """Rebuild an event from a line written by :meth:`to_json` (used by replay)."""
        data = json.loads(line)
        name = data.pop("event", None)
        if name not in EVENT_TYPES:
            raise ValueError(f"unknown event {name!r}")
        return EVENT_TYPES[name].model_validate(data)


class FitStart(Event):
    """Training is about to begin (after set-up; on resume, from the restored position)."""

    epochs: Count = Field(description="total number of epochs the run is configured for")
    start_epoch: EpochNumber = Field(description="the epoch this fit starts in (1, or later on resume)")
    global_step: Count = Field(description="optimizer steps taken before this fit")
    steps_per_epoch: Count | None = Field(description="batches per epoch, if the loader knows")
    device: str
    run_dir: str | None = Field(description="where plugins should write files, if anywhere")
    config: dict[str, Any] = Field(default_factory=dict, description="the resolved recipe config")
    class_names: list[str] | None = Field(
        default=None, description="label of each class index, if the recipe names them"
    )
    resumed_from: str | None = Field(default=None, description="the checkpoint this fit resumed from, if any")
    changed: dict[str, list[Any]] = Field(
        default_factory=dict, description="config fields a resume changed: name -> [value in the checkpoint, value now]"
    )
    restart: Count = Field(
        default=0,
        description="which restart of the process group this is under torchrun's --max-restarts (0: the "
        "first start); a restart resumes from the newest checkpoint by itself",
    )


class EpochStart(Event):
    """A training epoch begins."""

    epoch: EpochNumber
    global_step: Count
    steps: Count | None = Field(description="batches in the epoch, if known")
    start_batch: Count = Field(default=0, description="first batch to run (0, or later when resumed mid-epoch)")


class BatchStart(Event):
    """A training batch is about to go through train_step/backward/optimizer_step."""

    epoch: EpochNumber
    batch_idx: Count = Field(description="index of the batch within its epoch")
    global_step: Count = Field(description="optimizer steps taken before this batch")
    batch_size: Count


class BatchEnd(Event):
    """A training batch is done and the optimizer has stepped."""

    epoch: EpochNumber
    batch_idx: Count
    global_step: Count = Field(description="optimizer steps taken, this batch included")
    batch_size: Count
    loss: Scalar = Field(description="the batch loss; a device tensor until read")


class ValidationStart(Event):
    """Validation over the whole validation loader begins."""

    epoch: EpochNumber
    global_step: Count


class ValidationEnd(Event):
    """Validation is done; metrics were read from the device once, here."""

    epoch: EpochNumber
    global_step: Count
    metrics: Metrics = Field(description="val_loss and the recipe's metrics, each prefixed val_ (val_acc, ...)")
    confusion: list[list[int]] | None = Field(
        default=None, description="confusion matrix of a classifier, rows = true class, columns = predicted"
    )


class EpochEnd(Event):
    """A training epoch (and its validation, if any) is done."""

    epoch: EpochNumber
    global_step: Count
    metrics: Metrics = Field(description="train_loss, lr, epoch_time, samples_per_s, and the val_* metrics")


class FitEnd(Event):
    """Training finished normally or by a stop request."""

    epochs_completed: Count
    global_step: Count
    metrics: Metrics = Field(description="metrics of the last completed epoch")
    stop_reason: str | None = Field(default=None, description="why the run stopped before its last epoch, if it did")
    stop_kind: Literal["requested", "signal", "max_time", "max_steps", "nonfinite"] | None = Field(
        default=None, description="what stopped it: a plugin's request, a signal, a run limit, a non-finite value"
    )


class ExceptionRaised(Event):
    """The run failed; plugins get a last chance to flush or save. The error is re-raised."""

    epoch: EpochNumber = Field(description="the epoch running when it failed")
    global_step: Count
    error_type: str
    message: str
    traceback: str


class Interrupted(Event):
    """The run was interrupted (Ctrl-C or SIGTERM); like ExceptionRaised, the interrupt is re-raised."""

    epoch: EpochNumber = Field(description="the epoch running when it was interrupted")
    global_step: Count
    signal: Literal["SIGINT", "SIGTERM"] = "SIGINT"


CORE_EVENTS: tuple[type[Event], ...] = (
    FitStart,
    EpochStart,
    BatchStart,
    BatchEnd,
    ValidationStart,
    ValidationEnd,
    EpochEnd,
    FitEnd,
    ExceptionRaised,
    Interrupted,
)
