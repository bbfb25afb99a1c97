"""``minitrain sweep``: hyperparameter search on Optuna, each trial an ordinary run.

    minitrain sweep run RECIPE --space KEY=SPEC ... --trials N [--study NAME] [--storage URL]
                    [--workers K] [--monitor METRIC] [--direction max|min]
                    [--sampler tpe|random|grid] [--pruner median|hyperband|none]
                    [--set KEY=VALUE ...] [--plugin NAME[:OPTIONS] ...] [--no-plugin NAME ...]
    minitrain sweep show NAME|DIR [--json]
    minitrain sweep best NAME|DIR

Optuna samples (``--sampler``), prunes (``--pruner``) and keeps the study (``study.py``); each
trial is a ``minitrain run`` in its own directory (``runner.py``); ``show`` and ``best`` read the
study back (``show.py``). Nothing here imports Optuna until a sweep command runs, and
``import minitrain`` does not import this package at all.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from minitrain.commands import options
from minitrain.engine.errors import MinitrainError

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}


def add_parser(command) -> None:
    """Register ``minitrain sweep run|show|best`` (``command`` is the CLI's sub-parser factory)."""
    sweep = command(
        "sweep",
        help="search hyperparameters with Optuna; each trial is a minitrain run",
        description="Search hyperparameters with Optuna: `sweep run RECIPE --space KEY=SPEC --trials N` "
        "(or `sweep RECIPE ...`) runs trials, each an ordinary minitrain run in "
        "runs/sweeps/NAME/trial-NNNN/; `sweep show NAME` lists them best first and writes "
        "plots and sweep.html; `sweep best NAME` prints the command that reproduces the best "
        "trial.",
    )
    forms = sweep.add_subparsers(dest="form", required=True, metavar="{run,show,best}")

    def form(name: str, **kwargs) -> argparse.ArgumentParser:
        return forms.add_parser(name, parents=[command.common], allow_abbrev=False, **kwargs)

    run = form("run", help="run trials until the study has --trials of them")
    options.add_config(run)
    run.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a config field to search: float:LOW:HIGH[:log], int:LOW:HIGH[:log] or choice:A,B,...; "
        "replaces the recipe's SPACE entry for KEY; repeatable",
    )
    run.add_argument(
        "--trials", type=int, metavar="N", required=True, help="trials the study should have (all workers together)"
    )
    run.add_argument(
        "--study",
        metavar="NAME",
        help="the study's name (default: the recipe and a timestamp); "
        "running the command again with it continues the study",
    )
    run.add_argument("--workers", type=int, metavar="K", help="trials at once on this machine (default 1)")
    run.add_argument("--monitor", metavar="METRIC", help="the epoch metric to optimise (default val_acc)")
    run.add_argument(
        "--direction", choices=["max", "min"], help="maximise or minimise it (default: max for accuracies, else min)"
    )
    run.add_argument(
        "--sampler",
        metavar="tpe|random|grid[:OPTIONS]",
        help="Optuna's sampler (default tpe), with options for it, e.g. tpe:seed=0,n_startup_trials=4",
    )
    run.add_argument(
        "--pruner",
        metavar="median|hyperband|none[:OPTIONS]",
        help="Optuna's pruner (default median), with options, e.g. median:n_startup_trials=3",
    )
    options.add_plugins(run)
    run.set_defaults(func=run_main)

    show = form("show", help="a study's trials, best first; writes its plots and sweep.html")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    best = form("best", help="the command that reproduces the study's best trial")
    for parser in (run, show, best):
        parser.add_argument(
            "--storage",
            metavar="URL",
            help="Optuna storage: an RDB URL (postgresql+psycopg://..., mysql+pymysql://...) that "
            "several machines share, or a journal file path; default: "
            "runs/sweeps/NAME/study.journal",
        )
    for parser in (show, best):
        parser.add_argument("study", metavar="NAME|DIR", help="the study's name, or its folder")
    show.set_defaults(func=lambda args: _results().show(args.study, args.storage, args.json))
    best.set_defaults(func=lambda args: _results().best(args.study, args.storage))


def _results():
    from minitrain.commands.sweep import show

    return show


def run_main(args: argparse.Namespace) -> int:
    from minitrain.commands.sweep.runner import Sweep

    return Sweep(*prepare(args)).run()


def prepare(args: argparse.Namespace):
    """Check everything a sweep needs before any trial: recipe, space against its Config, --set,
    plugins, sampler, pruner and the study (whose settings a continued sweep must match); then
    open or create the study."""
    from minitrain.commands.start import RunRequest
    from minitrain.commands.start import plan as plan_run
    from minitrain.commands.sweep import space as spaces
    from minitrain.commands.sweep import study as studies
    from minitrain.commands.sweep.runner import SweepPlan
    from minitrain.kit.recipe import as_overrides, load_recipe, make_config, read_config_file
    from minitrain_plugins import prune

    studies.optuna()  # installed? (the one-line error says how, before any other work)
    recipe_path = args.recipe
    if args.trials < 1:
        raise MinitrainError(f"--trials must be at least 1, not {args.trials}")
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise MinitrainError(f"--workers must be at least 1, not {workers}")
    if prune.NAME in {spec.partition(":")[0].strip() for spec in args.plugins} | set(args.disabled):
        raise MinitrainError(
            "the sweep enables the prune plugin in every trial itself; leave it out of --plugin "
            "and --no-plugin (--pruner none turns pruning off)"
        )
    recipe = load_recipe(recipe_path)
    if args.config_file:  # the file's values are fixed values of every trial, as --set ones are
        args.overrides = [*as_overrides(read_config_file(args.config_file)), *args.overrides]
    config = make_config(recipe, args.overrides)
    fixed = {item.partition("=")[0].strip(): item.partition("=")[2] for item in args.overrides}
    space = spaces.build_space(recipe, args.space, fixed)
    spaces.check_space(space, recipe, args.overrides)
    from minitrain.commands.sweep.runner import warm_up

    warming = warm_up()  # the trials' process server imports torch meanwhile
    monitor = args.monitor or "val_acc"
    direction = args.direction or ("max" if "acc" in monitor.lower() else "min")

    sampler_name, sampler = make_sampler(args.sampler or "tpe", space)
    if sampler_name == "grid":
        points = 1
        for values in spaces.grid_space(space).values():
            points *= len(values)
        if args.trials > points:
            raise MinitrainError(
                f"--trials {args.trials} is more than the grid's {points} points; use --trials {points} or fewer"
            )
    pruner_name, pruner = make_pruner(args.pruner or "median")

    if args.study is not None:
        name = studies.check_name(args.study)
    else:
        name = _new_name(Path(recipe_path).stem)
    folder = studies.SWEEPS / name
    recorded = studies.read_sweep_file(folder)
    if folder.is_dir() and any(folder.iterdir()) and not recorded:
        raise MinitrainError(f"{folder} holds files that are not a sweep's; choose another --study")
    storage_url = args.storage
    if storage_url and "://" not in storage_url:  # a journal file: one path, wherever the command runs from
        storage_url = str(Path(storage_url).absolute())
    if recorded.get("storage") and storage_url and studies.masked(storage_url) != recorded["storage"]:
        raise MinitrainError(
            f"study {name} lives in {recorded['storage']}, not {studies.masked(storage_url)} "
            f"(its folder {folder} says so)"
        )
    storage_url = storage_url or recorded.get("storage")

    prune_spec = f"{prune.NAME}:study={name},trial=0,monitor={monitor},direction={direction}"
    plan_run(
        RunRequest(
            recipe_path,
            args.overrides,
            [*args.plugins, prune_spec],
            args.disabled,
            run_dir=folder / studies.trial_dir_name(0) / "check",
        )
    )  # plugins and options, as a trial checks them

    settings = studies.Settings(
        recipe=recipe_path,
        space={d.key: d.spec for d in space},
        fixed=list(args.overrides),
        plugins=list(args.plugins),
        disabled=list(args.disabled),
        monitor=monitor,
        direction=direction,
    )
    storage = studies.open_storage(storage_url, folder)
    study = studies.open_study(name, storage, settings, sampler, pruner)
    folder.mkdir(parents=True, exist_ok=True)
    studies.write_sweep_file(folder, name, storage_url, settings)

    threads = _threads(workers)
    gpus = _gpus(config.device)
    command = [
        "minitrain",
        "sweep",
        "run",
        recipe_path,
        *_flags("--space", args.space),
        "--trials",
        str(args.trials),
        "--study",
        name,
        *(["--storage", studies.masked(args.storage)] if args.storage else []),
        *(["--workers", str(workers)] if workers != 1 else []),
        *(["--monitor", args.monitor] if args.monitor else []),
        *(["--direction", args.direction] if args.direction else []),
        *(["--sampler", args.sampler] if args.sampler else []),
        *(["--pruner", args.pruner] if args.pruner else []),
        *_flags("--set", args.overrides),
        *_flags("--plugin", args.plugins),
        *_flags("--no-plugin", args.disabled),
    ]
    plan = SweepPlan(
        name=name,
        folder=folder,
        storage_url=storage_url,
        recipe_path=recipe_path,
        recipe=recipe,
        space=space,
        fixed=list(args.overrides),
        plugins=list(args.plugins),
        disabled=list(args.disabled),
        monitor=monitor,
        direction=direction,
        trials=args.trials,
        workers=min(workers, args.trials),
        sampler_name=sampler_name,
        pruner_name=pruner_name,
        study=study,
        command=command,
        gpus=gpus,
        threads=threads,
    )
    _announce(plan, args)
    return plan, warming


def _flags(flag: str, values: list[str]) -> list[str]:
    return [item for value in values for item in (flag, value)]


def _announce(plan, args: argparse.Namespace) -> None:
    from minitrain.commands.sweep import study as studies

    done = sum(1 for t in plan.study.get_trials(deepcopy=False) if studies.counts(t))
    where = studies.masked(plan.storage_url) if plan.storage_url else plan.folder / studies.JOURNAL
    devices = (f"GPU {', '.join(plan.gpus)} in turn" if plan.gpus else "CPU") + f", {plan.threads} thread(s) per trial"
    verb = "continuing" if done else "study"
    print(
        f"{verb} {plan.name}: {plan.trials} trials of {plan.recipe_path}"
        + (f", {done} done" if done else "")
        + f"; {plan.workers} worker(s) ({devices})"
    )
    print(
        f"  searching {', '.join(f'{d.key}={d.spec}' for d in plan.space)}; "
        f"{'maximising' if plan.direction == 'max' else 'minimising'} {plan.monitor}; "
        f"{plan.sampler_name} sampler, {plan.pruner_name} pruner"
    )
    print(f"  study in {where}; trials in {plan.folder}/")
    if args.study is None:
        print(f"  continue it (or join it from another machine) with: {shlex.join(plan.command)}")
    if done >= plan.trials:
        print(f"  the study already has {done} of {plan.trials} trials; raise --trials to run more")
    sys.stdout.flush()


def _new_name(stem: str) -> str:
    from minitrain.commands.sweep import study as studies

    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while (studies.SWEEPS / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _threads(workers: int) -> int:
    """CPU threads per trial: the cores this process may use, shared out among the workers
    (OMP_NUM_THREADS, when set, is the user's choice and wins)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _gpus(device: str) -> list[str]:
    """The GPUs the workers take in turn (worker i: GPU i mod count), or none on the CPU."""
    if device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


# --- samplers and pruners: Optuna's, chosen by name, with their own options -----------------------


def make_sampler(spec: str, space) -> tuple[str, Any]:
    from minitrain.commands.sweep.space import grid_space
    from minitrain.commands.sweep.study import optuna

    name, options = _named_options("--sampler", spec, SAMPLERS)
    cls = getattr(optuna().samplers, SAMPLERS[name])
    if name == "tpe":  # Optuna's advice for trials run in parallel; no effect on one worker alone
        options = {"constant_liar": True, **options}
    if name == "grid":
        options = {**options, "search_space": grid_space(space)}
    return name, _construct("--sampler", name, cls, options)


def make_pruner(spec: str) -> tuple[str, Any]:
    from minitrain.commands.sweep.study import optuna

    name, options = _named_options("--pruner", spec, PRUNERS)
    return name, _construct("--pruner", name, getattr(optuna().pruners, PRUNERS[name]), options)


def _named_options(flag: str, spec: str, known: dict[str, str]) -> tuple[str, dict[str, Any]]:
    from minitrain.commands.sweep.space import _scalar

    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in known:
        raise MinitrainError(f"{flag} {spec}: unknown {flag[2:]} {name!r} (choose {', '.join(known)})")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MinitrainError(f"{flag} {spec}: option {item!r} is not KEY=VALUE")
        options[key.strip()] = _scalar(value.strip())
    return name, options


def _construct(flag: str, name: str, cls: type, options: dict[str, Any]) -> Any:
    params = [p for p in inspect.signature(cls).parameters if p not in ("self", "search_space")]
    unknown = [key for key in options if key not in params and key != "search_space"]
    if unknown:
        raise MinitrainError(
            f"{flag} {name}: {cls.__name__} has no option {unknown[0]!r} (it takes {', '.join(params) or 'none'})"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise MinitrainError(f"{flag} {name}: {json.dumps(options)}: {exc}") from None
