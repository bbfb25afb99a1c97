"""``minitrain run RECIPE --smoke``: the run to make before a long one. One epoch of two training
and two validation batches, with every plugin the run would have, in a run directory that is
removed afterwards unless ``--run-dir`` names one; then a report of what was checked: the recipe
built, the steps trained and their losses, validation, which hooks of which plugin ran, the files
written and that every checkpoint loads back into the model.

A smoke test keeps nothing outside its run directory. A plugin that would write elsewhere (the
``mlflow`` plugin, to a tracking store) says how it keeps to the run directory instead, with a
method ``smoke_test(run_dir) -> str``, called before the run, whose line goes into the report;
such a plugin's ``wait()``, if it has one, is called after the run, before its files are read
and removed (work it does in the background, such as uploads, is then done).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from minitrain.commands.exits import RunFailed, failure
from minitrain.commands.start import RunRequest, prepare
from minitrain.engine import checkpointing
from minitrain.engine.errors import MinitrainError
from minitrain.engine.hookspecs import hookimpl
from minitrain.engine.registry import register_plugin
from minitrain.engine.trainer import Trainer
from minitrain.kit.summary import describe_model

OVERRIDES = ["epochs=1", "limit_train_batches=2", "limit_val_batches=2"]
"""Appended to the run's own ``--set``s, so they win."""


def run(request: RunRequest, args: argparse.Namespace) -> int:
    """The smoke test of ``request``: a fresh run in one process, in a scratch directory unless
    the request names one; its report on standard output."""
    if request.resume or args.nproc:
        raise MinitrainError("--smoke makes a fresh run in one process; it does not go with --resume or --nproc")
    started = time.perf_counter()
    kept = request.run_dir is not None
    trainer = prepare(
        dataclasses.replace(
            request, overrides=[*request.overrides, *OVERRIDES], run_dir=request.run_dir or scratch_dir()
        )
    )
    recorder = Smoke(trainer)
    assert trainer.run_dir is not None  # given just above
    contained = recorder.contain(trainer, Path(trainer.run_dir))
    register_plugin(trainer.pm, recorder)
    try:
        trainer.fit()
    except Exception as exc:
        if args.debug:
            raise
        raise RunFailed(failure(trainer, exc)) from exc
    finally:
        for plugin in contained:  # (a plugin the run disabled too: it may have work under way)
            wait = getattr(plugin, "wait", None)
            if callable(wait):
                wait()
    print(recorder.report(str(request.recipe), trainer, time.perf_counter() - started, keep=kept))
    return 0


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="minitrain-smoke-"))


class Smoke:
    """Records the losses and, through pluggy's call monitoring, which plugin's implementation of
    which hook ran (every call then goes through pluggy: slower, which two steps do not mind)."""

    name = "smoke"

    def __init__(self, trainer: Trainer):
        self.losses: list[float] = []
        self.ran: dict[str, set[str]] = {}
        self.notes: dict[str, str] = {}  # by plugin: how it keeps to the run directory
        self.stop_monitoring = trainer.pm.add_hookcall_monitoring(self._called, lambda *args: None)

    def _called(self, hook: str, implementations, kwargs) -> None:
        for impl in implementations:
            self.ran.setdefault(impl.plugin_name, set()).add(hook)

    def contain(self, trainer: Trainer, run_dir: Path) -> list[object]:
        """Ask each plugin with a ``smoke_test(run_dir)`` to keep what it writes in the run
        directory; those plugins."""
        contained = []
        for name, plugin in trainer.pm.list_name_plugin():
            smoke_test = getattr(plugin, "smoke_test", None)
            if callable(smoke_test):
                self.notes[name] = smoke_test(run_dir)
                contained.append(plugin)
        return contained

    @hookimpl
    def on_batch_end(self, event) -> None:
        self.losses.append(float(event.loss))

    def report(self, recipe: str, trainer: Trainer, seconds: float, keep: bool) -> str:
        """What the run checked, as lines; MinitrainError for a plugin that never ran."""
        self.stop_monitoring()
        assert trainer.run_dir is not None  # a smoke test runs in a directory (--run-dir or a scratch one)
        run_dir = Path(trainer.run_dir)
        validated = {k: v for k, v in trainer.state.metrics.items() if k.startswith("val_")}
        lines = [
            f"smoke test of {recipe} passed in {seconds:.1f}s:",
            f"  built the recipe: {describe_model(trainer.module)}",
            f"  trained {len(self.losses)} batches of the {_batches_in(trainer.train_loader) or '?'} an epoch has: "
            f"loss {', '.join(f'{v:.4g}' for v in self.losses)}",
            "  validated 2 batches: " + (", ".join(f"{k} {v:.4g}" for k, v in validated.items()) or "no val_loader"),
        ]
        plugins = [(name, plugin) for name, plugin in trainer.pm.list_name_plugin() if plugin is not self]
        idle = [name for name, _ in plugins if not self.ran.get(name)]
        lines += [
            f"  plugin {name}: {', '.join(sorted(self.ran.get(name, ()))) or 'no hook ran'}"
            + (f"; {self.notes[name]}" if name in self.notes else "")
            for name, _ in plugins
        ]
        for folder in checkpointing.checkpoint_dirs(run_dir, [plugin for _, plugin in plugins]):
            for path in sorted(folder.glob("*.pt")):
                checkpointing.restore(trainer, path, checkpointing.load(path))
                lines.append(f"  checkpoint {path.name}: loads and fits the model")
        files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
        lines.append(f"  wrote {len(files)} files: {', '.join(files[:12])}{', ...' if len(files) > 12 else ''}")
        if idle:
            raise MinitrainError(f"smoke test: plugin(s) {', '.join(idle)} ran no hook in a whole epoch")
        if keep:
            lines.append(f"  kept the run directory {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            lines.append(f"  removed its run directory {run_dir} (--run-dir keeps one)")
        return "\n".join(lines)


def _batches_in(loader) -> int | None:
    """Batches a whole epoch of ``loader`` has, where it says."""
    try:
        return len(loader)
    except TypeError:
        return None
