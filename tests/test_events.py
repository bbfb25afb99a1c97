"""Events: validated, frozen, one JSON line each, a JSON Schema each, tensors kept as given."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from minitrain.engine import events as ev

# One valid instance of every core event (ExceptionRaised's traceback has newlines on purpose).
SAMPLES: dict[type[ev.Event], dict] = {
    ev.FitStart: dict(
        epochs=5,
        start_epoch=3,
        global_step=10,
        steps_per_epoch=5,
        device="cpu",
        run_dir="runs/demo",
        config={"lr": 0.1, "nested": {"a": [1, 2]}},
        class_names=["a", "b"],
        resumed_from="runs/demo/checkpoints/last.pt",
        changed={"epochs": [3, 5]},
    ),
    ev.EpochStart: dict(epoch=1, global_step=5, steps=5),
    ev.BatchStart: dict(epoch=1, batch_idx=2, global_step=7, batch_size=16),
    ev.BatchEnd: dict(epoch=1, batch_idx=2, global_step=8, batch_size=16, loss=torch.tensor(0.25)),
    ev.ValidationStart: dict(epoch=1, global_step=10),
    ev.ValidationEnd: dict(
        epoch=1, global_step=10, metrics={"val_loss": 0.5, "val_acc": 0.75}, confusion=[[3, 1], [0, 4]]
    ),
    ev.EpochEnd: dict(epoch=1, global_step=10, metrics={"train_loss": 0.4, "lr": 0.1}),
    ev.FitEnd: dict(epochs_completed=2, global_step=10, metrics={"train_loss": 0.4}, stop_reason="patience"),
    ev.ExceptionRaised: dict(
        epoch=1,
        global_step=3,
        error_type="RuntimeError",
        message="boom\nsecond line",
        traceback='Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom\n',
    ),
    ev.Interrupted: dict(epoch=1, global_step=3, signal="SIGTERM"),
}


def test_samples_cover_every_core_event():
    assert set(SAMPLES) == set(ev.CORE_EVENTS)


@pytest.mark.parametrize("cls", ev.CORE_EVENTS, ids=lambda c: c.__name__)
def test_event_is_one_json_line_and_round_trips(cls):
    event = cls(**SAMPLES[cls])
    line = event.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert data["event"] == cls.__name__
    back = ev.Event.from_json(line)
    assert type(back) is cls
    assert back.to_json() == line
    if cls is not ev.BatchEnd:  # BatchEnd's tensor comes back as the float it was written as
        assert back == event


def test_batch_end_loss_round_trips_as_the_number():
    event = ev.BatchEnd(**SAMPLES[ev.BatchEnd])
    back = ev.Event.from_json(event.to_json())
    assert back.loss == pytest.approx(0.25)
    assert isinstance(back.loss, float)


@pytest.mark.parametrize("cls", ev.CORE_EVENTS, ids=lambda c: c.__name__)
def test_event_has_json_schema(cls):
    schema = cls.model_json_schema()
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(cls.model_fields)
    json.dumps(schema)  # serialisable as it is


def test_loss_schema_is_a_number():
    assert ev.BatchEnd.model_json_schema()["properties"]["loss"]["type"] == "number"


def test_events_are_frozen():
    event = ev.EpochStart(epoch=1, global_step=0, steps=5)
    with pytest.raises(ValidationError):
        event.epoch = 3


@pytest.mark.parametrize("cls", sorted(SAMPLES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_trusted_event_is_the_validated_one(cls):
    fields = {name: SAMPLES[cls].get(name, info.default) for name, info in cls.model_fields.items()}
    trusted, validated = cls.trusted(**fields), cls(**fields)
    assert trusted == validated and trusted.to_json() == validated.to_json()
    assert trusted.model_fields_set == validated.model_fields_set and repr(trusted) == repr(validated)
    with pytest.raises(ValidationError, match="frozen"):
        trusted.global_step = 99
    copied = trusted.model_copy(update={"global_step": 99})
    assert copied.global_step == 99 and trusted.global_step == validated.global_step


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (ev.EpochStart, dict(epoch=-1, global_step=0, steps=5), "epoch"),
        (ev.BatchStart, dict(epoch=1, batch_idx=0, global_step=0, batch_size=-4), "batch_size"),
        (ev.EpochStart, dict(epoch="1", global_step=0, steps=5), "epoch"),  # wrong type (strict)
        (ev.EpochStart, dict(epoch=1.5, global_step=0, steps=5), "epoch"),  # wrong type
        (ev.EpochEnd, dict(epoch=1, global_step=0, metrics="high"), "metrics"),  # wrong type
        (ev.FitEnd, dict(epochs_completed=1, metrics={}), "global_step"),  # missing
        (ev.ValidationStart, dict(epoch=1, global_step=0, colour="red"), "colour"),  # extra
        (ev.Interrupted, dict(epoch=1, global_step=0, signal="SIGKILL"), "signal"),  # not an allowed value
    ],
    ids=["negative", "negative-size", "str-for-int", "float-for-int", "str-for-dict", "missing", "extra", "literal"],
)
def test_validation_error_names_event_and_field(cls, kwargs, field):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    text = str(info.value)
    assert cls.__name__ in text
    assert field in text
    assert [e["loc"][0] for e in info.value.errors()] == [field]


def test_bool_is_not_a_count():
    with pytest.raises(ValidationError, match="epoch"):
        ev.EpochStart(epoch=True, global_step=0, steps=1)


def test_tensor_loss_is_kept_not_copied():
    loss = torch.tensor(1.5)
    event = ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=loss)
    assert event.loss is loss  # no copy, no conversion
    assert event.model_dump()["loss"] is loss  # python-mode dump keeps it too
    assert json.loads(event.to_json())["loss"] == 1.5  # a float only once serialised
    assert isinstance(event.model_dump(mode="json")["loss"], float)


def test_multi_element_tensor_serialises_as_a_list():
    event = ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=torch.tensor([1.0, 2.0]))
    assert json.loads(event.to_json())["loss"] == [1.0, 2.0]


def test_tensor_requiring_grad_is_refused():
    loss = torch.tensor(1.0, requires_grad=True) * 2
    with pytest.raises(ValidationError, match="detached") as info:
        ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=loss)
    assert "BatchEnd" in str(info.value) and "loss" in str(info.value)
    # detached, it is accepted as is
    detached = loss.detach()
    assert ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=detached).loss is detached


@pytest.mark.parametrize("bad", ["0.5", None, True, [0.5]])
def test_loss_must_be_tensor_or_number(bad):
    with pytest.raises(ValidationError, match="loss"):
        ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=bad)


def test_plain_number_loss_is_a_float():
    assert ev.BatchEnd(epoch=1, batch_idx=0, global_step=1, batch_size=8, loss=2).loss == 2.0


@pytest.mark.parametrize(
    "cls, hook",
    [
        (ev.FitStart, "on_fit_start"),
        (ev.EpochStart, "on_epoch_start"),
        (ev.BatchStart, "on_batch_start"),
        (ev.BatchEnd, "on_batch_end"),
        (ev.ValidationStart, "on_validation_start"),
        (ev.ValidationEnd, "on_validation_end"),
        (ev.EpochEnd, "on_epoch_end"),
        (ev.FitEnd, "on_fit_end"),
        (ev.ExceptionRaised, "on_exception_raised"),
        (ev.Interrupted, "on_interrupted"),
    ],
)
def test_hook_name_derivation(cls, hook):
    assert cls.hook == hook


def test_every_core_event_has_a_hookspec():
    from minitrain.engine import hookspecs

    for cls in ev.CORE_EVENTS:
        assert callable(getattr(hookspecs, cls.hook)), cls.hook


def test_subclass_gets_hook_name_and_is_registered():
    class ModelExported(ev.Event):
        path: str

    class Named(ev.Event):
        hook = "on_something_else"

    assert ModelExported.hook == "on_model_exported"
    assert Named.hook == "on_something_else"
    assert ev.EVENT_TYPES["ModelExported"] is ModelExported
    line = ModelExported(path="m.pt").to_json()
    assert json.loads(line) == {"event": "ModelExported", "path": "m.pt"}
    assert ev.Event.from_json(line) == ModelExported(path="m.pt")


def test_from_json_unknown_event():
    with pytest.raises(ValueError, match="NoSuchEvent"):
        ev.Event.from_json('{"event": "NoSuchEvent"}')


def test_from_json_validates():
    with pytest.raises(ValidationError, match="EpochStart"):
        ev.Event.from_json('{"event": "EpochStart", "epoch": -2, "global_step": 0, "steps": null}')


def test_cli_events_lists_catalogue_and_schemas(capsys):
    from minitrain.commands import cli

    assert cli.main(["events"]) == 0
    out = capsys.readouterr().out
    assert "BatchEnd -> on_batch_end(" in out and "ExceptionRaised -> on_exception_raised(" in out
    assert cli.main(["events", "--json-schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert {cls.__name__ for cls in ev.CORE_EVENTS} <= set(schemas)
    assert schemas["FitEnd"]["properties"]["stop_reason"]
