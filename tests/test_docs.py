"""The plugin author's page must cover every hook and every event, first-party ones included."""
import warnings
from pathlib import Path

import pytest

from minitrain.events import EVENT_TYPES
from minitrain.plugins import discover, make_plugin_manager

PAGE = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


def _first_party_plugins():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: i for n, i in discover().items() if i.distribution == "minitrain" and i.target is not None}


def _all_hookspecs():
    pm = make_plugin_manager()
    for info in _first_party_plugins().values():
        specs = getattr(info.target, "hookspecs", None)
        if specs is not None:
            pm.add_hookspecs(specs)
    return {name: getattr(pm.hook, name) for name in dir(pm.hook) if not name.startswith("_")}


@pytest.mark.parametrize("name", sorted(_all_hookspecs()))
def test_every_hook_is_documented(name):
    caller = _all_hookspecs()[name]
    assert caller.spec is not None
    assert (caller.spec.function.__doc__ or "").strip(), f"hookspec {name} has no docstring"
    assert f"`{name}`" in PAGE, f"docs/plugins.md does not document hook {name}"


def test_every_event_is_documented():
    _first_party_plugins()  # importing plugins declares their events
    assert "FitStart" in EVENT_TYPES
    for name, cls in EVENT_TYPES.items():
        if cls.__module__.startswith(("minitrain.", "minitrain_plugins.")):
            assert (cls.__doc__ or "").strip(), f"event {name} has no docstring"
            assert f"`{name}`" in PAGE, f"docs/plugins.md does not document event {name}"
