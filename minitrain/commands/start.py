"""Starting a run: a :class:`RunRequest` (recipe, config, plugins, run directory, resume) checked
and turned into a run directory and a Trainer ready to fit (:func:`prepare`).

A run directory belongs to one run. A fresh run refuses a directory that already holds files
(``--resume auto`` continues the run there, ``--move-aside`` moves it to ``DIR.aside-TIME/``
first). A resumed run starts from the config its checkpoint recorded, and ``--set`` may change
only the fields that can change mid-run (:attr:`minitrain.RecipeConfig.changeable_on_resume`):
each change is applied, announced in ``FitStart`` and kept in ``run.json``'s ``history``; any
other is refused, naming each field. Everything is checked before the first file is written, so a
start that fails leaves no run directory behind and no file of an earlier run changed.

When torchrun restarts a failed group (``--max-restarts``), each worker runs the same command
line again; such a start is a *restart* (:func:`minitrain.engine.distributed.restart_count`) and goes
on as ``--resume auto`` would, from the newest checkpoint of its run directory, which it then
shares with the attempts before it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from minitrain.engine import __version__, checkpointing, distributed
from minitrain.engine.device import resolve_device, seed_everything
from minitrain.engine.errors import MinitrainError, RunComplete
from minitrain.engine.files import read_json, writable_problem, write_atomic
from minitrain.engine.lock import LOCK_FILE, RunDirLock
from minitrain.engine.registry import (
    PluginRequest,
    make_plugin_manager,
    parse_plugin_spec,
    recorded_options,
    register_plugin,
    resolve,
    resolve_resumed,
)
from minitrain.engine.state import Limits, Steps
from minitrain.engine.trainer import Trainer
from minitrain.kit import finetune
from minitrain.kit.recipe import Components, RecipeConfig, load_recipe, make_config, read_config_file
from minitrain.records.losses import loss_reduction

RUN_FILES = ("config.json", "run.json")


@dataclass
class RunRequest:
    """A run as the command line asks for it (``minitrain run``'s options), before any check."""

    recipe: str | Path
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE
    plugins: list[str] = field(default_factory=list)  # --plugin NAME[:OPTIONS]
    disabled: list[str] = field(default_factory=list)  # --no-plugin NAME
    run_dir: str | Path | None = None
    resume: str | Path | None = None  # a checkpoint file, or "auto"
    init_from: str | Path | None = None
    init_skip_mismatched: bool = False
    move_aside: bool = False
    config_file: str | Path | None = None  # --config FILE.toml


@dataclass
class Plan:
    """A run as asked for, checked, before anything is built or written."""

    recipe_path: Path
    recipe: ModuleType
    config: RecipeConfig
    plugins: list[tuple[str, Any]]
    run_dir: Path
    device: torch.device
    resumed: tuple[Path, dict[str, Any]] | None = None  # the checkpoint a resume starts from
    changes: dict[str, list[Any]] = field(default_factory=dict)  # field -> [checkpoint's value, new value]
    plugin_changes: dict[str, list[Any]] = field(default_factory=dict)  # plugin -> [options before, after]
    move_aside: bool = False
    restart: int = 0  # which restart of torchrun's worker group this start is (0: the first start)
    again: bool = False  # the run in run_dir ended before its first checkpoint: it starts again from step 0


def plan(request: RunRequest) -> Plan:
    """Everything about a run that can be checked without building it: recipe, config, plugins and
    their options, the run directory and the checkpoint a resume starts from. Writes nothing.
    ``minitrain run --nproc`` calls it before it starts torchrun; under torchrun every rank calls
    it, and rank 0's view of the run directory is the one all of them act on.

    A resume goes on with the config and the plugins its run recorded (:func:`_continue`). With
    ``--resume auto`` an absent or empty run directory starts a new run, and one holding a run
    with no checkpoint starts that run again from step 0 where the run was writing checkpoints
    (its first start ended before its first save), and is refused otherwise. On a restart by
    torchrun the run goes on from the newest checkpoint in ``run_dir`` (``resume`` becomes
    ``"auto"``; a checkpoint ``resume`` named is the fallback while the run directory has none).
    Raises :class:`RunComplete` when the run to resume has nothing left to train."""
    resume, run_dir, move_aside, overrides = request.resume, request.run_dir, request.move_aside, request.overrides
    if resume is not None:
        checkpointing.check_resume(resume, run_dir)  # before the recipe spends time loading
        if move_aside:
            raise MinitrainError("--move-aside starts a run afresh; it does not go with --resume")
    init_from = request.init_from
    if init_from is not None and not Path(init_from).is_file():
        raise MinitrainError(
            f"--init-from: checkpoint not found: {init_from}"
            + (" (a directory; give its checkpoint file)" if Path(init_from).is_dir() else "")
        )
    recipe_path = Path(request.recipe)
    recipe = load_recipe(recipe_path)
    from_file = read_config_file(request.config_file) if request.config_file is not None else {}
    config = make_config(recipe, overrides, file=from_file, file_name=str(request.config_file))
    requests: list[PluginRequest | object] = [
        parse_plugin_spec(p) if isinstance(p, str) else p for p in getattr(recipe, "PLUGINS", [])
    ]
    requests += [parse_plugin_spec(p) for p in request.plugins]
    disabled = set(request.disabled)

    distributed.check_restartable()
    if run_dir is None and distributed.max_restarts():
        raise MinitrainError(
            "torchrun --max-restarts: give --run-dir, so that a restarted group finds the run's checkpoints there"
        )
    device = distributed.init(resolve_device(config.device))
    restart = max(distributed.gather(distributed.restart_count()))  # each node's agent counts its own
    if run_dir is None:  # a new name; rank 0's, even if the ranks' clocks differ
        run_dir = distributed.from_main(str(new_run_dir(recipe_path)) if distributed.is_main() else None)
    run_dir = Path(run_dir)
    seen = distributed.from_main(_look(run_dir) if distributed.is_main() else None)
    if restart:  # the same command again, in the same directory: never moved aside again
        move_aside = False
        if seen["record"] is not None:
            resume = resume or "auto"
    if str(resume) == "auto" and not seen["record"] and not seen["entries"]:
        if distributed.is_main():
            warnings.warn(f"--resume auto: {run_dir} holds no run yet; starting a new one there", stacklevel=2)
        resume = None
    problem = distributed.from_main(
        run_dir_problem(run_dir, resume is None and not restart, move_aside) if distributed.is_main() else None
    )
    if problem:
        raise MinitrainError(problem)
    planned = Plan(recipe_path, recipe, config, [], run_dir, device, move_aside=move_aside, restart=restart)
    if resume is None:
        planned.plugins = resolve(requests, disabled)
        return planned
    _continue(planned, resume, seen, overrides, from_file, requests, disabled)
    return planned


def _look(run_dir: Path) -> dict[str, Any]:
    """What rank 0 finds in ``run_dir``: its entries (None: no such directory; the lock file and
    a ``config.json`` without its ``run.json``, left by a start killed between the two, are not
    a run's), the run's record (``run.json``, None without one) and its config."""
    if not run_dir.is_dir():
        return {"entries": None, "record": None, "config": {}}
    entries = _entries(run_dir)
    record = read_json(run_dir / "run.json") if "run.json" in entries else None
    return {"entries": entries, "record": record, "config": read_json(run_dir / "config.json")}


def _entries(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds of a run: not its lock file, nor a ``config.json`` without its
    ``run.json`` (a start killed between writing the two trained nothing)."""
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    return [] if entries == ["config.json"] else entries


def _continue(
    planned: Plan,
    resume: str | Path,
    seen: dict[str, Any],
    overrides: list[str],
    from_file: dict[str, Any],
    requests: list[PluginRequest | object],
    disabled: set[str],
) -> None:
    """Go on with the run in ``planned.run_dir`` (or the one a ``--resume PATH`` checkpoint
    belongs to): its plugins, its config with the ``--set`` changes it allows, and the checkpoint
    to start from."""
    run_dir, record = planned.run_dir, seen["record"]
    found = None if str(resume) == "auto" else checkpointing.find(resume, [])
    if record is not None and (found is None or planned.restart):
        recorded = record.get("plugins")
    else:
        if found is None:  # no run here, yet files: checkpoints copied in, perhaps
            requested = [plugin for _, plugin in resolve(requests, disabled)]
            found = checkpointing.find("auto", checkpointing.checkpoint_dirs(run_dir, requested))
            if found is None:
                shown = ", ".join(seen["entries"][:4]) + (", ..." if len(seen["entries"]) > 4 else "")
                raise MinitrainError(
                    f"--resume auto: {run_dir} holds files that are not a minitrain run ({shown}), "
                    "and no checkpoint; give the directory of a run, or another --run-dir to start "
                    "a new run"
                )
        recorded = found[1]["header"].get("plugins")
    if recorded is None:  # a run from before minitrain recorded its plugins
        planned.plugins = resolve(requests, disabled)
    else:
        planned.plugins, planned.plugin_changes = resolve_resumed(recorded, requests, disabled)
    folders = checkpointing.checkpoint_dirs(run_dir, [p for _, p in planned.plugins])
    if record is not None and (str(resume) == "auto" or (planned.restart and _has_checkpoints(folders))):
        found = checkpointing.find("auto", folders)
    if found is None:
        _start_again(planned, seen, folders, overrides, from_file)
        return
    planned.resumed = found
    path, checkpoint = found
    saved = checkpoint["header"].get("config")
    if not saved:  # written before checkpoints carried their config
        warnings.warn(f"--resume: {path} does not record its run's config; using the recipe's with --set", stacklevel=3)
    else:
        _configure(planned, saved, overrides, from_file, f"--resume {path}")
    head, config = checkpoint["header"], planned.config
    where = str(run_dir) if str(resume) == "auto" else str(path)
    sized = _schedule_steps(checkpoint) is not None  # its schedule ends here: a larger size is refused
    if head["epoch"] >= config.epochs:
        more = new_run_hint(path) if sized else "raise epochs to train more (--set epochs=N)"
        raise RunComplete(f"run already complete: {head['epoch']} of {config.epochs} epochs ({where}); {more}")
    if config.max_steps is not None and head["global_step"] >= config.max_steps:
        more = new_run_hint(path) if sized else "raise max_steps to train more (--set max_steps=N)"
        raise RunComplete(f"run already complete: max_steps={config.max_steps} reached ({where}); {more}")


SCHEDULE_SIZING = ("epochs", "max_steps", "limit_train_batches")
"""The config fields that decide a run's :class:`~minitrain.engine.state.Steps`, and with them
the size of a schedule from ``make_scheduler``."""


def new_run_hint(checkpoint: str | Path) -> str:
    """How to train on after a run whose schedule has ended: a new run, from its weights."""
    return (
        "its learning-rate schedule has ended; to train on, start a new run from its weights: "
        f"--init-from {checkpoint} --run-dir NEW_DIR"
    )


def _schedule_steps(checkpoint: dict[str, Any]) -> dict[str, int] | None:
    """The Steps a checkpoint's schedule was sized for, if the trainer sized it (``make_scheduler``)."""
    state = checkpoint.get("trainer")
    return state.get("schedule_steps") if isinstance(state, dict) else None


def _check_schedule(planned: Plan, trainer: Trainer) -> None:
    """Before a resume restores the trainer: refuse a ``--set`` that would re-size a schedule from
    ``make_scheduler`` mid-run (``epochs=12`` after 8). Re-sized, its lr would jump at the resume
    point; held at its last value, it would train at the end of a decay, often zero."""
    changed, (path, checkpoint) = _sizing_changes(planned), planned.resumed or (None, {})
    saved = _schedule_steps(checkpoint)
    if changed and saved is not None and trainer.schedule_steps is not None:
        old, new = Steps(**saved), trainer.schedule_steps
        if old != new:
            why = (
                f"the learning-rate schedule was sized for {old.total} optimizer steps and would be re-sized to "
                f"{new.total} mid-run, so the lr would jump here"
            )
            raise MinitrainError(_refusal(path, changed, why))


def _check_built_schedule(planned: Plan, trainer: Trainer) -> None:
    """Once a resume has restored the trainer: the same for a schedule that ``build`` sized itself
    from the config. A ``LambdaLR`` (the usual warm-up and decay) is asked for the lr at the resume
    step, which the checkpoint recorded; other schedulers restore their size from the checkpoint."""
    changed, scheduler = _sizing_changes(planned), trainer.scheduler
    if not changed or trainer.schedule_steps is not None or not isinstance(scheduler, LambdaLR):
        return
    try:
        now = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    except Exception:  # the recipe's function, at a step it was not written for: no verdict
        return
    was = scheduler.get_last_lr()
    if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(now, was)):
        why = (
            f"the learning-rate schedule that build() made depends on {'it' if len(changed) == 1 else 'them'}: "
            f"the lr would jump from {was[0]:.4g} to {now[0]:.4g} here"
        )
        raise MinitrainError(_refusal(planned.resumed[0] if planned.resumed else None, changed, why))


def _sizing_changes(planned: Plan) -> dict[str, list[Any]]:
    return {key: planned.changes[key] for key in SCHEDULE_SIZING if key in planned.changes}


def _refusal(path: Path | None, changed: dict[str, list[Any]], why: str) -> str:
    listed = ", ".join(f"{key} ({old!r} in the checkpoint, {new!r} now)" for key, (old, new) in changed.items())
    return (
        f"--resume {path}: cannot change {listed}: {why}. Resume without changing "
        f"{'it' if len(changed) == 1 else 'them'}, or train on in a new run from its weights: --init-from {path} "
        "--run-dir NEW_DIR"
    )


def _start_again(
    planned: Plan, seen: dict[str, Any], folders: list[Path], overrides: list[str], from_file: dict[str, Any]
) -> None:
    """The run has no checkpoint to resume from. A run that was writing checkpoints, and whose
    first start ended before its first save, starts again from step 0 with its own config and
    plugins (so that one command serves a first launch and every requeue); so does any run
    torchrun restarts. Any other is refused, and nothing in its directory changes."""
    run_dir = planned.run_dir
    if checkpointing.any_files(folders) and not planned.restart:
        raise MinitrainError(
            f"--resume auto: no checkpoint in {', '.join(map(str, folders))} can be read (each is "
            "cut short or corrupt; see the warnings above); resume from a readable copy with --resume "
            f"PATH, or start afresh with --move-aside, which moves {run_dir} aside"
        )
    saves = any(callable(getattr(plugin, "checkpoint_dir", None)) for _, plugin in planned.plugins)
    if not saves and not planned.restart:
        raise MinitrainError(
            f"--resume auto: {run_dir} holds a run with no checkpoint to resume from (it ran with "
            "--no-plugin checkpoint): nothing in it was changed. Start a new run with another "
            f"--run-dir, or --move-aside to move {run_dir} aside and start afresh there"
        )
    if distributed.is_main():
        warnings.warn(
            f"--resume auto: no checkpoint in {', '.join(map(str, folders))} (the run ended before its "
            "first save); starting it again from step 0 with its config and plugins",
            stacklevel=3,
        )
    planned.again = True
    if seen["config"]:
        _configure(planned, seen["config"], overrides, from_file, f"--resume auto ({run_dir}/config.json)")


def _has_checkpoints(folders: list[Path]) -> bool:
    """Whether rank 0 sees a checkpoint file in ``folders`` (on every rank: a collective)."""
    return distributed.from_main(checkpointing.any_files(folders) if distributed.is_main() else None)


def _configure(
    planned: Plan, saved: dict[str, Any], overrides: list[str], from_file: dict[str, Any], source: str
) -> None:
    """Take a continued run's ``saved`` config, with the changes ``--config`` and ``--set`` make
    where it allows them."""
    asked = planned.config
    config = make_config(planned.recipe, overrides, base={**saved, "device": asked.device}, file=from_file)
    new = config.model_dump(mode="json")
    changes = {key: [saved.get(key), value] for key, value in new.items() if _differ(saved.get(key), value)}
    refused = {
        key: change
        for key, change in changes.items()  # a field new to the recipe: recorded, not refused
        if key in saved and key not in type(config).changeable_on_resume
    }
    if refused:
        listed = ", ".join(f"{key} ({old!r} in the checkpoint, {value!r} now)" for key, (old, value) in refused.items())
        raise MinitrainError(
            f"{source}: cannot change {listed}: what the checkpoint holds depends on "
            f"{'it' if len(refused) == 1 else 'them'}. Continue without changing "
            f"{'it' if len(refused) == 1 else 'them'}, or start a new run (another --run-dir; "
            "--init-from CHECKPOINT starts from its weights)"
        )
    planned.config, planned.changes = config, changes


def _differ(old: Any, new: Any) -> bool:
    """Whether a config value changed; ``1`` and ``1.0`` differ (one batch, or all of them)."""
    return old != new or type(old) is not type(new)


def new_run_dir(recipe_path: Path, root: Path = Path("runs")) -> Path:
    """``runs/<recipe>-<time>``, with ``-2``, ``-3``... if runs started in the same second."""
    base = root / f"{recipe_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_dir_problem(run_dir: Path, fresh: bool, move_aside: bool) -> str | None:
    """Why a run cannot use ``run_dir``, or None. A fresh run needs it absent or empty."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"--run-dir {run_dir} is a file, not a directory"
    if fresh and run_dir.is_dir() and (entries := _entries(run_dir)):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        if not move_aside:
            return (
                f"run directory {run_dir} is not empty ({shown}): a run directory holds one run. "
                f"--resume auto continues the run in it, another --run-dir starts a new one, and --move-aside "
                f"moves its contents to {run_dir}.aside-<time>/ and starts afresh"
            )
        if not any(name in entries for name in RUN_FILES):
            return (
                f"--move-aside: {run_dir} holds files that are not a minitrain run ({shown}); choose another --run-dir"
            )
    return writable_problem(run_dir, "--run-dir")


def prepare(request: RunRequest) -> Trainer:
    """Everything ``minitrain run`` does short of training: the run planned (:func:`plan`), its
    directory locked, the recipe built, a resume restored and the run's files written.

    ``resume`` (a checkpoint file, or ``"auto"`` for the newest in ``run_dir``) restores the
    trainer once recipe and plugins are in place. ``init_from`` starts the model from a
    checkpoint's weights (see :mod:`minitrain.kit.finetune`); a resume, applied after it, wins. Under
    torchrun every rank calls this; rank 0 alone creates the run directory and writes to it."""
    planned = plan(request)
    init_from, init_skip_mismatched = request.init_from, request.init_skip_mismatched
    lock = _lock(planned) if distributed.is_main() else None
    try:
        trainer, parts = build_trainer(planned, planned.run_dir, init_from, init_skip_mismatched)
        trainer.config_changes = planned.changes
        trainer.recorded_plugins = {name: recorded_options(plugin) for name, plugin in planned.plugins}
        trainer.restart = planned.restart
        if planned.resumed is not None:
            _check_schedule(planned, trainer)
            checkpointing.restore(trainer, *planned.resumed)
            _check_built_schedule(planned, trainer)
        trainer.check()
        if lock is not None:
            lock = _write_run_files(planned, parts, trainer, init_from, lock)
    except BaseException:
        if lock is not None:
            lock.release(remove_if_unused=True)
        raise
    trainer.run_lock = lock
    return trainer


def _lock(planned: Plan) -> RunDirLock:
    """Hold the run directory (rank 0), and check again, now that no other start can change it,
    that a new run finds it as empty as :func:`plan` did."""
    lock = RunDirLock(planned.run_dir)
    lock.acquire()
    fresh = planned.resumed is None and not planned.again and not planned.restart
    problem = run_dir_problem(planned.run_dir, fresh, planned.move_aside)
    if problem:
        lock.release(remove_if_unused=True)
        raise MinitrainError(problem)
    return lock


def build_trainer(
    planned: Plan, run_dir: Path | None, init_from: str | Path | None = None, init_skip_mismatched: bool = False
) -> tuple[Trainer, Components]:
    """The recipe built (seeded, its parts checked, ``--init-from`` and ``freeze`` applied) and a
    Trainer with the planned plugins; nothing written. ``run_dir=None``: a trainer that writes
    nowhere (``minitrain lr-find``)."""
    config, recipe_path = planned.config, planned.recipe_path
    seed_everything(config.seed)
    try:
        parts = planned.recipe.build(config, planned.device)
    except MinitrainError:
        raise
    except Exception as exc:
        raise MinitrainError(f"recipe {recipe_path}: build() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(parts, Components):
        raise MinitrainError(
            f"recipe {recipe_path}: build() must return minitrain.Components, not {type(parts).__name__}"
        )
    parts.check(recipe_path)
    if init_from is not None:
        skipped = finetune.init_from(parts.model, init_from, init_skip_mismatched, head=parts.head)
        if skipped and distributed.is_main():
            first = skipped[: finetune.SHOWN_MISFITS]
            shown = "; ".join(first) + ("; ..." if len(skipped) > len(first) else "")
            loaded = len(parts.model.state_dict()) - sum(not m.endswith("not in the model") for m in skipped)
            warnings.warn(
                f"--init-from: loaded {loaded} tensor(s); kept the recipe's initialisation "
                f"for {len(skipped)} tensor(s): {shown}",
                stacklevel=2,
            )
    finetune.freeze(parts.model, config.freeze)

    pm = make_plugin_manager()
    for name, plugin in planned.plugins:
        register_plugin(pm, plugin, name)
    trainer = Trainer(
        parts.model,
        parts.optimizer,
        parts.train_loader,
        parts.val_loader,
        epochs=config.epochs,
        loss_fn=parts.loss_fn,
        scheduler=parts.scheduler,
        make_scheduler=parts.make_scheduler,
        scheduler_interval=parts.scheduler_interval,
        device=planned.device,
        run_dir=None if run_dir is None else str(run_dir),
        config=config.model_dump(mode="json"),
        class_names=parts.class_names,
        plugin_manager=pm,
        nonfinite_loss=config.nonfinite_loss,
        metrics=parts.metrics,
        eval_loss_fn=parts.eval_loss_fn,
        limits=Limits(config.max_steps, config.max_time, config.limit_train_batches, config.limit_val_batches),
    )
    return trainer, parts


def _write_run_files(
    planned: Plan, parts: Components, trainer: Trainer, init_from: str | Path | None, lock: RunDirLock
) -> RunDirLock:
    """The run's ``config.json`` (what it uses now) and ``run.json`` (what it is, and the history
    of its starts), written now that every check has passed. ``--move-aside`` moves the earlier
    run out first, its lock file with it, and locks the new directory; returns the lock held."""
    run_dir = planned.run_dir
    if planned.move_aside and [p for p in run_dir.iterdir() if p.name != LOCK_FILE]:
        aside = run_dir.with_name(f"{run_dir.name}.aside-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(run_dir, aside)
        moved, lock = lock, RunDirLock(run_dir)
        lock.acquire()
        moved.release()
        warnings.warn(f"moved the earlier run in {run_dir} to {aside}", stacklevel=3)
    make_run_dir(run_dir)
    continued = planned.resumed or planned.restart or planned.again
    history = read_json(run_dir / "run.json").get("history", []) if continued else []
    start: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": trainer.resumed_from,
        "restart": planned.restart,
        "world_size": distributed.world_size(),
    }
    if planned.resumed or planned.again:
        start |= {"epoch": trainer.state.epoch, "global_step": trainer.state.global_step, "changed": planned.changes}
    if planned.plugin_changes:
        start["plugins_changed"] = planned.plugin_changes
    _write_json(run_dir / "config.json", trainer.config)
    for name, text in (parts.files or {}).items():
        _write_text(run_dir / name, text)
    _write_json(
        run_dir / "run.json",
        {
            "recipe": str(planned.recipe_path.resolve()),
            "plugins": trainer.recorded_plugins,
            "event_log": next((p.event_log for _, p in planned.plugins if getattr(p, "event_log", None)), None),
            "loss_reduction": loss_reduction(trainer.loss_fn),  # how readers show its training loss
            "checkpoints": [
                os.path.relpath(folder, run_dir)
                for folder in checkpointing.checkpoint_dirs(run_dir, [p for _, p in planned.plugins])
            ],
            "minitrain": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(planned.device),
            "world_size": distributed.world_size(),
            "class_names": parts.class_names,
            "inputs": parts.inputs or _inputs(parts.train_loader),
            "init_from": init_from and str(init_from),
            "test_time_augmentation": next(
                (p.test_time_augmentation for _, p in planned.plugins if getattr(p, "test_time_augmentation", None)),
                None,
            ),
            "history": [*history, start],
        },
    )
    return lock


def make_run_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MinitrainError(f"run directory {path} is not writable: {exc.strerror or exc}") from None
    return path


def _inputs(loader: Any) -> dict[str, Any] | None:
    """What a model trained here expects, for ``minitrain export``: image size and the mean and
    std the loader normalises with, where the loader says (as :class:`ImageLoader` does)."""
    if not all(hasattr(loader, key) for key in ("input_size", "mean", "std")):
        return None
    return {"size": list(loader.input_size), "mean": list(loader.mean), "std": list(loader.std)}


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    write_atomic(path, lambda file: file.write(data), what="run file")


NO_CHECKPOINT = "no checkpoint was written (the run has --no-plugin checkpoint, or stopped before its first save)"


def resume_command(args: argparse.Namespace, run_dir: str | Path | None) -> list[str]:
    """This command again, going on from the run's newest checkpoint."""
    return [
        "minitrain",
        "run",
        args.recipe,
        *(["--config", args.config_file] if args.config_file else []),
        *(f"--set={o}" for o in args.overrides),
        *(f"--plugin={p}" for p in args.plugins),
        *(f"--no-plugin={d}" for d in args.disabled),
        *([f"--nproc={args.nproc}"] if args.nproc else []),
        *([f"--max-restarts={args.max_restarts}"] if args.nproc and args.max_restarts else []),
        "--run-dir",
        os.fspath(run_dir or ""),
        "--resume",
        "auto",
    ]
