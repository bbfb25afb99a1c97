"""``minitrain sweep show`` and ``minitrain sweep best``: a study read back from its storage.

``show`` lists the trials best first (number, state, values, metric, epochs run, time, run
directory), draws Optuna's matplotlib plots (optimisation history, learning curves, parameter
importances, slice) into the sweep's folder and writes ``sweep.html`` there, linking each trial's
``report.html`` (built from its event log, as ``minitrain report`` does, when it has none yet).
``best`` prints the ``minitrain run`` command that reproduces the best trial.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from minitrain.commands.sweep.study import (
    JOURNAL,
    SETTINGS_ATTR,
    SWEEP_FILE,
    masked,
    open_storage,
    optuna,
    read_sweep_file,
    sweep_dir,
)
from minitrain.engine.errors import MinitrainError, one_line
from minitrain.engine.files import write_atomic

ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
PLOTS = {  # file -> title
    "history.png": "Optimisation history",
    "intermediate.png": "Learning curves (the value reported after each epoch; pruned trials stop early)",
    "importances.png": "Parameter importances",
    "slice.png": "Slice: the metric against each parameter",
}


def load(name_or_dir: str, storage_url: str | None):
    """The sweep's folder, name, study and settings."""
    folder = sweep_dir(name_or_dir)
    recorded = read_sweep_file(folder)
    if not recorded and storage_url is None:
        raise MinitrainError(
            f"no sweep {name_or_dir!r}: {folder / SWEEP_FILE} not found (give a study's name, its "
            "folder, or for a study kept in a database --storage URL)"
        )
    name = recorded.get("study") or Path(name_or_dir).name
    url = storage_url or recorded.get("storage")
    if url is None and not (folder / JOURNAL).is_file():
        raise MinitrainError(f"sweep {name}: its study journal {folder / JOURNAL} is missing")
    storage = open_storage(url, folder)
    try:
        study = optuna().load_study(study_name=name, storage=storage)
    except KeyError:
        raise MinitrainError(f"study {name} is not in {masked(url) or folder / JOURNAL}") from None
    return folder, name, study, study.user_attrs.get(SETTINGS_ATTR) or recorded.get("settings") or {}


def rows(study, folder: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial that ran or may run (surplus trials, never started, are left out),
    best first: complete trials by their value, then pruned, running, waiting and failed ones."""
    now = time.time()
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if attrs.get("surplus"):
            continue
        state = t.state.name
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        elif t.datetime_start and state == "RUNNING":
            seconds = now - t.datetime_start.timestamp()
        else:
            seconds = None
        run_dir = attrs.get("run_dir")
        here = run_dir is not None and (folder / run_dir).is_dir()
        note = (
            attrs.get("error")
            or attrs.get("stop_reason")
            or (
                f"stopped by {attrs['interrupted']}; its values were queued again" if attrs.get("interrupted") else None
            )
        )
        if state == "FAIL" and note is None:
            note = "its sweep stopped while it ran; its values were queued again"
        if attrs.get("retry_of") is not None:
            note = f"retry of trial {attrs['retry_of']}" + (f"; {note}" if note else "")
        out.append(
            {
                "number": t.number,
                "state": state,
                "params": dict(t.params),
                "overrides": attrs.get("overrides", []),
                "value": t.value,
                "epochs": attrs.get("epochs", len(t.intermediate_values) or None),
                "seconds": seconds,
                "run_dir": str(folder / run_dir) if here else None,
                "host": attrs.get("host"),
                "log": str(folder / "logs" / f"{run_dir}.log") if here else None,
                "note": note,
            }
        )
    sign = -1 if settings.get("direction", "max") == "max" else 1

    def key(row):
        value = row["value"]
        ranked = value is not None and math.isfinite(value) and row["state"] in ("COMPLETE", "PRUNED")
        return ORDER.get(row["state"], 5), sign * value if ranked else 0.0, row["number"]

    return sorted(out, key=key)


def show(name_or_dir: str, storage_url: str | None, as_json: bool) -> int:
    folder, name, study, settings = load(name_or_dir, storage_url)
    table = rows(study, folder, settings)
    monitor = settings.get("monitor", "value")
    best = next((r for r in table if r["state"] == "COMPLETE"), None)
    reports = _trial_reports(table)
    plots = _plots(study, folder, monitor)
    page = _write_html(folder, name, study, settings, table, reports, plots, best)
    if as_json:
        print(
            json.dumps(
                {
                    "study": name,
                    "folder": str(folder),
                    "settings": settings,
                    "best": best and best["number"],
                    "command": best and reproduce(settings, best),
                    "trials": table,
                    "html": str(page),
                },
                indent=2,
            )
        )
        return 0
    print(
        f"study {name}: {len(table)} trials of {settings.get('recipe', '?')}, "
        f"{'maximising' if settings.get('direction') == 'max' else 'minimising'} {monitor}"
    )
    keys = list(settings.get("space", {})) or sorted({k for r in table for k in r["params"]})
    header = ["trial", "state", monitor, "epochs", "time", *keys, "run dir"]
    lines = [
        [
            str(r["number"]),
            r["state"].lower(),
            _fmt(r["value"]),
            _fmt(r["epochs"]),
            _time(r["seconds"]),
            *(_fmt(r["params"].get(k)) for k in keys),
            r["run_dir"] or _elsewhere(r),
        ]
        for r in table
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    for row, r in zip([header, *lines], [None, *table]):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if r is not None and r["note"]:
            print(f"{'':{widths[0]}}  - {r['note']}")
    drawn = [f for f, problem in plots.items() if problem is None]
    print(f"wrote {page}" + (f" and {', '.join(drawn)}" if drawn else ""))
    if best:
        print(f"best: trial {best['number']}; reproduce it with: {shlex.join(reproduce(settings, best))}")
    return 0


def best(name_or_dir: str, storage_url: str | None) -> int:
    folder, name, study, settings = load(name_or_dir, storage_url)
    table = rows(study, folder, settings)
    top = next((r for r in table if r["state"] == "COMPLETE"), None)
    if top is None:
        raise MinitrainError(f"study {name} has no complete trial yet")
    epochs = top["epochs"]
    print(
        f"# trial {top['number']}: {settings.get('monitor')} {_fmt(top['value'])} after {_fmt(epochs)} "
        f"epoch{'' if epochs == 1 else 's'}; its run: {top['run_dir'] or _elsewhere(top)}",
        file=sys.stderr,
    )
    print(shlex.join(reproduce(settings, top)))
    return 0


def reproduce(settings: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The ``minitrain run`` command of a trial, without the sweep's prune plugin."""
    flags = [("--set", o) for o in [*settings.get("fixed", []), *row["overrides"]]]
    flags += [("--plugin", p) for p in settings.get("plugins", [])]
    flags += [("--no-plugin", d) for d in settings.get("disabled", [])]
    return ["minitrain", "run", settings.get("recipe", "RECIPE"), *(item for pair in flags for item in pair)]


def _elsewhere(row: dict[str, Any]) -> str:
    """Where a trial ran when its directory is not on this machine."""
    return f"(on {row['host']})" if row.get("host") and row["state"] != "WAITING" else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def _trial_reports(table: list[dict[str, Any]]) -> dict[int, str]:
    """Each trial's ``report.html``, drawn from its event log if it has none yet (a trial that
    ran with the ``viz`` plugin has its own)."""
    from minitrain.commands.replay import event_log, replay

    found = {}
    for row in table:
        if not row["run_dir"] or row["state"] in ("RUNNING", "WAITING"):
            continue
        run_dir = Path(row["run_dir"])
        report = run_dir / "report.html"
        if not report.is_file() and event_log(run_dir).is_file():
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    replay(run_dir, ["viz"])
                except Exception:  # no viz plugin, an unreadable log: the row links the run directory instead
                    pass
        if report.is_file():
            found[row["number"]] = str(report)
    return found


def _plots(study, folder: Path, monitor: str) -> dict[str, str | None]:
    """Optuna's matplotlib plots of the study, in the sweep's folder: file -> None when drawn, or
    why not. A plot that cannot be drawn now leaves no older image of it behind."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plot

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    curves = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]

    def importances():
        if len(complete) < 2:
            raise ValueError("needs two complete trials")
        from optuna.importance import PedAnovaImportanceEvaluator  # no scikit-learn needed

        return plot.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name=monitor)

    draw = {
        "history.png": lambda: (
            plot.plot_optimization_history(study, target_name=monitor) if complete else _raise("no complete trial")
        ),
        "intermediate.png": lambda: plot.plot_intermediate_values(study) if curves else _raise("no trial reported yet"),
        "importances.png": importances,
        "slice.png": lambda: plot.plot_slice(study, target_name=monitor) if complete else _raise("no complete trial"),
    }
    problems: dict[str, str | None] = {}
    for file, make in draw.items():
        path = folder / file
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
            every = list(axes.flat) if hasattr(axes, "flat") else [axes]
            for ax in every:
                _tidy(ax, file, monitor)
            figure = every[0].figure
            figure.set_size_inches(
                max(figure.get_size_inches()[0], 6.4, 3.6 * len(every)), max(figure.get_size_inches()[1], 4.0)
            )
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            write_atomic(path, lambda f: f.write(buffer.getvalue()), what="plot")  # noqa: B023 (called at once)
            problems[file] = None
        except Exception as exc:
            plt.close("all")
            path.unlink(missing_ok=True)
            problems[file] = one_line(exc)
    return problems


def _tidy(ax, file: str, monitor: str) -> None:
    """Axes a reader takes in at a glance: epochs and trial numbers as whole numbers, and a log
    axis labelled at 1, 2 and 5 of each decade in plain numbers (Optuna's labels every minor tick
    in powers of ten, and they run into each other)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if file == "intermediate.png":
        ax.set_xlabel("epoch")
        ax.set_ylabel(monitor)
    if file in ("history.png", "intermediate.png"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if ax.get_xscale() == "log":
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=30)


def _raise(reason: str):
    raise ValueError(reason)


def _write_html(
    folder: Path,
    name: str,
    study,
    settings: dict[str, Any],
    table: list[dict[str, Any]],
    reports: dict[int, str],
    plots: dict[str, str | None],
    best: dict[str, Any] | None,
) -> Path:
    esc = html.escape
    monitor = settings.get("monitor", "value")
    keys = list(settings.get("space", {})) or sorted({k for r in table for k in r["params"]})

    def link(path: str | None, text: str) -> str:
        if not path or not Path(path).exists():
            return ""
        href = Path(path).relative_to(folder).as_posix() if _inside(path, folder) else Path(path).absolute().as_uri()
        return f'<a href="{esc(href)}">{esc(text)}</a>'

    notes = any(r["note"] for r in table)
    trs = []
    for r in table:
        links = " ".join(
            filter(
                None, [link(reports.get(r["number"]), "report"), link(r["run_dir"], "run dir"), link(r["log"], "log")]
            )
        ) or esc(_elsewhere(r))
        cls = r["state"].lower() + (" best" if best and r["number"] == best["number"] else "")
        trs.append(
            f'<tr class="{cls}"><td>{r["number"]}</td><td>{esc(r["state"].lower())}</td>'
            f'<td class="num">{esc(_fmt(r["value"]))}</td><td class="num">{esc(_fmt(r["epochs"]))}</td>'
            f'<td class="num">{esc(_time(r["seconds"]))}</td>'
            + "".join(f'<td class="num">{esc(_fmt(r["params"].get(k)))}</td>' for k in keys)
            + f"<td>{links}</td>"
            + (f'<td class="note">{esc(r["note"] or "")}</td>' if notes else "")
            + "</tr>"
        )
    figures = [
        f'<figure><img src="{file}" alt="{esc(title)}"><figcaption>{esc(title)}</figcaption></figure>'
        for file, title in PLOTS.items()
        if plots.get(file) is None and (folder / file).is_file()
    ]
    missing = [f"{esc(PLOTS[file].split(' (')[0])}: {esc(problem)}" for file, problem in plots.items() if problem]
    counts: dict[str, int] = {}
    for r in table:
        counts[r["state"].lower()] = counts.get(r["state"].lower(), 0) + 1
    described = {
        "recipe": settings.get("recipe"),
        "searched": ", ".join(f"{k}={v}" for k, v in settings.get("space", {}).items()),
        "objective": f"{'maximise' if settings.get('direction') == 'max' else 'minimise'} {monitor}",
        "fixed (--set)": " ".join(settings.get("fixed", [])) or "-",
        "plugins": " ".join(settings.get("plugins", [])) or "-",
        "trials": ", ".join(f"{n} {state}" for state, n in counts.items()) or "none yet",
    }
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in described.items())
    best_html = (
        f'<p class="best">Best: trial {best["number"]}, {esc(monitor)} {esc(_fmt(best["value"]))}. '
        f"Reproduce it with:</p><pre>{esc(shlex.join(reproduce(settings, best)))}</pre>"
        if best
        else "<p>No trial has completed yet.</p>"
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>minitrain sweep: {esc(name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }} td.note {{ color: #555; font-size: 90%; }}
tr.best td {{ background: #e8f5e9; font-weight: bold; }} tr.pruned td {{ color: #666; }} tr.fail td {{ color: #a33; }}
pre {{ background: #f4f4f4; padding: 0.5em; white-space: pre-wrap; word-break: break-all; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; width: 540px; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 90%; color: #444; }}
</style></head><body>
<h1>Sweep {esc(name)}</h1>
<table>{summary}</table>
{best_html}
<h2>Trials, best first</h2>
<table><tr><th>trial</th><th>state</th><th>{esc(monitor)}</th><th>epochs</th><th>time</th>
{"".join(f"<th>{esc(k)}</th>" for k in keys)}<th>files</th>{"<th>note</th>" if notes else ""}</tr>
{chr(10).join(trs)}
</table>
<h2>Plots</h2>
{chr(10).join(figures) or "<p>no plots yet</p>"}
{"<p>Not drawn: " + "; ".join(missing) + "</p>" if missing else ""}
<p>Written by <code>minitrain sweep show {esc(name)}</code> on {time.strftime("%Y-%m-%d %H:%M")}.</p>
</body></html>
"""
    path = folder / "sweep.html"
    write_atomic(path, lambda f: f.write(page.encode()), what="sweep page")
    return path


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).relative_to(folder)
        return True
    except ValueError:
        return False
