"""``minitrain plugins`` and ``minitrain events``: what is installed, and what it can hear.

``plugins`` lists every plugin the ``minitrain`` entry points offer (first party and third party
alike): version, distribution, on by default or not, role, hooks and options; ``--order`` prints
each hook's implementations in call order for a set of plugins. ``events`` lists the event
catalogue, each event's hook and typed fields; ``--json-schema`` gives their JSON Schemas."""

from __future__ import annotations

import argparse
import inspect
import json
import types
import typing

from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from minitrain.commands import options
from minitrain.engine.events import EVENT_TYPES
from minitrain.engine.registry import (
    discover,
    hook_order,
    make_plugin_manager,
    parse_plugin_spec,
    register_plugin,
    resolve,
    role_of,
)


def add_parsers(command) -> None:
    """Register ``minitrain plugins`` and ``minitrain events``."""
    parser = command("plugins", help="list installed plugins")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--order",
        action="store_true",
        help="print each hook's implementations in call order for the default plugins plus any --plugin given",
    )
    options.add_plugins(parser)
    parser.set_defaults(func=plugins)

    parser = command("events", help="list the event catalogue")
    parser.add_argument("--json-schema", action="store_true", help="print every event's JSON Schema")
    parser.set_defaults(func=events)


def plugins(args: argparse.Namespace) -> int:
    available = discover()
    if args.order:
        pm = make_plugin_manager()
        for name, plugin in resolve([parse_plugin_spec(p) for p in args.plugins], set(args.disabled), available):
            register_plugin(pm, plugin, name)
        order = hook_order(pm)
        if args.json:
            print(json.dumps(order, indent=2))
        else:
            for hook, impls in order.items():
                print(f"{hook}: " + " -> ".join(impls))
        return 0
    rows: list[dict[str, typing.Any]] = [
        {
            "name": info.name,
            "version": info.version,
            "distribution": info.distribution,
            "enabled_by_default": info.enabled_by_default,
            "hooks": implemented_hooks(info.target),
            "role": role_of(info.target) if info.error is None else None,
            "options": _options(info.config_model),
            "error": info.error,
        }
        for info in available.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["options"] = {
            key: "(required)" if option["required"] else json.dumps(option["default"])
            for key, option in row["options"].items()
        }
    if not rows:
        print("no plugins installed")
    for row in rows:
        state = "on by default" if row["enabled_by_default"] else "off by default"
        print(f"{row['name']} {row['version'] or ''} ({row['distribution']}, {state}, {row['role'] or '?'})")
        if row["error"]:
            print(f"    unavailable: {row['error']}")
        print(f"    hooks: {', '.join(row['hooks']) or '-'}")
        if row["options"]:
            print(f"    options: {', '.join(f'{k}={v}' for k, v in row['options'].items())}")
    return 0


def implemented_hooks(target: object) -> list[str]:
    """Hook names a plugin class or module implements (read from pluggy's markers)."""
    if target is None:
        return []
    return sorted(name for name, value in inspect.getmembers(target) if hasattr(value, "minitrain_impl"))


def _options(model) -> dict[str, dict]:
    """Each option's default (as JSON), whether it is required, and its description."""
    if model is None:
        return {}
    return {
        name: {
            "default": None
            if field.is_required()
            else to_jsonable_python(field.get_default(call_default_factory=True)),
            "required": field.is_required(),
            "description": field.description,
        }
        for name, field in model.model_fields.items()
    }


def events(args: argparse.Namespace) -> int:
    discover()  # importing plugins declares their events
    if args.json_schema:
        print(json.dumps({name: cls.model_json_schema() for name, cls in EVENT_TYPES.items()}, indent=2))
        return 0
    for name, cls in EVENT_TYPES.items():
        fields = ", ".join(f"{f}: {_type_name(info.annotation)}" for f, info in cls.model_fields.items())
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name} -> {cls.hook}({fields})\n    {doc}")
    return 0


def _type_name(annotation) -> str:
    """``Optional[Annotated[int, ...]]`` -> ``int | None``: the type as a plugin author reads it."""
    args = [a for a in typing.get_args(annotation) if not isinstance(a, FieldInfo)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
