"""Custom hooks: a plugin declares its own event and hookspec, emits it through the trainer, and
other plugins (and the JSONL log, through on_event) receive it."""

from __future__ import annotations

import json

import pytest
import torch

import minitrain
from minitrain.engine import events as ev
from minitrain.engine.errors import MinitrainError
from minitrain.engine.events import Scalar


class WeightsChecked(ev.Event):
    """Published by the Inspector plugin after every epoch."""

    epoch: ev.Count
    weight_norm: Scalar


class InspectorSpecs:
    @minitrain.hookspec
    def on_weights_checked(self, event: WeightsChecked, trainer) -> None:
        """After the Inspector measured the weights."""


class Inspector:
    """Declares a custom hook and emits its event at every epoch end."""

    hookspecs = InspectorSpecs

    def __init__(self):
        self.emitted = []

    @minitrain.hookimpl
    def on_epoch_end(self, event, trainer):
        norm = torch.cat([p.detach().flatten() for p in trainer.module.parameters()]).norm()
        custom = WeightsChecked(epoch=event.epoch, weight_norm=norm)
        self.emitted.append(custom)
        trainer.emit(custom)


class Listener:
    """Implements the Inspector's hook without declaring it."""

    def __init__(self):
        self.received = []

    @minitrain.hookimpl
    def on_weights_checked(self, event, trainer):
        assert isinstance(trainer, minitrain.Trainer)
        self.received.append(event)


def _jsonl_plugin():
    from minitrain_plugins.jsonl import JsonlLog

    return JsonlLog(JsonlLog.Config())


def _trainer(fake_cifar, plugins, run_dir=None, epochs=2):
    from minitrain.kit.data import cifar10_loaders

    train, test = cifar10_loaders(fake_cifar, 16, crop=0, flip="none")
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    return minitrain.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        train,
        test,
        epochs=epochs,
        device="cpu",
        plugins=plugins,
        run_dir=None if run_dir is None else str(run_dir),
    )


@pytest.mark.parametrize("listener_first", [False, True], ids=["spec-first", "impl-first"])
def test_custom_event_reaches_other_plugin_and_jsonl(fake_cifar, tmp_path, listener_first):
    inspector, listener = Inspector(), Listener()
    plugins = [listener, inspector] if listener_first else [inspector, listener]
    trainer = _trainer(fake_cifar, plugins + [_jsonl_plugin()], run_dir=tmp_path)
    trainer.fit()

    assert len(inspector.emitted) == 2
    assert listener.received == inspector.emitted
    assert listener.received[0] is inspector.emitted[0]  # the same object, not a copy
    assert isinstance(listener.received[0].weight_norm, torch.Tensor)

    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    custom = [line for line in lines if line["event"] == "WeightsChecked"]
    assert [c["epoch"] for c in custom] == [1, 2]
    assert custom[0]["weight_norm"] == pytest.approx(float(inspector.emitted[0].weight_norm))
    # emitted from inside on_epoch_end, so logged just before that EpochEnd
    names = [line["event"] for line in lines]
    assert names[names.index("WeightsChecked") + 1] == "EpochEnd"
    # the log line replays into the plugin's own event class
    assert ev.Event.from_json(json.dumps(custom[1])) == WeightsChecked(epoch=2, weight_norm=custom[1]["weight_norm"])


def test_custom_hook_declared_from_recipe(write_recipe, fake_cifar, tmp_path):
    """A recipe enables plugin objects (its PLUGINS list) that publish and consume a custom hook."""
    path = write_recipe(
        f"""
        from pathlib import Path
        import torch
        import minitrain
        from minitrain.kit.data import cifar10_loaders
        from minitrain.engine.events import Event

        class LrHalved(Event):
            epoch: int
            lr: float

        class Specs:
            @minitrain.hookspec
            def on_lr_halved(self, event, trainer): ...

        class Halver:
            hookspecs = Specs
            @minitrain.hookimpl
            def on_epoch_end(self, event, trainer):
                for group in trainer.optimizer.param_groups:
                    group["lr"] /= 2
                trainer.emit(LrHalved(epoch=event.epoch, lr=trainer.optimizer.param_groups[0]["lr"]))

        class Watcher:
            seen = []
            @minitrain.hookimpl
            def on_lr_halved(self, event):
                Watcher.seen.append(event.lr)

        PLUGINS = [Halver(), Watcher(), "jsonl"]

        class Config(minitrain.RecipeConfig):
            epochs: int = 3
            batch_size: int = 16
            device: str = "cpu"
            data_dir: Path = Path({str(fake_cifar)!r})

        def build(config, device):
            train, test = cifar10_loaders(config.data_dir, config.batch_size, device=device, crop=0, flip="none")
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 10))
            return minitrain.Components(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.8),
                                        train_loader=train, val_loader=test)
    """,
        name="halving_recipe.py",
    )
    from minitrain.commands.start import RunRequest, prepare

    trainer = prepare(RunRequest(path, disabled=["console"], run_dir=tmp_path / "run"))
    watcher = trainer.pm.get_plugin("watcher")
    trainer.fit()
    assert type(watcher).seen == [0.4, 0.2, 0.1]
    logged = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in logged if line["event"] == "LrHalved"] == [0.4, 0.2, 0.1]


def test_custom_hook_with_wrong_argument_names_is_rejected(fake_cifar):
    class BadListener:
        @minitrain.hookimpl
        def on_weights_checked(self, evt):
            pass

    with pytest.raises(MinitrainError, match="on_weights_checked") as info:
        _trainer(fake_cifar, [BadListener(), Inspector()])
    assert "badlistener" in str(info.value)


def test_custom_hook_without_its_spec_is_unknown(fake_cifar):
    with pytest.raises(MinitrainError, match=r"'listener' implements unknown hook 'on_weights_checked'"):
        _trainer(fake_cifar, [Listener()])


def test_two_plugins_sharing_one_hookspec_source(fake_cifar):
    """Two instances of a spec-declaring plugin (or a listener that declares the spec it listens
    to, so it also works alone) must not make the second registration fail."""

    class SecondInspector(Inspector):
        name = "inspector2"

    listener = Listener()
    trainer = _trainer(fake_cifar, [Inspector(), SecondInspector(), listener], epochs=1)
    trainer.fit()
    assert len(listener.received) == 2


def test_emitting_event_without_hookspec_is_a_clear_error(fake_cifar):
    class Orphan(ev.Event):
        value: int

    trainer = _trainer(fake_cifar, [])
    with pytest.raises(MinitrainError) as info:
        trainer.emit(Orphan(value=1))
    message = str(info.value)
    assert "Orphan" in message and "on_orphan" in message and "hookspec" in message


def test_emitting_event_whose_only_impl_is_optional_still_needs_a_spec(fake_cifar):
    class Lonely(ev.Event):
        value: int

    class OptionalListener:
        @minitrain.hookimpl(optionalhook=True)
        def on_lonely(self, event):
            raise AssertionError("delivered without a spec")

    trainer = _trainer(fake_cifar, [OptionalListener()])
    with pytest.raises(MinitrainError, match="on_lonely"):
        trainer.emit(Lonely(value=1))


def test_emit_delivers_core_event_to_own_hook_then_on_event(fake_cifar):
    calls = []

    class Both:
        @minitrain.hookimpl
        def on_validation_start(self, event):
            calls.append(("own", event))

        @minitrain.hookimpl
        def on_event(self, event):
            calls.append(("any", event))

    trainer = _trainer(fake_cifar, [Both()])
    event = ev.ValidationStart(epoch=1, global_step=0)
    trainer.emit(event)
    assert calls == [("own", event), ("any", event)]
