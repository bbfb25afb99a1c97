"""The plugin author's page, docs/plugins.md, documents every hook and every event, first-party
ones included, row by row: each hook has a row in its table, a pipeline hook with the arguments its
spec takes, a notification hook with the event it receives; each event has a row in the events
table listing exactly the fields of its model. Where the page lists first-party plugins (on by
default, rank 0 only, critical, observer), it lists every one that is. Nothing is skipped: a
first-party plugin that fails to import fails here, since it could not be checked.

The other pages are kept in step with the code the same way, from their tables: docs/plugins.md
lists exactly the members of the plugin surface (``RunView``, ``TrainerView``, ``Shared``,
``RunState``); docs/recipes.md every field of ``RecipeConfig`` and ``Components`` with its
default; docs/cli.md every command the parser has, each with exactly its options;
docs/plugin-reference.md every first-party plugin with exactly its options. The README stays a
short guide, and no relative link in the docs points nowhere."""

import argparse
import ast
import dataclasses
import inspect
import re
import warnings
from pathlib import Path

import pytest

from minitrain.engine.events import EVENT_TYPES
from minitrain.engine.hookspecs import PIPELINE_HOOKS
from minitrain.engine.registry import FIRST_PARTY, discover, make_plugin_manager, role_of

ROOT = Path(__file__).parent.parent
PAGE = (ROOT / "docs" / "plugins.md").read_text()


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
EVENTS = {
    name: cls for name, cls in EVENT_TYPES.items() if cls.__module__.startswith(("minitrain.", "minitrain_plugins."))
}


def _table(*header: str, page: str = PAGE, where: str = "docs/plugins.md") -> dict[str, list[str]]:
    """The rows of the page's table with this header, by the first name in backticks of each row
    (up to its first parenthesis: ``request_stop(reason, kind)`` is ``request_stop``)."""
    lines = page.splitlines()
    starts = [i for i, line in enumerate(lines) if _cells(line) == list(header)]
    assert len(starts) == 1, f"{where}: expected one table headed {' | '.join(header)}"
    rows: dict[str, list[str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        name = _names(cells[0])[0].split("(")[0]
        assert name not in rows, f"{where}: two rows for {name}"
        rows[name] = cells
    return rows


def _cells(line: str) -> list[str]:
    """A table row's cells; ``\\|`` is a pipe inside a cell, as GitHub reads it."""
    if not line.startswith("|"):
        return []
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


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
        f"docs/plugins.md lists {listed} as the fields of {name}, which has {list(cls.model_fields)}"
    )


def _listed_after(pattern: str) -> set[str]:
    """The plugin names in backticks that the page's sentence matching ``pattern`` lists."""
    found = re.search(pattern, " ".join(PAGE.split()))
    assert found, f"docs/plugins.md no longer has a sentence matching {pattern!r}"
    return set(_names(found.group(1)))


def test_the_page_says_what_each_first_party_plugin_is(real_discover):
    """Which first-party plugins are on by default, on rank 0 only, critical or observers."""
    plugins = {name: info.target for name, info in _first_party_plugins(real_discover).items()}
    assert _listed_after(r"`enabled_by_default = True` is on in every run \(first party: ([^)]*)\)") == {
        name for name, target in plugins.items() if getattr(target, "enabled_by_default", False)
    }
    assert _listed_after(r"write each file N times: first party, ([^(]*)\(") == {
        name for name, target in plugins.items() if getattr(target, "main_process_only", False)
    }
    for role, pattern in (
        ("critical", r"First party: ([^;]*) are critical;"),
        ("observer", r"are critical; ([^.]*) are observers\."),
    ):
        assert _listed_after(pattern) == {name for name, target in plugins.items() if role_of(target) == role}, role


# --- the plugin surface (docs/plugins.md) --------------------------------------------------------


def _declared(cls) -> set[str]:
    """The members a class of the plugin surface declares itself: its fields (a dataclass's) or
    annotated attributes (a protocol's), and its public methods and properties; not what it
    inherits, so that ``TrainerView`` gives only what it adds to ``RunView``."""
    own = inspect.get_annotations(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name in own} if dataclasses.is_dataclass(cls) else set(own)
    calls = {
        name
        for name, value in vars(cls).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }
    return fields | calls


def _surface():
    from minitrain.engine.state import RunState
    from minitrain.engine.surface import RunView, Shared, TrainerView

    return {
        "RunView": (RunView, "member"),
        "TrainerView": (TrainerView, "member"),
        "Shared": (Shared, "field"),
        "RunState": (RunState, "field"),
    }


@pytest.mark.parametrize("name", ["RunView", "TrainerView", "Shared", "RunState"])
def test_the_surface_tables_list_exactly_the_declared_members(name):
    cls, kind = _surface()[name]
    declared = _declared(cls)
    assert declared, f"{name} declares nothing: is it still where the test looks?"
    assert set(_table(f"`{name}` {kind}", "type", "meaning")) == declared, (
        f"docs/plugins.md: the {name} table lists other members than {name} declares ({sorted(declared)})"
    )


def test_the_page_names_no_trainer_attribute_that_left_the_surface():
    """Old prose told plugins to read these on the trainer itself; they are on ``state`` and
    ``shared`` now (``trainer.state.epoch``, ``trainer.shared.stepping``)."""
    gone = (
        "stepping",
        "grad_scaler",
        "step_metrics",
        "epoch",
        "batch_idx",
        "global_step",
        "stop_reason",
        "in_step",
        "metrics",
        "epoch_number",
        "max_steps",
        "max_time",
    )
    pages = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}
    found = {
        (page, match) for page, text in pages.items() for match in re.findall(rf"\btrainer\.({'|'.join(gone)})\b", text)
    }
    assert not found, f"docs name trainer attributes that are not on the plugin surface: {sorted(found)}"


# --- recipes (docs/recipes.md) -------------------------------------------------------------------

RECIPES = (ROOT / "docs" / "recipes.md").read_text()
RECIPE_CONFIG = ("`RecipeConfig` field", "type", "default", "meaning")
COMPONENTS = ("`Components` field", "type", "default", "meaning")


def _shown_default(cell: str):
    """What a default cell shows: ``required`` (no default), or the first value in backticks, read
    as a Python literal where it is one (``1e-3``, ``"auto"``, ``None``, ``[]``), else as text."""
    values = _names(cell)
    if not values:
        assert cell == "required", (
            f"docs/recipes.md: a default cell must show a value in backticks, or say required: {cell!r}"
        )
        return dataclasses.MISSING
    try:
        return ast.literal_eval(values[0])
    except (ValueError, SyntaxError):
        return values[0]


def _same_default(shown, default) -> bool:
    if isinstance(default, Path):
        return isinstance(shown, str) and Path(shown).expanduser() == default
    if callable(default):  # a function: named by its module and name
        return shown == f"{default.__module__}.{default.__qualname__}"
    if isinstance(default, bool) or isinstance(shown, bool):
        return shown is default
    if isinstance(default, (int, float)) and isinstance(shown, (int, float)):
        return shown == default
    return type(shown) is type(default) and shown == default


def test_the_recipe_config_table_has_a_row_for_each_field_and_no_other():
    import minitrain

    assert set(_table(*RECIPE_CONFIG, page=RECIPES, where="docs/recipes.md")) == set(
        minitrain.RecipeConfig.model_fields
    )


def test_the_recipe_config_table_shows_each_default(monkeypatch):
    import minitrain

    monkeypatch.delenv("MINITRAIN_DATA", raising=False)  # data_dir's default as the page states it
    rows = _table(*RECIPE_CONFIG, page=RECIPES, where="docs/recipes.md")
    wrong = {}
    for name, info in minitrain.RecipeConfig.model_fields.items():
        default = dataclasses.MISSING if info.is_required() else info.get_default(call_default_factory=True)
        shown = _shown_default(rows[name][2])
        if default is dataclasses.MISSING or shown is dataclasses.MISSING:
            if default is not shown:
                wrong[name] = (rows[name][2], default)
        elif not _same_default(shown, default):
            wrong[name] = (rows[name][2], default)
    assert not wrong, f"docs/recipes.md shows these RecipeConfig defaults wrongly (shown, in the code): {wrong}"


def test_the_components_table_has_a_row_for_each_field_and_no_other():
    import minitrain

    assert set(_table(*COMPONENTS, page=RECIPES, where="docs/recipes.md")) == {
        f.name for f in dataclasses.fields(minitrain.Components)
    }


def test_the_components_table_shows_each_default():
    import minitrain

    rows = _table(*COMPONENTS, page=RECIPES, where="docs/recipes.md")
    wrong = {}
    for field in dataclasses.fields(minitrain.Components):
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        shown = _shown_default(rows[field.name][2])
        if default is dataclasses.MISSING or shown is dataclasses.MISSING:
            if default is not shown:
                wrong[field.name] = (rows[field.name][2], default)
        elif not _same_default(shown, default):
            wrong[field.name] = (rows[field.name][2], default)
    assert not wrong, f"docs/recipes.md shows these Components defaults wrongly (shown, in the code): {wrong}"


# --- the command line (docs/cli.md) --------------------------------------------------------------

CLI = (ROOT / "docs" / "cli.md").read_text()
OPTIONS = ("option", "meaning")
EVERYWHERE = {"-h", "--help", "--debug"}  # every command has them; the page states them once, at the top


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command and sub-command of ``parser``: ``("sweep", "run")`` -> its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _sections(text: str) -> dict[str, list[str]]:
    """The lines under each heading, to the next heading, by the heading's text (fenced code,
    whose comments start with #, is not a heading)."""
    sections: dict[str, list[str]] = {}
    current, fenced = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            current = line.lstrip("#").strip()
            assert current not in sections, f"two headings {current!r}"
            sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    return sections


def _listed_options(lines: list[str], where: str) -> set[str]:
    """The options that the section's option table lists (none where it has no table)."""
    tables = [i for i, line in enumerate(lines) if _cells(line) == list(OPTIONS)]
    assert len(tables) <= 1, f"docs/cli.md: {where} has more than one option table"
    listed: set[str] = set()
    for line in lines[tables[0] + 2 :] if tables else []:
        if not line.startswith("|"):
            break
        names = [name.split()[0] for name in _names(_cells(line)[0])]
        assert names and all(name.startswith("-") for name in names), f"docs/cli.md: {where}: {line}"
        assert not listed & set(names), f"docs/cli.md: {where} lists {names} twice"
        listed |= set(names)
    return listed


def _parser():
    from minitrain.commands import cli

    return cli.parser()


def _command_sections() -> dict[tuple[str, ...], list[str]]:
    found = {}
    for heading, lines in _sections(CLI).items():
        command = re.fullmatch(r"`minitrain ([a-z][a-z -]*)`", heading)
        if command:
            found[tuple(command.group(1).split())] = lines
    return found


def test_the_cli_page_has_a_section_for_each_command_and_no_other():
    commands = {path for path, _ in _commands(_parser())}
    assert {("run",), ("sweep", "run"), ("sweep", "best")} <= commands  # the walk reaches sub-commands
    assert set(_command_sections()) == commands


@pytest.mark.parametrize("path", sorted(path for path, _ in _commands(_parser())), ids=" ".join)
def test_the_cli_page_lists_exactly_the_options_of_each_command(path):
    parser = dict(_commands(_parser()))[path]
    sections = _command_sections()
    assert path in sections, f"docs/cli.md has no section for minitrain {' '.join(path)}"
    assert _listed_options(sections[path], f"minitrain {' '.join(path)}") == _options(parser) - EVERYWHERE


def test_the_cli_page_lists_the_options_of_minitrain_itself():
    top = _parser()
    lines = _sections(CLI)["The `minitrain` command"]
    assert _listed_options(lines, "its top") == _options(top) - {"-h", "--help"}
    assert all("--debug" in _options(parser) for _, parser in _commands(top)), "--debug is not accepted everywhere"


# --- the README and links ------------------------------------------------------------------------

DOCS = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def test_the_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a page under docs/"
    setup = [
        "```bash",
        "make demo   # creates .venv, installs minitrain, trains recipes/cifar10_quick.py on CIFAR-10",
        "make test   # same environment, runs the test suite (offline, on generated data)",
        "```",
    ]
    assert lines[2:6] == setup, "README.md: the two set-up commands come first"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _links(text: str) -> list[str]:
    """The targets of the page's Markdown links, outside code."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    links = [link for link in _links(page.read_text()) if not re.match(r"[a-z]+:", link)]
    broken = []
    for link in links:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif anchor and path.suffix == ".md":
            slugs = [_slug(heading) for heading in _sections(path.read_text())]
            if anchor not in slugs:
                broken.append(link)
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


# --- first-party plugins (docs/plugin-reference.md) ----------------------------------------------

REFERENCE = (ROOT / "docs" / "plugin-reference.md").read_text()


def test_the_plugin_reference_lists_each_first_party_plugin_with_exactly_its_options(real_discover):
    plugins = {name: info.target for name, info in _first_party_plugins(real_discover).items()}
    rows = _table("plugin", "what", "options", page=REFERENCE, where="docs/plugin-reference.md")
    assert set(rows) == set(plugins)
    wrong = {
        name: _names(rows[name][2])
        for name, target in plugins.items()
        if _names(rows[name][2]) != list(getattr(getattr(target, "Config", None), "model_fields", {}))
    }
    assert not wrong, f"docs/plugin-reference.md lists other options than these plugins' Config has: {wrong}"
    default = {name for name, target in plugins.items() if getattr(target, "enabled_by_default", False)}
    for where, text in (("docs/plugin-reference.md", REFERENCE), ("README.md", (ROOT / "README.md").read_text())):
        on = re.search(r"((?:`\w+`(?:, | and )?)+) are on by default", " ".join(text.split()))
        assert on and set(_names(on.group(1))) == default, f"{where}: the plugins on by default are {sorted(default)}"
