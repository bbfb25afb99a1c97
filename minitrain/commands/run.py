"""``minitrain run RECIPE``: train a recipe, as a sequence of named steps: the request read from
the command line, the run prepared (:mod:`minitrain.commands.start`), fitted, and how it ended
said in one line. ``--smoke`` checks a recipe in two steps (:mod:`minitrain.commands.smoke`);
``--nproc N`` runs it on N processes (:mod:`minitrain.commands.launch`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from minitrain.commands import exits, launch, options, smoke
from minitrain.commands.exits import RunFailed, failure
from minitrain.commands.start import NO_CHECKPOINT, RunRequest, new_run_hint, prepare, resume_command
from minitrain.engine import checkpointing, distributed
from minitrain.engine.errors import MinitrainError, TrainingInterrupted
from minitrain.engine.trainer import Trainer
from minitrain.records.losses import loss_reduction, per_sample_metrics


def add_parser(command) -> None:
    """Register ``minitrain run`` (``command`` is the CLI's sub-parser factory)."""
    add_arguments(command("run", help="train a recipe"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_config(parser)
    options.add_plugins(parser)
    parser.add_argument(
        "--run-dir",
        help="where the run writes its files (default runs/<recipe>-<timestamp>); "
        "it must be new or empty unless the run resumes",
    )
    parser.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint file, or 'auto': the newest in --run-dir's checkpoints (a new "
        "run where the directory is absent or empty); the run's config and plugins are the "
        "ones it recorded, and --set may change only what can change mid-run (epochs, ...)",
    )
    parser.add_argument(
        "--move-aside",
        action="store_true",
        help="if --run-dir holds an earlier run, move it to DIR.aside-<time>/ and start afresh",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the check before a long run: one epoch of 2 training and 2 validation batches with every "
        "plugin, a report of what was checked; its run directory is removed unless --run-dir "
        "is given",
    )
    parser.add_argument("--trace-hooks", action="store_true", help="print every hook call (very verbose)")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with DDP on N processes of this machine (relaunches itself through torchrun)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        metavar="R",
        help="with --nproc: when a process fails, restart the group up to R times, each restart "
        "resuming from the newest checkpoint (torchrun's --max-restarts)",
    )
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from this checkpoint's model weights (not its optimizer or progress): fine-tuning",
    )
    parser.add_argument(
        "--init-skip-mismatched",
        action="store_true",
        help="with --init-from: leave tensors whose name or shape differ (a new head) as the recipe "
        "initialises them, instead of stopping with the list",
    )
    parser.set_defaults(func=main)


def run_command(argv: list[str]) -> int:
    """``minitrain run ARGV`` (``argv[0]`` is ``run``) as the command line runs it, with its exit
    code and one-line errors: the body of a sweep's trial process."""
    parser = argparse.ArgumentParser(prog="minitrain run", parents=[options.common()], allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.argv, args.debug = list(argv), getattr(args, "debug", False)
    return exits.call(main, args)


def main(args: argparse.Namespace) -> int:
    request = request_from(args)
    if args.smoke:
        return smoke.run(request, args)
    if args.nproc is not None:
        return launch.run(request, args)
    if args.max_restarts is not None:
        raise MinitrainError(
            "--max-restarts goes with --nproc (under torchrun itself, give torchrun's own --max-restarts)"
        )
    trainer = prepare(request)
    if args.trace_hooks:
        trace_hooks(trainer)
    interrupted = fit(trainer, args)
    if interrupted:
        return interrupted
    say_done(trainer, args)
    distributed.leave()
    return 0


def request_from(args: argparse.Namespace) -> RunRequest:
    return RunRequest(
        args.recipe,
        args.overrides,
        args.plugins,
        args.disabled,
        args.run_dir,
        args.resume,
        args.init_from,
        args.init_skip_mismatched,
        args.move_aside,
        args.config_file,
    )


def trace_hooks(trainer: Trainer) -> None:
    trainer.pm.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
    trainer.pm.enable_tracing()


def fit(trainer: Trainer, args: argparse.Namespace) -> int | None:
    """Train. A signal that stopped the run is its exit code (130, 143), said with how to resume;
    a failure, :class:`RunFailed`."""
    try:
        trainer.fit()
    except TrainingInterrupted as exc:
        print(f"minitrain: {exc} at step {trainer.state.global_step}; {resume_hint(args, trainer)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if args.debug:
            raise
        raise RunFailed(failure(trainer, exc)) from exc
    return None


def say_done(trainer: Trainer, args: argparse.Namespace) -> None:
    """The run's last line; where a run limit stopped it, how to go on."""
    if not distributed.is_main():
        return
    state = trainer.state
    shown = per_sample_metrics(state.metrics, trainer.config.get("batch_size"), loss_reduction(trainer.loss_fn))
    metrics = ", ".join(f"{key}={value:.4g}" for key, value in shown.items())  # none before an epoch ends
    parts = [f"done: {state.epoch} epochs, {state.global_step} steps", metrics, f"run dir: {trainer.run_dir}"]
    print("; ".join(part for part in parts if part))
    if state.stop is not None and state.stop.at_limit:
        if state.stop.kind == "max_steps" and trainer.schedule_steps is not None:  # max_steps sized the schedule
            hint = new_run_hint(newest) if (newest := _newest_checkpoint(trainer)) else NO_CHECKPOINT
        else:
            more = " and a larger --set max_steps=N" if state.stop.kind == "max_steps" else ""
            hint = f"{resume_hint(args, trainer)}{more}"
        print(f"minitrain: stopped at step {state.global_step}: {state.stop.reason}; {hint}", file=sys.stderr)


def _newest_checkpoint(trainer: Trainer) -> Path | None:
    """The run's newest checkpoint file, by name only (nothing is loaded)."""
    folders = checkpointing.checkpoint_dirs(trainer.run_dir, [p for _, p in trainer.pm.list_name_plugin()])
    files = [path for folder in folders for path in folder.glob("*.pt") if path.is_file()]
    return max(files, key=lambda path: path.stat().st_mtime_ns, default=None)


def resume_hint(args: argparse.Namespace, trainer: Trainer) -> str:
    """The command that continues this run, if a checkpoint of it is on disk."""
    folders = checkpointing.checkpoint_dirs(trainer.run_dir, [p for _, p in trainer.pm.list_name_plugin()])
    if not checkpointing.any_files(folders):
        return NO_CHECKPOINT
    return f"resume with: {shlex.join(resume_command(args, trainer.run_dir))}"
