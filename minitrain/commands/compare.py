"""``minitrain compare RUN RUN... [-o FILE.html]``: one self-contained page that puts runs side by
side, drawn from their event logs alone (:mod:`minitrain.records.rundir`), so it works offline and after
the fact, whatever plugins the runs had:

* a summary per run: recipe, status (with the stop reason or error), epochs, the main metric's
  best and last values, wall time (:func:`minitrain.records.rundir.wall_time`, as ``runs`` and
  ``viz``'s report say it);
* curves, one colour per run: the training loss at every step (smoothed, the raw values faint;
  per sample where a recipe sums it over the batch), each validation metric per epoch, and the
  learning rate per epoch;
* the settings that differ between the runs (recipe config, plugins and their options);
* each run's final metrics.

The plots are PNGs inside the page (``data:`` URIs), so the one file can be moved, mailed or
attached as it is. Figures are drawn with ``matplotlib.figure.Figure`` (no pyplot, no window).
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Sequence
from pathlib import Path

from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import check_writable
from minitrain.records.curves import COLORS, epoch_axis, log_scale_if_wide, smooth
from minitrain.records.formats import format_duration, format_value
from minitrain.records.losses import SUM
from minitrain.records.rundir import Run, check_run_dir, differing, higher_is_better, main_metric, read_run

PAGE_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: -0.1em; }
figure { display: inline-block; width: 48%; min-width: 420px; margin: 0.5em 0.5%; vertical-align: top; }
figure img { width: 100%; }
td.run { white-space: nowrap; }
.status-failed, .status-interrupted, .status-killed { color: #b00; } .status-running { color: #a60; }
.note { color: #666; font-size: 0.9em; }
"""


def compare(paths: Sequence[str | Path], out: str | Path = "compare.html") -> Path:
    """Write the comparison page of the run directories ``paths`` to ``out``; returns its path."""
    if not paths:
        raise MinitrainError("compare: name at least one run directory")
    check_writable(Path(out).parent, "-o folder")
    runs = [read_run(check_run_dir(path), steps=True) for path in paths]
    labels = _labels(runs)
    figures = [(title, _png(figure)) for title, figure in _figures(runs, labels)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(runs, labels, figures), encoding="utf-8")
    return out


def _labels(runs: list[Run]) -> list[str]:
    """Each run's directory name, or its path where two names are the same."""
    names = [run.name for run in runs]
    return [run.name if names.count(run.name) == 1 else str(run.path) for run in runs]


def _figures(runs: list[Run], labels: list[str]):
    """``(title, Figure)`` for each curve some run has."""
    from matplotlib.figure import Figure

    per_epoch = all(run.steps_per_epoch for run in runs if run.steps)
    curves = [(run, label, COLORS[i % len(COLORS)]) for i, (run, label) in enumerate(zip(runs, labels))]

    if any(run.steps for run in runs):
        fig = Figure(figsize=(6, 3.8), layout="constrained")
        ax = fig.add_subplot()
        for run, label, color in curves:
            if not run.steps:
                continue
            steps, losses = zip(*run.steps)
            x = [s / run.steps_per_epoch for s in steps] if per_epoch else list(steps)
            ax.plot(x, losses, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth(losses), color=color, linewidth=1.8, label=label)
        ax.set(
            title="Training loss per step (smoothed; raw values faint)",
            xlabel="epoch" if per_epoch else "step",
            ylabel="loss per sample" if any(run.loss_reduction == SUM for run in runs) else "loss",
        )
        log_scale_if_wide(ax, [loss for run in runs for _, loss in run.steps or ()])
        _finish_axes(ax, False)  # (fractions of an epoch: a short run has ticks within it)
        yield "Training loss", fig

    metrics = sorted(
        {key for run in runs for m in run.epoch_metrics.values() for key in m if key.startswith("val_")},
        key=lambda k: (k != "val_loss", k != "val_acc", k),
    )
    for metric in metrics + ["lr"]:
        if not any(run.values(metric) for run in runs):
            continue
        fig = Figure(figsize=(6, 3.8), layout="constrained")
        ax = fig.add_subplot()
        for run, label, color in curves:
            points = run.values(metric)
            if points:
                ax.plot(*zip(*points), color=color, marker="o", markersize=3, linewidth=1.5, label=label)
        title = "Learning rate (end of epoch)" if metric == "lr" else f"Validation {metric.removeprefix('val_')}"
        ax.set(title=title, xlabel="epoch", ylabel=metric)
        if "loss" in metric:
            log_scale_if_wide(ax, [v for run in runs for _, v in run.values(metric)])
        _finish_axes(ax, True)
        yield title, fig


def _finish_axes(ax, integer_x: bool) -> None:
    if integer_x:
        epoch_axis(ax)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def page(runs: list[Run], labels: list[str], figures: list[tuple[str, str]]) -> str:
    """The HTML page: summary, curves, differing settings, final metrics."""
    esc = html.escape
    metric = main_metric(runs)
    swatches = [f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>' for i in range(len(runs))]

    summary = [
        "<tr><th>run</th><th>recipe</th><th>status</th><th>epochs</th>"
        + (f"<th>best {esc(metric)}</th><th>last {esc(metric)}</th>" if metric else "")
        + "<th>steps</th><th>wall time</th></tr>"
    ]
    for i, run in enumerate(runs):
        status = (
            run.status
            + (f": {run.stop_reason}" if run.stop_reason else "")
            + (f": {run.error}" if run.error else "")
            + (f" ({run.signal})" if run.signal else "")
        )
        epochs = f"{run.epochs_done}/{run.epochs}" if run.epochs else str(run.epochs_done)
        summary.append(
            f'<tr><td class="run">{swatches[i]}<span title="{esc(str(run.path))}">{esc(labels[i])}</span></td>'
            f'<td>{esc(run.recipe or "-")}</td><td class="status-{esc(run.status)}">{esc(status)}</td>'
            f'<td class="num">{epochs}</td>'
            + (
                f'<td class="num">{format_value(run.best(metric))}</td>'
                f'<td class="num">{format_value(run.last(metric))}</td>'
                if metric
                else ""
            )
            + f'<td class="num">{run.global_step}</td><td class="num">{format_duration(run.duration)}</td></tr>'
        )

    differ = differing(runs)
    head = "".join(f"<th>{swatches[i]}{esc(label)}</th>" for i, label in enumerate(labels))
    if differ:
        rows = "".join(
            f"<tr><th>{esc(key)}</th>"
            + "".join(f"<td>{esc(v.replace(',', ', ') if key == 'plugins' else v)}</td>" for v in values)
            + "</tr>"
            for key, values in differ.items()
        )
        settings = f"<table><tr><th>setting</th>{head}</tr>{rows}</table>"
    else:
        settings = "<p>The runs have the same recipe settings and plugins.</p>"

    names = sorted(
        {key for run in runs for key in run.final_metrics},
        key=lambda k: (not k.startswith("val_"), k not in ("train_loss", "lr"), k),
    )
    final_rows = []
    for i, run in enumerate(runs):
        final = run.final_metrics
        final_rows.append(
            f'<tr><td class="run">{swatches[i]}{esc(labels[i])}</td>'
            + "".join(f'<td class="num">{format_value(final.get(k))}</td>' for k in names)
            + "</tr>"
        )
    finals = (
        f"<table><tr><th>run</th>{''.join(f'<th>{esc(k)}</th>' for k in names)}</tr>{''.join(final_rows)}</table>"
        if names
        else "<p>No run has completed an epoch.</p>"
    )

    plots = (
        "\n".join(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(title)}"></figure>' for title, data in figures
        )
        or "<p>No curves: the runs' logs hold no steps or epochs.</p>"
    )
    direction = (" (higher is better)" if higher_is_better(metric) else " (lower is better)") if metric else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>minitrain: comparing {len(runs)} run{"s" * (len(runs) != 1)}</title>
<style>{PAGE_STYLE}</style></head><body>
<h1>Comparing {len(runs)} run{"s" * (len(runs) != 1)}</h1>
<p class="note">Drawn from the runs' event logs by minitrain on {esc(time.strftime("%Y-%m-%d %H:%M"))}.
Main metric: {esc(metric or "none")}{direction}.</p>
<table>{"".join(summary)}</table>
<h2>Curves</h2>
{plots}
<h2>Settings that differ</h2>
{settings}
<h2>Final metrics</h2>
<p class="note">The last completed epoch of each run.</p>
{finals}
</body></html>
"""


def add_parser(command) -> None:
    """Register ``minitrain compare`` (``command`` is the CLI's sub-parser factory)."""
    parser = command("compare", help="one HTML page comparing runs: curves, differing settings, final metrics")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument(
        "-o",
        "--out",
        default="compare.html",
        metavar="FILE.html",
        help="where to write the page (default: compare.html)",
    )
    parser.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    print(f"wrote {compare(args.runs, args.out)}")
    return 0
