"""``minitrain summary RECIPE``: the recipe's model, module by module, with the output shape of
each for one real batch and its parameters. Nothing is written."""

from __future__ import annotations

import argparse

from minitrain.commands import options
from minitrain.commands.start import RunRequest, build_trainer, plan
from minitrain.engine.device import to_device
from minitrain.engine.errors import MinitrainError
from minitrain.kit.summary import describe_model, table


def add_parser(command) -> None:
    """Register ``minitrain summary``."""
    parser = command("summary", help="the recipe's model, module by module, with output shapes for one batch")
    options.add_config(parser)
    parser.add_argument("--depth", type=int, default=3, help="levels of nested modules to show (default 3)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    planned = plan(RunRequest(args.recipe, args.overrides, config_file=args.config_file))
    trainer, parts = build_trainer(planned, run_dir=None)
    model = parts.model.to(trainer.device)
    batch = next(iter(trainer.train_loader), None)
    if batch is None:
        raise MinitrainError("summary: the training loader yielded no batch to pass through the model")
    inputs = to_device(batch, trainer.device)[0]
    print(f"{args.recipe}: {describe_model(model)}")
    print(table(model, inputs, args.depth))
    return 0
