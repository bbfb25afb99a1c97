"""The ``minitrain`` command. Each command is a module of :mod:`minitrain.commands` that
registers its own parser; options several share are declared once (:mod:`.options`). Bad input
prints one line and exits 2 before any work; a run that fails while training prints one line
naming where, keeps the traceback in the run's errors.log and exits 1; ``--debug`` (anywhere on
the line) shows tracebacks instead (:mod:`.exits`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from minitrain.commands import (
    catalogue,
    compare,
    config,
    exits,
    export,
    lr_find,
    options,
    predict,
    replay,
    run,
    runs,
    serve,
    summary,
    sweep,
)
from minitrain.engine import __version__
from minitrain.engine.registry import DISABLE_AUTOLOAD_ENV

IMPLIED = {"sweep": ("run", "show", "best")}
"""A command whose first word may be left out: ``minitrain sweep RECIPE`` is ``sweep run RECIPE``."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(_implied(argv))
    except SystemExit as exc:  # --help, --version, or a usage error said in one line
        return exc.code if isinstance(exc.code, int) else exits.BAD_INPUT
    args.argv = argv  # for `run --nproc` to relaunch itself
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV)
    if args.disable_plugin_autoload:  # through the environment, so that torchrun's children see it too
        os.environ[DISABLE_AUTOLOAD_ENV] = "1"
    try:
        return exits.call(args.func, args)
    finally:
        if autoload is None:
            os.environ.pop(DISABLE_AUTOLOAD_ENV, None)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(exits.BAD_INPUT, f"minitrain: error: {self.prog}: {message} (--help shows the usage)\n")


def parser() -> argparse.ArgumentParser:
    common = options.common()
    top = _Parser(prog="minitrain", description="Plugin-based PyTorch training.", allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"minitrain {__version__}")
    top.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    top.add_argument(
        "--disable-plugin-autoload",
        action="store_true",
        help=f"import no third-party plugin unless named with --plugin (as {DISABLE_AUTOLOAD_ENV}=1)",
    )
    sub: argparse._SubParsersAction[argparse.ArgumentParser]  # (of _Parser ones) so that `common` may be a parent
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kwargs)

    command.common = common  # type: ignore[attr-defined]  # a function attribute: for commands with sub-commands

    run.add_parser(command)
    config.add_parser(command)
    summary.add_parser(command)
    lr_find.add_parser(command)
    catalogue.add_parsers(command)
    replay.add_parsers(command)
    export.add_parser(command)
    predict.add_parser(command)
    serve.add_parser(command)
    runs.add_parser(command)
    compare.add_parser(command)
    sweep.add_parser(command)
    return top


def _implied(argv: list[str]) -> list[str]:
    """``argv`` with the first word of a command that implies it put in (see :data:`IMPLIED`)."""
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if at is None or argv[at] not in IMPLIED or at + 1 == len(argv):
        return argv
    forms, following = IMPLIED[argv[at]], argv[at + 1]
    if following in forms or following in ("-h", "--help"):
        return argv
    return [*argv[: at + 1], forms[0], *argv[at + 1 :]]
