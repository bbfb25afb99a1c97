"""minitrain.engine.dispatch: the loop's resolved hook calls do what pluggy's own calls do."""

from __future__ import annotations

import pytest

from minitrain import hookimpl
from minitrain.engine import events as ev
from minitrain.engine.registry import guard_observers, make_plugin_manager

EVENT = ev.ValidationStart(epoch=1, global_step=0)


def recorder(name: str, log: list, **opts):
    """A plugin implementing on_validation_start (marked with ``opts``; its arguments in another
    order than the spec's) and on_event (with no arguments at all)."""

    class Recorder:
        @hookimpl(**opts)
        def on_validation_start(self, trainer, event):  # the spec's order is (event, trainer)
            log.append((name, "start", type(event).__name__, trainer))

        @hookimpl
        def on_event(self):
            log.append((name, "event"))

    return Recorder()


def through_pluggy_and_calls(pm) -> tuple[list, list]:
    log = pm.log
    pm.hook.on_validation_start(event=EVENT, trainer="T")
    pm.hook.on_event(event=EVENT, trainer="T")
    by_pluggy = log[:]
    log.clear()
    pm.calls.on_validation_start(EVENT, "T")
    return by_pluggy, log[:]


def make(*specs):
    pm, log = make_plugin_manager(), []
    pm.log = log
    for name, opts in specs:
        pm.register(recorder(name, log, **opts), name=name)
    return pm


def test_order_arguments_and_on_event_as_pluggy_gives_them():
    pm = make(("a", {}), ("b", {"tryfirst": True}), ("c", {"trylast": True}), ("d", {}))
    by_pluggy, by_calls = through_pluggy_and_calls(pm)
    assert by_calls == by_pluggy
    assert [entry[0] for entry in by_calls[:4]] == ["b", "d", "a", "c"]
    assert by_calls[0][3] == "T"  # the trainer reached the argument named trainer


def test_a_hook_nobody_implements_resolves_to_none():
    pm = make_plugin_manager()
    assert pm.calls.on_validation_start is None
    with pytest.raises(AttributeError, match="no hookspec 'on_no_such_thing'"):
        _ = pm.calls.on_no_such_thing


def test_registering_and_unregistering_are_seen_at_once():
    pm = make(("a", {}))
    assert pm.calls.on_validation_start is not None
    pm.unregister(name="a")
    assert pm.calls.on_validation_start is None
    pm.register(recorder("b", pm.log), name="b")
    pm.calls.on_validation_start(EVENT, "T")
    assert [entry[0] for entry in pm.log] == ["b", "b"]


def test_firstresult_pipeline_hook_returns_first_non_none():
    class Declines:
        @hookimpl(tryfirst=True)
        def train_step(self, batch):
            return None

    class Answers:
        @hookimpl
        def train_step(self, trainer, batch):
            return ("answer", trainer, batch)

    pm = make_plugin_manager()
    pm.register(Declines())
    pm.register(Answers())
    assert pm.calls.train_step("T", "B") == ("answer", "T", "B") == pm.hook.train_step(trainer="T", batch="B")


def test_a_wrapper_leaves_the_hook_to_pluggy():
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def train_step(self, batch):
            seen.append("before")
            result = yield
            seen.append("after")
            return ("wrapped", result)

    class Step:
        @hookimpl
        def train_step(self):
            return "step"

    pm = make_plugin_manager()
    pm.register(Step())
    pm.register(Wrapper())
    assert pm.calls.train_step("T", "B") == ("wrapped", "step") and seen == ["before", "after"]


def test_tracing_goes_through_pluggy_until_undone():
    pm = make(("a", {}))
    traced = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append(name), lambda *args: None)
    pm.calls.on_validation_start(EVENT, "T")
    assert traced == ["on_validation_start", "on_event"]
    undo()
    pm.calls.on_validation_start(EVENT, "T")
    assert len(traced) == 2


def test_a_failing_observer_is_reported_and_the_others_still_run():
    pm = make(("a", {}))

    class Failing:
        role = "observer"

        @hookimpl(tryfirst=True)
        def on_validation_start(self, event):
            raise RuntimeError("observer broke")

    pm.register(Failing(), name="failing")
    failures = []
    guard_observers(pm, lambda plugin, hook, exc: failures.append((plugin, hook, str(exc))))
    pm.calls.on_validation_start(EVENT, "T")
    assert failures == [("failing", "on_validation_start", "observer broke")]
    assert [entry[:2] for entry in pm.log] == [("a", "start"), ("a", "event")]


def test_a_failing_critical_plugin_raises():
    class Critical:
        role = "critical"

        @hookimpl
        def on_validation_start(self, event):
            raise RuntimeError("critical broke")

    pm = make_plugin_manager()
    pm.register(Critical(), name="critical")
    guard_observers(pm, lambda *args: pytest.fail("a critical plugin is not guarded"))
    with pytest.raises(RuntimeError, match="critical broke"):
        pm.calls.on_validation_start(EVENT, "T")
