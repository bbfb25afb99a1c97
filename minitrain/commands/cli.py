"""The ``minitrain`` command. Bad input prints one line and exits 2 before any work; a run that
fails while training prints one line naming where, keeps the traceback in the run's errors.log
and exits 1; ``--debug`` (anywhere on the line) shows tracebacks instead. A run stopped by
SIGINT/SIGTERM prints how to resume it and exits 130/143."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import types
import typing
import warnings
from typing import NoReturn

from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from minitrain.engine import __version__
from minitrain.commands import compare, runs, sweep
from minitrain.engine.errors import MinitrainError, RunComplete, TrainingInterrupted
from minitrain.engine.files import one_line
from minitrain.engine.registry import DISABLE_AUTOLOAD_ENV

BAD_INPUT, FAILED = 2, 1
"""Exit codes besides 0 and the signals' 130/143: bad input (found before training starts), and a
run that failed while training."""


class RunFailed(Exception):
    """Training started and then failed; the message is the one line to print."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for `run --nproc` to relaunch itself
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    autoload = os.environ.get(DISABLE_AUTOLOAD_ENV)
    if args.disable_plugin_autoload:  # through the environment, so that torchrun's children see it too
        os.environ[DISABLE_AUTOLOAD_ENV] = "1"
    try:
        return args.func(args) or 0
    except RunComplete as exc:  # a finished run resumed again (a requeue, a restart): nothing to do
        from minitrain.engine import distributed

        if distributed.is_main():
            print(f"minitrain: {exc}")
        distributed.leave()
        return 0
    except (MinitrainError, RunFailed) as exc:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"minitrain: error: {message}", file=sys.stderr)
        return FAILED if isinstance(exc, RunFailed) else BAD_INPUT
    except KeyboardInterrupt:
        if not os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun the launcher says it, once
            print("minitrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minitrain runs | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    finally:
        warnings.showwarning = shown
        if autoload is None:
            os.environ.pop(DISABLE_AUTOLOAD_ENV, None)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"minitrain: warning: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"minitrain: error: {self.prog}: {message} (--help shows the usage)\n")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # accepted before or after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    parser = _Parser(prog="minitrain", description="Plugin-based PyTorch training.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"minitrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--disable-plugin-autoload", action="store_true",
                        help=f"import no third-party plugin unless named with --plugin (as {DISABLE_AUTOLOAD_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], allow_abbrev=False, **kwargs)

    run = command("run", help="train a recipe")
    run.add_argument("recipe", help="path to a recipe file, e.g. recipes/cifar10_quick.py")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (dotted keys for nested fields); repeatable")
    run.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                     help="enable a plugin (an installed one's name, or a local one's import path, module.Class), "
                          "with options (every plugin takes role=critical|observer); repeatable")
    run.add_argument("--no-plugin", dest="disabled", action="append", default=[], metavar="NAME",
                     help="disable a plugin that is on by default or enabled by the recipe; repeatable")
    run.add_argument("--run-dir", help="where the run writes its files (default runs/<recipe>-<timestamp>); "
                                       "it must be new or empty unless the run resumes")
    run.add_argument("--resume", metavar="PATH|auto",
                     help="continue from a checkpoint file, or 'auto': the newest in --run-dir's checkpoints "
                          "(starts fresh, saying so, if there is none); the run's config is the checkpoint's, "
                          "and --set may change only what can change mid-run (epochs, ...)")
    run.add_argument("--move-aside", action="store_true",
                     help="if --run-dir holds an earlier run, move it to DIR.aside-<time>/ and start afresh")
    run.add_argument("--smoke", action="store_true",
                     help="the check before a long run: one epoch of 2 training and 2 validation batches with every "
                          "plugin, a report of what was checked; its run directory is removed unless --run-dir is given")
    run.add_argument("--trace-hooks", action="store_true", help="print every hook call (very verbose)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train with DDP on N processes of this machine (relaunches itself through torchrun)")
    run.add_argument("--max-restarts", type=int, metavar="R",
                     help="with --nproc: when a process fails, restart the group up to R times, each restart "
                          "resuming from the newest checkpoint (torchrun's --max-restarts)")
    run.add_argument("--init-from", metavar="CHECKPOINT",
                     help="start from this checkpoint's model weights (not its optimizer or progress): fine-tuning")
    run.add_argument("--init-skip-mismatched", action="store_true",
                     help="with --init-from: leave tensors whose name or shape differ (a new head) as the recipe "
                          "initialises them, instead of stopping with the list")
    run.set_defaults(func=_cmd_run)

    summary = command("summary", help="the recipe's model, module by module, with output shapes for one batch")
    summary.add_argument("recipe")
    summary.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    summary.add_argument("--depth", type=int, default=3, help="levels of nested modules to show (default 3)")
    summary.set_defaults(func=_cmd_summary)

    lr_find = command("lr-find", help="the learning-rate range test: suggests an lr for the recipe")
    lr_find.add_argument("recipe")
    lr_find.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lr_find.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    lr_find.add_argument("--no-plugin", dest="disabled", action="append", default=[], metavar="NAME")
    lr_find.add_argument("--min-lr", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    lr_find.add_argument("--max-lr", type=float, default=10.0, help="last learning rate (default 10)")
    lr_find.add_argument("--steps", type=int, default=100, help="batches to try (default 100)")
    lr_find.add_argument("--out", metavar="FILE.png", help="the plot (default runs/lr-find/<recipe>-<time>.png)")
    lr_find.set_defaults(func=_cmd_lr_find)

    plugins = command("plugins", help="list installed plugins")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--order", action="store_true",
                         help="print each hook's implementations in call order for the default plugins "
                              "plus any --plugin given")
    plugins.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="NAME[:KEY=VALUE,...]")
    plugins.add_argument("--no-plugin", dest="disabled", action="append", default=[], metavar="NAME")
    plugins.set_defaults(func=_cmd_plugins)

    events = command("events", help="list the event catalogue")
    events.add_argument("--json-schema", action="store_true", help="print every event's JSON Schema")
    events.set_defaults(func=_cmd_events)

    report = command("report", help="redraw a run's plots and report.html from its event log")
    report.add_argument("run_dir", help="a run directory holding its event log (events.jsonl)")
    report.set_defaults(func=_cmd_report)

    replay = command("replay", help="feed a run's recorded events to plugins, without training")
    replay.add_argument("run_dir", help="a run directory holding its event log (events.jsonl)")
    replay.add_argument("--plugin", dest="plugins", action="append", required=True, metavar="NAME[:KEY=VALUE,...]",
                        help="plugin to replay the events through, with options; repeatable")
    replay.set_defaults(func=_cmd_replay)

    export = command("export", help="write a trained model as one self-contained file, with its metadata")
    export.add_argument("source", metavar="RUN_DIR|CHECKPOINT",
                        help="a run directory (its checkpoints/last.pt) or a checkpoint file inside one")
    export.add_argument("--format", dest="fmt", choices=["exported-program", "torchscript"], default="exported-program",
                        help="torch.export archive (.pt2, default) or TorchScript (.torchscript.pt)")
    export.add_argument("--out", metavar="FILE", help="where to write (default: in the run directory)")
    export.add_argument("--recipe", metavar="PATH", help="the run's recipe file, if it moved since training")
    export.add_argument("--ema", action="store_true",
                        help="export the moving average of the weights that the run's ema plugin kept")
    export.add_argument("--tta", action="store_true",
                        help="include the run's test-time augmentation (its tta plugin's views) in the model, so "
                             "that it scores as the run's validation did")
    export.set_defaults(func=_cmd_export)

    predict = command("predict", help="classify images with a model written by `minitrain export`")
    predict.add_argument("model", help="the exported model file")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or other image files, any size")
    predict.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    predict.add_argument("--resize", choices=["stretch", "crop"], default="stretch",
                         help="stretch each image to the input size (default), or scale its short side and "
                              "cut the centre (keeps the proportions)")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.set_defaults(func=_cmd_predict)

    runs.add_parser(sub, command)
    compare.add_parser(sub, command)
    sweep.add_parser(sub, command)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from minitrain.engine import distributed
    from minitrain.commands.start import plan, prepare

    if args.smoke:
        return _smoke(args)
    if args.nproc is not None:
        return _launch(args, plan)
    if args.max_restarts is not None:
        raise MinitrainError("--max-restarts goes with --nproc (under torchrun itself, give torchrun's own "
                             "--max-restarts)")
    trainer = prepare(args.recipe, args.overrides, args.plugins, args.disabled, args.run_dir, args.resume,
                      args.init_from, args.init_skip_mismatched, args.move_aside)
    if args.trace_hooks:
        trainer.pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        trainer.pm.enable_tracing()
    try:
        metrics = trainer.fit()
    except TrainingInterrupted as exc:
        print(f"minitrain: {exc} at step {trainer.global_step}; {_resume_hint(args, trainer)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if args.debug:
            raise
        raise RunFailed(_failure(trainer, exc)) from exc
    summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    if distributed.is_main():
        print(f"done: {trainer.epoch} epochs, {trainer.global_step} steps; {summary}; run dir: {trainer.run_dir}")
        if (trainer.stop_reason or "").startswith(("max_time=", "max_steps=")):  # a limit, not the end
            more = " and a larger --set max_steps=N" if trainer.stop_reason.startswith("max_steps") else ""
            print(f"minitrain: stopped at step {trainer.global_step}: {trainer.stop_reason}; "
                  f"{_resume_hint(args, trainer)}{more}", file=sys.stderr)
    distributed.leave()
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import time

    from minitrain.commands import smoke
    from minitrain.engine.registry import register_plugin
    from minitrain.commands.start import prepare

    if args.resume or args.nproc:
        raise MinitrainError("--smoke makes a fresh run in one process; it does not go with --resume or --nproc")
    started = time.perf_counter()
    trainer = prepare(args.recipe, [*args.overrides, *smoke.OVERRIDES], args.plugins, args.disabled,
                      args.run_dir or smoke.scratch_dir(), init_from=args.init_from,
                      init_skip_mismatched=args.init_skip_mismatched, move_aside=args.move_aside)
    recorder = smoke.Smoke(trainer)
    register_plugin(trainer.pm, recorder)
    try:
        trainer.fit()
    except Exception as exc:
        if args.debug:
            raise
        raise RunFailed(_failure(trainer, exc)) from exc
    print(recorder.report(args.recipe, trainer, time.perf_counter() - started, keep=args.run_dir is not None))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from minitrain.engine.device import to_device
    from minitrain.commands.start import build_trainer, plan
    from minitrain.kit.summary import describe_model, table

    planned = plan(args.recipe, args.overrides, disabled=["console", "jsonl", "csv"])
    trainer, parts = build_trainer(planned, run_dir=None)
    model = parts.model.to(trainer.device)
    batch = next(iter(trainer.train_loader), None)
    if batch is None:
        raise MinitrainError("summary: the training loader yielded no batch to pass through the model")
    inputs = to_device(batch, trainer.device)[0]
    print(f"{args.recipe}: {describe_model(model)}")
    print(table(model, inputs, args.depth))
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    import shlex

    from minitrain.commands.lr_find import lr_find

    result = lr_find(args.recipe, args.overrides, args.plugins, args.disabled, args.min_lr, args.max_lr,
                     args.steps, args.out)
    print(f"tried {len(result.lrs)} learning rates from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}; "
          f"plot: {result.plot}")
    if result.suggestion is None:
        print("no suggestion: the loss did not fall over the range (try a lower --min-lr or more --steps)")
        return 0
    command = ["minitrain", "run", args.recipe, *(f"--set={o}" for o in args.overrides),
               f"--set=lr={result.suggestion:.3g}", *(f"--plugin={p}" for p in args.plugins)]
    print(f"suggested lr: {result.suggestion:.3g} (where the loss falls fastest); to use it:\n  {shlex.join(command)}")
    if not result.diverged:
        print(f"note: the loss was still falling at --max-lr {args.max_lr:g}; a larger --max-lr or more --steps "
              "may move the suggestion")
    return 0


def _failure(trainer, exc: Exception) -> str:
    """One line for a run that failed while training: its own message for minitrain's errors
    (a non-finite loss), else where it happened and what was raised."""
    from minitrain.engine.trainer import ERROR_LOG

    log = os.path.join(trainer.run_dir, ERROR_LOG) if trainer.run_dir else None
    where = f" (traceback in {log})" if log and os.path.exists(log) else ""
    if isinstance(exc, MinitrainError):
        return f"{exc}{where}"
    return (f"training failed in epoch {trainer.epoch_number}, step {trainer.global_step + trainer.in_step}: "
            f"{one_line(exc)}{where}; --debug shows the traceback")


def _resume_hint(args: argparse.Namespace, trainer) -> str:
    """The command that continues this run, if a checkpoint of it is on disk."""
    from minitrain.engine import checkpointing

    folders = checkpointing.checkpoint_dirs(trainer.run_dir, [p for _, p in trainer.pm.list_name_plugin()])
    if not any(any(folder.glob("*.pt")) for folder in folders):
        return "no checkpoint was written (the run has --no-plugin checkpoint, or stopped before its first save)"
    return f"resume with: {shlex.join(_resume_command(args, trainer.run_dir))}"


def _resume_command(args: argparse.Namespace, run_dir: str) -> list[str]:
    return ["minitrain", "run", args.recipe, *(f"--set={o}" for o in args.overrides),
            *(f"--plugin={p}" for p in args.plugins), *(f"--no-plugin={d}" for d in args.disabled),
            *([f"--nproc={args.nproc}"] if args.nproc else []),
            *([f"--max-restarts={args.max_restarts}"] if args.nproc and args.max_restarts else []),
            "--run-dir", str(run_dir), "--resume", "auto"]


def _launch(args: argparse.Namespace, plan) -> int:
    """Run this command on N processes through torchrun's own launcher, in this process
    (``torchrun --standalone --nproc_per_node=N -m minitrain ARGV`` with ``--nproc`` removed),
    after checking here what can be checked (recipe, config, plugins, run directory, the checkpoint
    to resume), so that bad input is one line rather than one per process. On Ctrl-C the launcher
    stops the workers and this process says how to resume from the newest checkpoint, as a
    single-process run does. ``--max-restarts R`` is torchrun's: when a worker fails, the launcher
    restarts the group, and the restarted workers resume from the newest checkpoint by themselves
    (:func:`minitrain.commands.start.plan`); once R restarts are spent, one line says so, where the last
    checkpoint is and how to resume."""
    import logging

    from torch.distributed import run as torchrun  # imports the launcher's loggers
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from minitrain.engine import distributed, lock

    if args.nproc < 1:
        raise MinitrainError(f"--nproc must be at least 1, not {args.nproc}")
    if (args.max_restarts or 0) < 0:
        raise MinitrainError(f"--max-restarts must be 0 or more, not {args.max_restarts}")
    if distributed.launched():
        raise MinitrainError("--nproc: this process was already started by torchrun; drop --nproc")
    planned = plan(args.recipe, args.overrides, args.plugins, args.disabled, args.run_dir, args.resume,
                   args.init_from, args.move_aside)
    if lock.in_use(planned.run_dir):  # before N processes start, to be refused one by one
        raise MinitrainError(lock.busy(planned.run_dir))
    rest = _without(args.argv, "--nproc", "--max-restarts")
    if args.run_dir is None:  # the name chosen here, so that the resume hint can name it
        rest += ["--run-dir", str(planned.run_dir)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))  # cores shared out
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed.elastic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # its warnings narrate the shutdown that this process reports in one line
        logger.setLevel(logging.ERROR)
    restarts = args.max_restarts or 0
    shared = os.environ.get(distributed.SHARED_STORE_ENV)
    if restarts and shared is None:  # else a restarted group finds the last one's addresses (minitrain.engine.distributed)
        os.environ[distributed.SHARED_STORE_ENV] = "1"
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc_per_node={args.nproc}",
                                          f"--max-restarts={restarts}", "-m", "minitrain", *rest]))
    except SignalException as exc:
        print(f"minitrain: stopped by {exc.sigval.name}; {_nproc_resume_hint(args, planned)}", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the launcher gives up only once every restart is spent
        rank, failure = exc.get_first_failure()
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        spent = f" and {restarts} restart{'s' if restarts != 1 else ''} happened (--max-restarts {restarts})"
        raise RunFailed(f"rank {rank} of {args.nproc} failed ({how}; its output is above){spent if restarts else ''}; "
                        f"{_nproc_resume_hint(args, planned, last=True)}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if restarts and shared is None:
            os.environ.pop(distributed.SHARED_STORE_ENV, None)
    return 0


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` less each of ``options`` (``--opt V`` or ``--opt=V``) and its value."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in options)):
            rest.append(arg)
    return rest


def _nproc_resume_hint(args: argparse.Namespace, planned, last: bool = False) -> str:
    from minitrain.engine import checkpointing

    folders = checkpointing.checkpoint_dirs(planned.run_dir, [p for _, p in planned.plugins])
    found = checkpointing.newest(folders)
    if found is None:
        return "no checkpoint was written (the run has --no-plugin checkpoint, or stopped before its first save)"
    step = found[1]["header"]["global_step"]
    where = f"the last checkpoint is {found[0]} (step {step})" if last else f"the newest checkpoint is of step {step}"
    return f"{where}; resume with: {shlex.join(_resume_command(args, planned.run_dir))}"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from minitrain.engine.registry import (
        discover, hook_order, make_plugin_manager, parse_plugin_spec, register_plugin, resolve, role_of,
    )

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
    rows = [{
        "name": info.name, "version": info.version, "distribution": info.distribution,
        "enabled_by_default": info.enabled_by_default, "hooks": implemented_hooks(info.target),
        "role": role_of(info.target) if info.error is None else None,
        "options": _options(info.config_model), "error": info.error,
    } for info in available.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["options"] = {key: "(required)" if option["required"] else json.dumps(option["default"])
                          for key, option in row["options"].items()}
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
    return {name: {"default": None if field.is_required() else to_jsonable_python(field.get_default(call_default_factory=True)),
                   "required": field.is_required(), "description": field.description}
            for name, field in model.model_fields.items()}


def _cmd_events(args: argparse.Namespace) -> int:
    from minitrain.engine.events import EVENT_TYPES
    from minitrain.engine.registry import discover

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


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minitrain.commands.replay import replay

    replay(args.run_dir, ["viz"])
    print(f"wrote {Path(args.run_dir) / 'report.html'}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from minitrain.commands.replay import replay

    count = replay(args.run_dir, args.plugins)
    print(f"replayed {count} events through {', '.join(args.plugins)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from minitrain.commands.export import export

    print(f"wrote {export(args.source, args.fmt, args.out, args.recipe, args.tta, args.ema)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from minitrain.commands.predict import predict

    results = predict(args.model, args.images, args.top_k, args.resize)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"minitrain: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"]))
    return BAD_INPUT if any("error" in result for result in results) else 0
