"""The plugin author's page, docs/plugins.md, documents every hook and every event, first-party
ones included, row by row: each hook has a row in its table, a pipeline hook with the arguments its
spec takes, a notification hook with the event it receives; each event has a row in the events
table listing exactly the fields of its model. Where the page lists first-party plugins (on by
default, rank 0 only, critical, observer), it lists every one that is. Nothing is skipped: a
first-party plugin that fails to import fails here, since it could not be checked."""
import re
import warnings
from pathlib import Path

import pytest

from minitrain.engine.events import EVENT_TYPES
from minitrain.engine.hookspecs import PIPELINE_HOOKS
from minitrain.engine.registry import FIRST_PARTY, discover, make_plugin_manager, role_of

PAGE = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


def _first_party_plugins(discover=discover):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plugin that fails to import: test_every_first_party_plugin_loads
        return {n: i for n, i in discover().items() if i.distribution == FIRST_PARTY}


def _all_hookspecs():
    pm = make_plugin_manager()
    for info in _first_party_plugins().values():
        specs = getattr(info.target, "hookspecs", None)
        if specs is not None:
            pm.add_hookspecs(specs)
    return {name: getattr(pm.hook, name) for name in dir(pm.hook) if not name.startswith("_")}


HOOKS = _all_hookspecs()  # importing the first-party plugins has also declared their events
EVENTS = {name: cls for name, cls in EVENT_TYPES.items() if cls.__module__.startswith(("minitrain.", "minitrain_plugins."))}


def _table(*header: str) -> dict[str, list[str]]:
    """The rows of the page's table with this header, by the first name in backticks of each row."""
    lines = PAGE.splitlines()
    starts = [i for i, line in enumerate(lines) if _cells(line) == list(header)]
    assert len(starts) == 1, f"docs/plugins.md: expected one table headed {' | '.join(header)}"
    rows: dict[str, list[str]] = {}
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        name = _names(cells[0])[0]
        assert name not in rows, f"docs/plugins.md: two rows for {name}"
        rows[name] = cells
    return rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []


def _names(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _listed(text: str) -> str:
    """What a cell lists, without its remarks: those in parentheses and any after a semicolon
    (``a (b, c), d (e (f)); g`` -> ``a , d ``)."""
    while (shorter := re.sub(r"\([^()]*\)", "", text)) != text:
        text = shorter
    return text.split(";")[0]


PIPELINE = ("hook", "arguments", "when", "default (`core`)")
NOTIFICATION = ("hook", "event", "when")


def test_every_first_party_plugin_loads(real_discover):
    found = _first_party_plugins(real_discover)
    assert found, "no first-party plugin found: is the project installed (pip install -e .)?"
    assert {name: info.error for name, info in found.items() if info.target is None or info.error} == {}


def test_the_hook_tables_have_a_row_for_each_hook_and_no_other():
    pipeline, notification = _table(*PIPELINE), _table(*NOTIFICATION)
    assert set(pipeline) == PIPELINE_HOOKS
    assert sorted([*pipeline, *notification]) == sorted(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_hook_is_documented(name):
    spec = HOOKS[name].spec
    assert spec is not None
    assert (spec.function.__doc__ or "").strip(), f"hookspec {name} has no docstring"
    table = _table(*PIPELINE) if name in PIPELINE_HOOKS else _table(*NOTIFICATION)
    assert name in table, f"docs/plugins.md does not document hook {name} in its table"
    row = table[name]
    if name in PIPELINE_HOOKS:
        assert _names(row[1]) == list(spec.argnames), f"docs/plugins.md: arguments of {name}"
        assert ("(firstresult)" in row[0]) == bool(spec.opts.get("firstresult")), f"docs/plugins.md: {name}"
    else:
        assert list(spec.argnames) == ["event", "trainer"]  # as the page says every notification hook takes
        events = [event for event, cls in EVENTS.items() if cls.hook == name]
        assert (_names(row[1]) == events) if events else (row[1] == "any event"), f"docs/plugins.md: event of {name}"


def test_the_events_table_has_a_row_for_each_event_and_no_other():
    assert sorted(_table("event", "fields")) == sorted(EVENTS)


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_every_event_is_documented_with_its_fields(name):
    cls = EVENTS[name]
    assert (cls.__doc__ or "").strip(), f"event {name} has no docstring"
    table = _table("event", "fields")
    assert name in table, f"docs/plugins.md does not document event {name} in its table"
    listed = _names(_listed(table[name][1]))
    assert len(listed) == len(set(listed)) and set(listed) == set(cls.model_fields), (
        f"docs/plugins.md lists {listed} as the fields of {name}, which has {list(cls.model_fields)}")


def _listed_after(pattern: str) -> set[str]:
    """The plugin names in backticks that the page's sentence matching ``pattern`` lists."""
    found = re.search(pattern, " ".join(PAGE.split()))
    assert found, f"docs/plugins.md no longer has a sentence matching {pattern!r}"
    return set(_names(found.group(1)))


def test_the_page_says_what_each_first_party_plugin_is(real_discover):
    """Which first-party plugins are on by default, on rank 0 only, critical or observers."""
    plugins = {name: info.target for name, info in _first_party_plugins(real_discover).items()}
    assert _listed_after(r"`enabled_by_default = True` is on in every run \(first party: ([^)]*)\)") == {
        name for name, target in plugins.items() if getattr(target, "enabled_by_default", False)}
    assert _listed_after(r"write each file N times: first party, ([^(]*)\(") == {
        name for name, target in plugins.items() if getattr(target, "main_process_only", False)}
    for role, pattern in (("critical", r"First party: ([^;]*) are critical;"),
                          ("observer", r"are critical; ([^.]*) are observers\.")):
        assert _listed_after(pattern) == {name for name, target in plugins.items() if role_of(target) == role}, role
