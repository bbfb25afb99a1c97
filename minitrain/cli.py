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
import signal
import subprocess
import sys
import types
import typing
import warnings

from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from minitrain import __version__
from minitrain.errors import MinitrainError, TrainingInterrupted
from minitrain.files import one_line
from minitrain.plugins import DISABLE_AUTOLOAD_ENV

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
    except (MinitrainError, RunFailed) as exc:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line
        print(f"minitrain: error: {message}", file=sys.stderr)
        return FAILED if isinstance(exc, RunFailed) else BAD_INPUT
    except KeyboardInterrupt:
        print("minitrain: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
        if autoload is None:
            os.environ.pop(DISABLE_AUTOLOAD_ENV, None)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"minitrain: warning: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # accepted before or after the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(prog="minitrain", description="Plugin-based PyTorch training.")
    parser.add_argument("--version", action="version", version=f"minitrain {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--disable-plugin-autoload", action="store_true",
                        help=f"import no third-party plugin unless named with --plugin (as {DISABLE_AUTOLOAD_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

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
    run.add_argument("--trace-hooks", action="store_true", help="print every hook call (very verbose)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train with DDP on N processes of this machine (relaunches itself through torchrun)")
    run.add_argument("--init-from", metavar="CHECKPOINT",
                     help="start from this checkpoint's model weights (not its optimizer or progress): fine-tuning")
    run.add_argument("--init-skip-mismatched", action="store_true",
                     help="with --init-from: leave tensors whose name or shape differ (a new head) as the recipe "
                          "initialises them, instead of stopping with the list")
    run.set_defaults(func=_cmd_run)

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

    from minitrain import sweep
    sweep.add_parser(sub, command)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from minitrain import distributed
    from minitrain.run import plan, prepare

    if args.nproc is not None:
        return _launch(args, plan)
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
    distributed.leave()
    return 0


def _failure(trainer, exc: Exception) -> str:
    """One line for a run that failed while training: its own message for minitrain's errors
    (a non-finite loss), else where it happened and what was raised."""
    from minitrain.trainer import ERROR_LOG

    log = os.path.join(trainer.run_dir, ERROR_LOG) if trainer.run_dir else None
    where = f" (traceback in {log})" if log and os.path.exists(log) else ""
    if isinstance(exc, MinitrainError):
        return f"{exc}{where}"
    return (f"training failed in epoch {trainer.epoch_number}, step {trainer.global_step + trainer.in_step}: "
            f"{one_line(exc)}{where}; --debug shows the traceback")


def _resume_hint(args: argparse.Namespace, trainer) -> str:
    """The command that continues this run, if a checkpoint of it is on disk."""
    from minitrain import checkpointing

    folders = checkpointing.checkpoint_dirs(trainer.run_dir, [p for _, p in trainer.pm.list_name_plugin()])
    if not any(any(folder.glob("*.pt")) for folder in folders):
        return "no checkpoint was written (--plugin checkpoint makes a run resumable)"
    return f"resume with: {shlex.join(_resume_command(args, trainer.run_dir))}"


def _resume_command(args: argparse.Namespace, run_dir: str) -> list[str]:
    return ["minitrain", "run", args.recipe, *(f"--set={o}" for o in args.overrides),
            *(f"--plugin={p}" for p in args.plugins), *(f"--no-plugin={d}" for d in args.disabled),
            *([f"--nproc={args.nproc}"] if args.nproc else []), "--run-dir", str(run_dir), "--resume", "auto"]


def _launch(args: argparse.Namespace, plan) -> int:
    """Run ``torchrun --standalone --nproc_per_node=N -m minitrain ARGV`` (``--nproc`` removed),
    after checking here what can be checked (recipe, config, plugins, run directory, the checkpoint
    to resume), so that bad input is one line rather than one per process. PyTorch's launcher
    starts the processes and watches over them; on Ctrl-C it stops them, and this process says how
    to resume, as a single-process run does."""
    from minitrain import distributed

    if args.nproc < 1:
        raise MinitrainError(f"--nproc must be at least 1, not {args.nproc}")
    if distributed.launched():
        raise MinitrainError("--nproc: this process was already started by torchrun; drop --nproc")
    planned = plan(args.recipe, args.overrides, args.plugins, args.disabled, args.run_dir, args.resume,
                   args.init_from, args.move_aside)
    argv = args.argv
    at = next(i for i, arg in enumerate(argv) if arg.startswith("--nproc"))
    rest = argv[:at] + argv[at + (1 if "=" in argv[at] else 2):]
    if args.run_dir is None:  # the name chosen here, so that the resume hint can name it
        rest += ["--run-dir", str(planned.run_dir)]
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "minitrain", *rest]
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun and its workers too
        process.send_signal(signal.SIGINT)
        code = process.wait()
        hint = _nproc_resume_hint(args, planned)
        print(f"minitrain: interrupted; {hint}", file=sys.stderr)
        return 130
    if code:
        print(f"minitrain: error: the {args.nproc} processes failed (torchrun exit code {code}); see their "
              f"output above", file=sys.stderr)
        return FAILED
    return 0


def _nproc_resume_hint(args: argparse.Namespace, planned) -> str:
    from minitrain import checkpointing

    folders = checkpointing.checkpoint_dirs(planned.run_dir, [p for _, p in planned.plugins])
    found = checkpointing.newest(folders)
    if found is None:
        return "no checkpoint was written (--plugin checkpoint makes a run resumable)"
    step = found[1]["header"]["global_step"]
    return f"the newest checkpoint is of step {step}; resume with: {shlex.join(_resume_command(args, planned.run_dir))}"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from minitrain.plugins import (
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
    from minitrain.events import EVENT_TYPES
    from minitrain.plugins import discover

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

    from minitrain.replay import replay

    replay(args.run_dir, ["viz"])
    print(f"wrote {Path(args.run_dir) / 'report.html'}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from minitrain.replay import replay

    count = replay(args.run_dir, args.plugins)
    print(f"replayed {count} events through {', '.join(args.plugins)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from minitrain.export import export

    print(f"wrote {export(args.source, args.fmt, args.out, args.recipe, args.tta)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from minitrain.predict import predict

    results = predict(args.model, args.images, args.top_k, args.resize)
    if args.json:
        print(json.dumps(results, indent=2))
    for result in results:
        if "error" in result:
            print(f"minitrain: error: {result['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{result['image']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"]))
    return BAD_INPUT if any("error" in result for result in results) else 0
