"""The options several commands share, each declared once: a recipe's config (``--config FILE``,
``--set KEY=VALUE``) and the plugins (``--plugin``, ``--no-plugin``)."""

from __future__ import annotations

import argparse


def common() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name: ``--debug``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors"
    )
    return parser


def add_config(parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    """``RECIPE`` (unless ``recipe`` is false), ``--config FILE`` and ``--set KEY=VALUE``."""
    if recipe:
        parser.add_argument("recipe", help="path to a recipe file, e.g. recipes/cifar10_quick.py")
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE.toml",
        help="config values from a TOML file (top-level keys are the recipe's fields); --set overrides them",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (dotted keys for nested fields); repeatable",
    )


def add_plugins(parser: argparse.ArgumentParser, required: bool = False, disable: bool = True) -> None:
    """``--plugin NAME[:KEY=VALUE,...]`` (``required``: at least one) and ``--no-plugin NAME``."""
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=None if required else [],
        required=required,
        metavar="NAME[:KEY=VALUE,...]",
        help="enable a plugin (an installed one's name, or a local one's import path, module.Class), "
        "with options (every plugin takes role=critical|observer); repeatable",
    )
    if disable:
        parser.add_argument(
            "--no-plugin",
            dest="disabled",
            action="append",
            default=[],
            metavar="NAME",
            help="disable a plugin that is on by default or enabled by the recipe; repeatable",
        )
