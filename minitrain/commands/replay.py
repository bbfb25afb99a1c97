"""Replay a finished run: feed its recorded ``events.jsonl`` to plugins, without training.

A plugin that only reads events (plots, TensorBoard, a remote logger) then produces after the
fact what it would have produced live (one that acts on training, such as ``checkpoint``, is
refused): ``minitrain replay RUN --plugin tensorboard`` writes
TensorBoard files for a run that had it off, and ``minitrain report RUN`` is a replay through
the ``viz`` plugin. Only notification hooks run; there is no model, so the pipeline hooks and
the core's default protocol are not registered.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import pluggy
import torch
from pydantic import ValidationError

from minitrain.engine import events as ev
from minitrain.engine import hookspecs
from minitrain.engine.errors import MinitrainError, describe_validation_error
from minitrain.engine.files import read_json
from minitrain.engine.registry import check_hooks, parse_plugin_spec, register_plugin
from minitrain.engine.state import RunState, StopKind
from minitrain.engine.surface import RunView, Shared


def add_parsers(command) -> None:
    """Register ``minitrain report`` and ``minitrain replay``."""
    report = command("report", help="redraw a run's plots and report.html from its event log")
    report.add_argument("run_dir", help="a run directory holding its event log (events.jsonl)")
    report.set_defaults(func=report_main)

    parser = command("replay", help="feed a run's recorded events to plugins, without training")
    parser.add_argument("run_dir", help="a run directory holding its event log (events.jsonl)")
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        required=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="plugin to replay the events through, with options; repeatable",
    )
    parser.set_defaults(func=replay_main)


def report_main(args: argparse.Namespace) -> int:
    replay(args.run_dir, ["viz"])
    print(f"wrote {Path(args.run_dir) / 'report.html'}")
    return 0


def replay_main(args: argparse.Namespace) -> int:
    count = replay(args.run_dir, args.plugins)
    print(f"replayed {count} events through {', '.join(args.plugins)}")
    return 0


class ReplayTrainer:
    """The trainer as a replay's plugins see it: a :class:`~minitrain.engine.surface.RunView`
    rebuilt from the events as they pass (the run directory being replayed, the CPU, class names,
    config, progress). ``request_stop`` and ``emit`` do nothing: the run is over, and what it
    emitted is in the log."""

    def __init__(self, run_dir: Path, pm: pluggy.PluginManager):
        self.run_dir: Path | None = run_dir
        self.device = torch.device("cpu")
        self.class_names: list[str] | None = None
        self.config: dict[str, Any] = {}
        self.epochs = 0
        self.state = RunState()
        self.shared = Shared()  # no per-step values: a live run's plugins published them
        self.replaying = True
        self.pm = pm

    def follow(self, event: ev.Event) -> ev.Event:
        """Move to where the live trainer was when it emitted ``event``; the event as the live
        plugins got it (a batch's loss a tensor, as ever)."""
        state = self.state
        if isinstance(event, ev.FitStart):
            self.epochs, self.config, self.class_names = event.epochs, event.config, event.class_names
            state.epoch = event.start_epoch - 1
            event = event.model_copy(update={"run_dir": str(self.run_dir)})  # it may have moved since
        elif isinstance(event, ev.BatchEnd):
            state.batch_idx = event.batch_idx + 1
            event = event.model_copy(update={"loss": torch.tensor(event.loss, dtype=torch.float64)})
        elif hasattr(event, "epoch"):  # the trainer counts epochs completed; events number them from 1
            state.epoch = event.epoch - (not isinstance(event, ev.EpochEnd))
        state.global_step = getattr(event, "global_step", state.global_step)
        if isinstance(event, (ev.EpochEnd, ev.FitEnd)):
            state.metrics = dict(event.metrics)
        return event

    def request_stop(self, reason: str, kind: StopKind = StopKind.REQUESTED) -> None:
        pass

    def emit(self, event: ev.Event) -> None:
        pass

    def plugin_options(self) -> dict[str, dict[str, Any]]:
        """The replayed run's plugins, as its ``run.json`` records them."""
        assert self.run_dir is not None  # a replay's run directory (None only on the RunView surface)
        return dict(read_json(self.run_dir / "run.json").get("plugins") or {})

    def remove_plugin(self, plugin: object) -> None:
        self.pm.unregister(plugin)


def event_log(run_dir: Path) -> Path:
    """The run's event log: the file its ``run.json`` names (the ``jsonl`` plugin's ``filename``),
    else ``events.jsonl``."""
    try:
        name = json.loads((run_dir / "run.json").read_text()).get("event_log")
    except (OSError, ValueError):
        name = None
    return run_dir / (name or "events.jsonl")


def read_events(path: Path) -> tuple[list[ev.Event], set[str]]:
    """The events of a log, and the names of event types it holds that nobody here declares. A
    last line cut short (the run was killed while writing it) is left out with a warning; any
    other line that is not an event is an error naming it."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines, cut = text.splitlines(), not text.endswith("\n")  # every complete line ends with a newline
    events, unknown = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(ev.Event.from_json(line))
        except ValueError as exc:
            if str(exc).startswith("unknown event"):  # declared by a recipe or plugin not loaded here
                unknown.add(str(exc).removeprefix("unknown event "))
            elif number == len(lines) and cut:
                warnings.warn(
                    f"{path}:{number}: the last line is cut short (the run was killed while writing "
                    "it); replaying the lines before it",
                    stacklevel=2,
                )
            else:
                reason = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
                raise MinitrainError(f"{path}:{number}: not a valid event: {reason}") from None
    return events, unknown


def replay(run_dir: str | Path, plugin_specs: list[str]) -> int:
    """Feed the run's event log to the plugins named by ``plugin_specs`` (``name[:k=v,...]``),
    and to them only. Returns the number of events replayed. A plugin that changes or saves
    training (role ``critical``: checkpoint, amp, ...) has nothing to act on and is refused."""
    from minitrain.engine import registry  # looked up at call time, like every discovery

    run_dir = Path(run_dir)
    path = event_log(run_dir)
    if not path.is_file():
        raise MinitrainError(f"{path} not found: nothing to replay (was the jsonl plugin on?)")
    available = registry.discover()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for info in available.values():  # custom hooks a replayed plugin may implement
        if getattr(info.target, "hookspecs", None) is not None:
            pm.add_hookspecs(info.target.hookspecs)
    for name, plugin in registry.resolve(
        [parse_plugin_spec(spec) for spec in plugin_specs],
        set(available) - {parse_plugin_spec(spec).name for spec in plugin_specs},
        available,
    ):
        if registry.role_of(plugin) == "critical":
            raise MinitrainError(
                f"replay: plugin {name!r} acts on training itself (it is critical), and a replay "
                "has no model or optimizer; replay feeds recorded events to plugins that watch"
            )
        if getattr(plugin, "event_log", None) and (run_dir / plugin.event_log).resolve() == path.resolve():
            raise MinitrainError(
                f"replay: plugin {name!r} would append to {path}, the log it replays; give it "
                f"another file ({name}:filename=copy.jsonl)"
            )
        register_plugin(pm, plugin, name)
    check_hooks(pm)

    events, unknown = read_events(path)  # all first: a replayed logger may append to the log
    trainer = ReplayTrainer(run_dir, pm)
    view: RunView = trainer  # what the plugins get: a whole RunView (mypy checks it)
    for recorded in events:
        event = trainer.follow(recorded)
        caller = getattr(pm.hook, event.hook, None)
        if caller is not None:
            caller(event=event, trainer=view)
        pm.hook.on_event(event=event, trainer=view)
    if unknown:
        warnings.warn(f"replay skipped events of unknown types: {', '.join(sorted(unknown))}", stacklevel=2)
    return len(events)
