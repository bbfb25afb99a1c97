"""``minitrain runs [DIR]``: the run directories under DIR, one line each (recipe, status, epochs,
the main metric's best and last values, wall time, and the settings that differ), or ``--json``.
Wall time is :func:`minitrain.records.rundir.wall_time`, as in ``compare`` and ``viz``'s report."""

from __future__ import annotations

import json
from pathlib import Path

from minitrain.records.formats import format_duration, format_value
from minitrain.records.rundir import QUIET, differing, find_runs, higher_is_better, main_metric, read_run


def add_parser(command) -> None:
    """Register ``minitrain runs`` (``command`` is the CLI's sub-parser factory)."""
    parser = command(
        "runs",
        help="list run directories: recipe, status, epochs, main metric, wall time, and the settings that differ",
    )
    parser.add_argument(
        "root", nargs="?", default="runs", metavar="DIR", help="where to look for run directories (default: runs/)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help="sort by the best value of this epoch metric, best first, and show it "
        "(default: by start time, showing val_acc, else val_loss, else train_loss)",
    )
    parser.set_defaults(func=_cmd_runs)


def _cmd_runs(args) -> int:
    paths = find_runs(args.root)
    runs = [read_run(path) for path in paths]
    metric = main_metric(runs, args.sort)
    if args.sort:
        better = higher_is_better(args.sort)
        runs.sort(
            key=lambda r: (r.best(args.sort) is None, -(r.best(args.sort) or 0) if better else (r.best(args.sort) or 0))
        )
    else:
        runs.sort(key=lambda r: (r.started or 0, r.last_write or 0, str(r.path)))  # (starts are to the second)
    root = Path(args.root)
    differ = differing(runs)
    if args.json:
        print(
            json.dumps(
                [
                    run.to_json(metric) | {"differs": {key: values[i] for key, values in differ.items()}}
                    for i, run in enumerate(runs)
                ],
                indent=2,
            )
        )
        return 0
    if not runs:
        print(f"no run directories under {root}")
        return 0
    header = ["run", "recipe", "status", "epochs", f"best {metric or '-'}", f"last {metric or '-'}", "wall time"]
    rows = []
    for i, run in enumerate(runs):
        status = run.status
        if run.quiet_for is not None and run.quiet_for > QUIET:
            status += f" (quiet {format_duration(run.quiet_for)})"
        name = str(run.path.relative_to(root)) if run.path != root and root in run.path.parents else str(run.path)
        epochs = f"{run.epochs_done}/{run.epochs}" if run.epochs else str(run.epochs_done)
        rows.append(
            [
                name,
                run.recipe or "-",
                status,
                epochs,
                format_value(run.best(metric) if metric else None),
                format_value(run.last(metric) if metric else None),
                format_duration(run.duration),
            ]
            + [" ".join(f"{key}={values[i]}" for key, values in differ.items())]
        )
    header.append("differs" if differ else "")
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
