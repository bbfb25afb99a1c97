"""``minitrain config RECIPE [--config FILE] [--set KEY=VALUE ...]``: the config a run of the recipe
would use, as TOML, each field with where its value comes from (the recipe's default, the
``--config`` file or ``--set``) and its default where it differs. The output is itself a valid
``--config`` file: a field whose value is unset (None) is left as a comment."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from minitrain.commands import options
from minitrain.kit.recipe import load_recipe, make_config, parse_overrides, read_config_file


def add_parser(command) -> None:
    """Register ``minitrain config``."""
    parser = command(
        "config", help="print the config a run of the recipe would use, as TOML, with each field's default and source"
    )
    options.add_config(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    from_file = read_config_file(args.config_file) if args.config_file else {}
    config = make_config(recipe, args.overrides, file=from_file, file_name=str(args.config_file))
    given = parse_overrides(args.overrides)
    print(
        f"# the config of a run of {args.recipe}"
        + (f" with --config {args.config_file}" if from_file else "")
        + (" and --set" if given and from_file else " with --set" if given else "")
    )
    print(to_toml(config, from_file, given, str(args.config_file)))
    return 0


def to_toml(config: BaseModel, from_file: dict[str, Any], given: dict[str, Any], file_name: str) -> str:
    """``config`` as TOML: plain fields first, then a table per nested model, each line with its
    source and, where the value is not the default, the default."""
    plain, tables = [], []
    defaults = type(config)() if _all_defaulted(type(config)) else None
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        source = "--set" if name in given else f"--config {file_name}" if name in from_file else "default"
        if isinstance(value, BaseModel):
            table = to_toml(value, from_file.get(name) or {}, given.get(name) or {}, file_name)
            tables.append(f"\n[{name}]\n{table}")
            continue
        default = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
        note = source if _same(value, default) else f"{source}; default {_literal(default)}"
        key = f"{name} = {_literal(value)}" if value is not None else f"# {name} = (unset)"
        plain.append((key, note))
    width = max((len(key) for key, _ in plain), default=0)
    lines = [f"{key.ljust(width)}  # {note}" for key, note in plain]
    return "\n".join(lines + tables)


def _all_defaulted(model: type[BaseModel]) -> bool:
    return all(not field.is_required() for field in model.model_fields.values())


def _same(a: Any, b: Any) -> bool:
    return _jsonable(a) == _jsonable(b)


def _jsonable(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value)


def _literal(value: Any) -> str:
    """A TOML literal: strings (and paths) quoted, lists as arrays, numbers and booleans as they are."""
    value = _jsonable(value)
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_literal(item)}" for key, item in value.items()) + " }"
    return json.dumps(str(value))
