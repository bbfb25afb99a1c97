"""Plots and a small HTML report: ``<run_dir>/plots/*.png`` and ``<run_dir>/report.html``.

Written at the end of the fit (and after every epoch with ``every_epoch=true``):

* ``loss.png``: the training loss at every step (smoothed, the raw values faint) and the
  validation loss per epoch, per sample where the recipe's loss sums over the batch
  (:mod:`minitrain.records.losses`); ``accuracy.png`` (validation accuracy, for a classifier) and
  ``metrics.png`` (the recipe's other validation metrics), by epoch; ``lr.png``: the learning rate
  each step trained at, where the run is live, else (a replay) at the end of each epoch;
* for a classifier, ``confusion.png``: the last validation's confusion matrix, with the recipe's
  class names, and ``misclassified.png``: up to ``max_images`` validation images the final model
  got wrong;
* ``report.html``, titled with the recipe's name: the run's status (finished, stopped, failed,
  interrupted, or running while ``every_epoch`` redraws), wall time (one definition with
  ``minitrain runs`` and ``compare``: :func:`minitrain.records.rundir.wall_time`), device, plugins, stop
  reason and errors, each resume and restart of the run (where it went on from), the plots
  (relative links, so it works offline), final metrics and config.

Everything but the image grid and the per-step learning rate is drawn from events alone
(FitStart's config and class names, BatchEnd's losses, EpochEnd's metrics, ValidationEnd's
confusion matrix), which is why ``minitrain report RUN_DIR`` can redraw it from ``events.jsonl``
without training. The per-step losses cost the loop one list append per step: the loss tensors are
held, and every 256 steps (and at each epoch's end) go to the host in one copy that nobody waits
for, as ``jsonl`` does. The events carry the learning rate at each epoch's end only, so a live run
reads the optimizer's after each step (a float, no sync: a second append) and keeps it in its
checkpoints; a replay draws the one per epoch.
The grid needs the images themselves: a wrapper on ``eval_step`` collects them on the device
during the last scheduled epoch's validation only, in fixed-size buffers (no host sync per
batch), and moves them to the host once. A replay has no images, so it keeps a grid that is
already there.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
pyplot, so no global backend is switched and no window opens.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.device import HostCopy
from minitrain.engine.files import read_json
from minitrain.engine.surface import TrainerView
from minitrain.records.curves import epoch_axis, smooth
from minitrain.records.formats import format_duration
from minitrain.records.losses import MEAN, NOTE, SUM, loss_reduction, per_sample_metrics, recorded_reduction
from minitrain.records.rundir import read_run, wall_time

PLOTS = "plots"
HOLD = 256  # per-step losses held before they go to the host together
CURVES = {  # file -> (title, y label, [(metric, legend label)])
    "loss.png": ("Loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
    "accuracy.png": ("Validation accuracy", "accuracy", [("val_acc", "validation")]),
    "lr.png": ("Learning rate (end of epoch)", "learning rate", [("lr", "lr")]),
}
OTHER_METRICS = "metrics.png"  # every validation metric the curves above leave out
FIGURES = [
    "loss.png",
    "accuracy.png",
    OTHER_METRICS,
    "lr.png",
    "confusion.png",
    "misclassified.png",
]  # the report's order


class Visualization:
    enabled_by_default = False
    role = "observer"  # its eval_step wrapper only collects images
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        every_epoch: bool = Field(False, description="also redraw after every epoch, not only at the end")
        max_images: int = Field(32, ge=0, le=256, description="misclassified images to show (0: no grid)")

    def __init__(self, config: Config):
        self.config = config
        self.run_dir: Path | None = None
        self.run_config: dict = {}
        self.class_names: list[str] | None = None
        self.total_epochs: int | None = None
        self.epochs: dict[int, dict[str, float]] = {}  # epoch -> its EpochEnd metrics
        self.confusion: list[list[int]] | None = None
        self.confusion_epoch = 0
        self.stop_reason: str | None = None
        self.starts: list[dict] = []  # each resume or restart: {"restart", "resumed_from", "epoch", "global_step"}
        self.status = "running"
        self.error: str | None = None
        self.device: str | None = None
        self.started, self.start_epoch, self.replaying = time.time(), 1, False
        self.plugins: list[str] = []
        self.steps_per_epoch: int | None = None
        self.held: list = []  # this group's batch losses (tensors until they reach the host)
        self.held_from = 0  # the global step of the first of them
        self.held_sizes: list[int] = []  # their batch sizes, kept for a loss summed over the batch only
        self.step_losses: list[tuple[int, HostCopy | torch.Tensor, torch.Tensor | None]] = []
        # (first step, losses, their batch sizes where the losses are sums) per group
        self.summed = False  # the recipe's loss sums over the batch: shown per sample (minitrain.records.losses)
        self.optimizer: Any = None  # a live run's, whose lr is read after each step
        self.step_lrs: list[tuple[int, float]] = []  # (global step, the lr it trained at), from a live run
        self.capturing = False
        self.buffer: tuple[torch.Tensor, ...] | None = None  # (images, targets, preds, wrong) on the device
        self.misclassified: tuple[torch.Tensor, ...] | None = None  # the same, on the host

    # --- recording ----------------------------------------------------------------------------

    @hookimpl
    def on_fit_start(self, event, trainer) -> None:
        self.run_dir = Path(event.run_dir) if event.run_dir else None
        self.run_config, self.class_names, self.total_epochs = event.config, event.class_names, event.epochs
        self.status, self.error, self.stop_reason, self.device = "running", None, None, event.device
        self.started, self.start_epoch = time.time(), event.start_epoch
        self.replaying = trainer.replaying
        self.steps_per_epoch = event.steps_per_epoch
        self.plugins = sorted(trainer.plugin_options())
        if event.resumed_from or event.restart:  # (after load_state_dict: the run's earlier starts are in)
            self.starts.append(
                {
                    "restart": event.restart,
                    "resumed_from": event.resumed_from,
                    "epoch": event.start_epoch,
                    "global_step": event.global_step,
                }
            )
        self._group()
        self._forget_steps_after(event.global_step)  # a resume from an earlier step redoes the later ones
        live = not trainer.replaying and isinstance(trainer, TrainerView)
        if live:  # the recipe's loss itself; a replay reads what the run recorded
            self.summed = loss_reduction(trainer.loss_fn) == SUM
        else:
            self.summed = self.run_dir is not None and recorded_reduction(read_json(self.run_dir / "run.json")) == SUM
        # the lr is read after each step: a float costs nothing; a tensor (a capturable optimizer's) would sync
        self.optimizer = trainer.optimizer if live and _is_number(trainer.optimizer.param_groups[0]["lr"]) else None

    @hookimpl
    def on_epoch_start(self, event) -> None:
        if self.optimizer is not None:  # an epoch's schedule steps after the last BatchEnd of the one before
            if self.step_lrs and self.step_lrs[-1][0] == event.global_step + 1:
                self.step_lrs.pop()
            self.step_lrs.append((event.global_step + 1, float(self.optimizer.param_groups[0]["lr"])))

    @hookimpl
    def on_batch_end(self, event) -> None:
        held = self.held
        if not held:
            self.held_from = event.global_step
        held.append(event.loss)
        if self.summed:
            self.held_sizes.append(event.batch_size)
        if self.optimizer is not None:  # the rate the next step trains at, the schedule stepped
            self.step_lrs.append((event.global_step + 1, self.optimizer.param_groups[0]["lr"]))
        if len(held) == HOLD:
            self._group()

    def _group(self) -> None:
        """Start moving the held losses to the host, in one copy that nobody waits for here."""
        held, self.held = self.held, []
        sizes, self.held_sizes = self.held_sizes, []
        if not held:
            return
        divisors = torch.tensor(sizes, dtype=torch.float32) if sizes else None  # on the host, applied there
        self.step_losses.append((self.held_from, HostCopy(torch.stack(held).reshape(-1).float()), divisors))

    def steps(self) -> list[tuple[int, float]]:
        """Every step's loss so far, as ``(global step, loss)``; per sample for a summed loss."""
        self._group()
        out: list[tuple[int, float]] = []
        for first, losses, sizes in self.step_losses:
            values = losses.get() if isinstance(losses, HostCopy) else losses
            if sizes is not None:
                values = values / sizes
            out += zip(range(first, first + len(values)), values.tolist())
        return out

    def _forget_steps_after(self, step: int) -> None:
        kept = [
            (first, losses if isinstance(losses, torch.Tensor) else losses.get(), sizes)
            for first, losses, sizes in self.step_losses
            if first <= step
        ]
        if kept and kept[-1][0] + len(kept[-1][1]) - 1 > step:
            first, losses, sizes = kept[-1]
            end = step - first + 1
            kept[-1] = (first, losses[:end], None if sizes is None else sizes[:end])
        self.step_losses = cast("list[tuple[int, HostCopy | torch.Tensor, torch.Tensor | None]]", kept)
        self.step_lrs = [(s, lr) for s, lr in self.step_lrs if s <= step]

    def lrs(self, last: int) -> list[tuple[int, float]]:
        """The learning rate of every step up to ``last``, as ``(global step, lr)`` (a live run's;
        the rate after the last step is the next one's)."""
        return [(s, float(lr)) for s, lr in self.step_lrs if s <= last]

    @hookimpl
    def on_validation_start(self, event) -> None:
        self.capturing = bool(self.run_dir) and self.config.max_images > 0 and event.epoch == self.total_epochs
        self.buffer = None

    @hookimpl(wrapper=True)
    def eval_step(self, batch):
        logits, targets = yield
        if self.capturing:
            self._collect(batch[0], logits, targets)
        return logits, targets

    def _collect(self, images, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep the first ``max_images`` wrong predictions seen so far; every shape is fixed in
        advance, so nothing waits for the device."""
        if not (
            isinstance(images, torch.Tensor)
            and images.dim() == 4
            and images.shape[1] in (1, 3)
            and logits.dim() == 2
            and targets.dim() == 1
            and not targets.is_floating_point()
        ):
            return  # not images, or not a classifier's outputs
        preds = logits.argmax(1)
        parts: tuple[torch.Tensor, ...] = (
            images.to(logits.device, non_blocking=True),
            targets,
            preds,
            preds != targets,
        )
        parts = _first_wrong(parts, self.config.max_images)
        if self.buffer is not None:
            parts = _first_wrong(tuple(torch.cat(p) for p in zip(self.buffer, parts)), self.config.max_images)
        self.buffer = parts

    @hookimpl
    def on_validation_end(self, event) -> None:
        self.confusion, self.confusion_epoch = event.confusion, event.epoch
        if self.capturing and self.buffer is not None:
            self.misclassified = tuple(t.cpu() for t in self.buffer)  # the one move to the host
        self.capturing, self.buffer = False, None

    @hookimpl(tryfirst=True)  # before a checkpoint plugin saves this plugin's state
    def on_epoch_end(self, event) -> None:
        self._group()
        self.epochs[event.epoch] = dict(event.metrics)
        if self.config.every_epoch:
            self.write()

    @hookimpl
    def on_fit_end(self, event) -> None:
        self.stop_reason = event.stop_reason
        self.status = "stopped" if event.stop_reason else "finished"
        self.write()

    @hookimpl
    def on_exception_raised(self, event) -> None:
        self.status, self.error = "failed", f"{event.error_type}: {event.message}"
        self.write()

    @hookimpl
    def on_interrupted(self, event) -> None:
        self.status, self.error = "interrupted", f"interrupted by {event.signal}"
        self.write()

    def state_dict(self) -> dict:
        """The curves so far, so that a resumed run's plots start at epoch 1 and step 1."""
        steps = self.steps()
        return {
            "epochs": self.epochs,
            "confusion": self.confusion,
            "confusion_epoch": self.confusion_epoch,
            "starts": [dict(start) for start in self.starts],
            "loss_steps": torch.tensor([s for s, _ in steps], dtype=torch.int64),
            "losses": torch.tensor([v for _, v in steps], dtype=torch.float32),  # per sample, as drawn
            "lr_steps": torch.tensor([s for s, _ in self.step_lrs], dtype=torch.int64),
            "lrs": torch.tensor([lr for _, lr in self.step_lrs], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epochs = {int(k): dict(v) for k, v in state["epochs"].items()}
        self.confusion, self.confusion_epoch = state["confusion"], state["confusion_epoch"]
        self.starts = [dict(start) for start in state.get("starts", [])]  # (older checkpoints have none)
        self.held, self.held_sizes, self.step_losses = [], [], []
        if "losses" in state and len(state["losses"]):  # (checkpoints of earlier versions have none)
            steps = state["loss_steps"].tolist()
            if steps == list(range(steps[0], steps[0] + len(steps))):
                self.step_losses = [(steps[0], state["losses"].float(), None)]
            else:
                self.step_losses = [(s, state["losses"][i : i + 1].float(), None) for i, s in enumerate(steps)]
        self.step_lrs = list(zip(state["lr_steps"].tolist(), state["lrs"].tolist())) if "lrs" in state else []

    # --- drawing ------------------------------------------------------------------------------

    def write(self) -> None:
        if self.run_dir is None:
            return
        plots = self.run_dir / PLOTS
        plots.mkdir(parents=True, exist_ok=True)
        batch_size = self.run_config.get("batch_size")
        reduction = SUM if self.summed else MEAN
        epochs = [
            {"epoch": e}
            | per_sample_metrics(self.epochs[e], batch_size if isinstance(batch_size, int) else None, reduction)
            for e in sorted(self.epochs)
        ]
        steps = self.steps()
        lrs = self.lrs(steps[-1][0] if steps else 0)
        for name, (title, ylabel, series) in CURVES.items():
            if name == "loss.png" and steps:
                plot_loss(epochs, steps, self.steps_per_epoch, plots / name, per_sample=self.summed)
            elif name == "lr.png" and lrs:
                plot_lr(lrs, self.steps_per_epoch, plots / name)
            else:
                plot_curve(epochs, series, title, ylabel, plots / name)
        shown = {key for _, _, series in CURVES.values() for key, _ in series}
        others = sorted({key for m in epochs for key in m if key.startswith("val_") and key not in shown})
        plot_curve(
            epochs,
            [(key, key.removeprefix("val_")) for key in others],
            "Validation metrics",
            "value",
            plots / OTHER_METRICS,
        )
        if self.confusion is not None:
            plot_confusion(self.confusion, self.class_names, self.confusion_epoch, plots / "confusion.png")
        if self.misclassified is not None:
            assert self.confusion is not None  # needed to count the errors (without it this failed before too)
            errors = sum(sum(row) - row[i] for i, row in enumerate(self.confusion))
            images, targets, preds, wrong = self.misclassified
            plot_misclassified(images, targets, preds, wrong, self.class_names, errors, plots / "misclassified.png")
        write_report(self.run_dir, self.run_config, epochs, self.stop_reason, self.summary())

    def summary(self) -> dict:
        """What the report says about the run as a whole."""
        assert self.run_dir is not None  # only a run with a run directory writes a report
        run = read_run(self.run_dir)  # its start times and its log: what `minitrain runs` reads
        if self.replaying:  # the run's own wall time, not the replay's
            duration = run.duration
        else:  # the same, up to now; without an event log, the epochs this plugin has seen stand in for it
            earlier = sum(m.get("epoch_time", 0.0) for e, m in self.epochs.items() if e < self.start_epoch)
            duration = wall_time(run.training_times or [earlier, 0.0], run.last_start or self.started, time.time())
        errors = self.run_dir / "errors.log"
        return {
            "recipe": run.recipe,
            "status": self.status,
            "duration": duration,
            "loss_reduction": SUM if self.summed else MEAN,
            "device": self.device,
            "plugins": self.plugins,
            "stop_reason": self.stop_reason,
            "error": self.error,
            "error_log": _error_titles(errors) if errors.is_file() else [],
            "starts": self.starts,
        }


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure; matplotlib is imported at the first plot, not when plugins are listed."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_wrong(parts: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
    """The first ``k`` rows of each tensor, wrong predictions (``parts[-1]``) first, in order."""
    order = torch.argsort((~parts[-1]).to(torch.uint8), stable=True)[:k]
    return tuple(p[order] for p in parts)


def _label(class_names: list[str] | None, index: int) -> str:
    return class_names[index] if class_names and index < len(class_names) else str(index)


def plot_curve(epochs: list[dict], series: list[tuple[str, str]], title: str, ylabel: str, path: Path) -> None:
    """One line per metric in ``series`` that the epochs recorded; no file if none did."""
    lines = [(label, [(m["epoch"], m[key]) for m in epochs if key in m]) for key, label in series]
    lines = [(label, points) for label, points in lines if points]
    if not lines:
        return
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, points in lines:
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    epoch_axis(ax)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.savefig(path, dpi=100)


def plot_loss(
    epochs: list[dict], steps: list[tuple[int, float]], steps_per_epoch: int | None, path: Path, per_sample=False
) -> None:
    """The training loss at every step, smoothed, over its raw values drawn faint, and the
    validation loss at the end of each epoch; against epochs where the epoch length is known.
    ``per_sample``: the recipe's loss sums over the batch, and ``steps`` are those sums over the
    batch size, on the validation loss's scale (the axis says so)."""
    per_epoch = steps_per_epoch or None
    x = [s / per_epoch if per_epoch else s for s, _ in steps]
    losses = [loss for _, loss in steps]
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, losses, color="C0", alpha=0.25, linewidth=0.8)
    ax.plot(x, smooth(losses), color="C0", linewidth=1.8, label="train (per step, smoothed)")
    validation = [(m["epoch"], m["val_loss"]) for m in epochs if "val_loss" in m]
    if validation and per_epoch:  # (a loader without a length: steps alone, as epochs cannot be placed)
        ax.plot(*zip(*validation), color="C1", marker="o", markersize=3, label="validation")
    ax.set(title="Loss", xlabel="epoch" if per_epoch else "step", ylabel="loss per sample" if per_sample else "loss")
    if per_sample:
        ax.set_title("Loss per sample (the recipe's loss sums over each batch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)


def plot_lr(lrs: list[tuple[int, float]], steps_per_epoch: int | None, path: Path) -> None:
    """The learning rate each step trained at (parameter group 0's, as ``EpochEnd`` reports it),
    against epochs where the epoch length is known, as the loss is."""
    per_epoch = steps_per_epoch or None
    fig = _figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([s / per_epoch if per_epoch else s for s, _ in lrs], [lr for _, lr in lrs], color="C0", linewidth=1.5)
    ax.set(title="Learning rate (per step)", xlabel="epoch" if per_epoch else "step", ylabel="learning rate")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_confusion(matrix: list[list[int]], class_names: list[str] | None, epoch: int, path: Path) -> None:
    """Counts in each cell, coloured by the fraction of the true class (row) they hold."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    n = counts.shape[0]
    names = [_label(class_names, i) for i in range(n)]
    fractions = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.55 * n, 20)
    fig = _figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of true class", shrink=0.8)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(counts[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if fractions[i, j] > 0.5 else "black",
                )
    accuracy = counts.diagonal().sum() / counts.sum().clamp(min=1)
    ax.set(
        title=f"Validation confusion matrix (epoch {epoch}, accuracy {accuracy:.1%})", xlabel="predicted", ylabel="true"
    )
    fig.savefig(path, dpi=100)


def plot_misclassified(
    images: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    wrong: torch.Tensor,
    class_names: list[str] | None,
    total_wrong: int,
    path: Path,
) -> None:
    """A grid of wrongly classified images, each stretched to its own value range (the inputs
    are normalised, and the plugin does not know how)."""
    images, targets, preds = images[wrong].float(), targets[wrong], preds[wrong]
    if not len(images):
        return
    flat = images.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    pixels = ((images - low) / (high - low).clamp(min=1e-8)).permute(0, 2, 3, 1).numpy()
    cols = min(8, len(pixels))
    rows = -(-len(pixels) // cols)
    fig = _figure(figsize=(1.6 * cols, 1.8 * rows + 0.4), layout="constrained")
    fig.suptitle(f"Misclassified validation images ({len(pixels)} of {total_wrong})")
    for i, (image, t, p) in enumerate(zip(pixels, targets.tolist(), preds.tolist())):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image.squeeze(2) if image.shape[2] == 1 else image, cmap="gray", interpolation="nearest")
        ax.set_title(f"true: {_label(class_names, t)}\npred: {_label(class_names, p)}", fontsize=8)
        ax.set_axis_off()
    fig.savefig(path, dpi=100)


def write_report(
    run_dir: Path, config: dict, epochs: list[dict], stop_reason: str | None, summary: dict | None = None
) -> None:
    """``report.html``: what the run was and how it ended (``summary``: recipe, status, duration,
    device, plugins, error, errors.log's entries), whichever plots exist, the final metrics and the
    config. Links are relative, so the run directory can be copied or opened offline as it is."""
    esc = html.escape
    summary = summary or {}
    figures = [
        f'<figure><img src="{PLOTS}/{name}" alt="{esc(name)}"></figure>'
        for name in FIGURES
        if (run_dir / PLOTS / name).is_file()
    ]
    final = epochs[-1] if epochs else {}
    recipe = summary.get("recipe")
    title = f"{recipe}: {run_dir.name}" if recipe else run_dir.name
    status = summary.get("status", "finished" if not stop_reason else "stopped")
    facts = [
        ("status", f'<span class="status-{esc(status)}">{esc(status)}</span>'),
        ("epochs", f"{len(epochs)} recorded"),
        ("wall time", esc(format_duration(summary.get("duration")))),
        ("device", esc(summary.get("device") or "-")),
        ("plugins", esc(", ".join(summary.get("plugins") or []) or "-")),
        ("run directory", esc(str(run_dir.absolute()))),
    ]
    if summary.get("loss_reduction") == SUM:
        facts.append(("training loss", esc(NOTE)))
    if stop_reason:
        facts.insert(1, ("stop reason", esc(stop_reason)))
    if summary.get("error"):
        facts.insert(1, ("error", f'<span class="status-failed">{esc(summary["error"])}</span>'))
    if summary.get("starts"):
        facts.append(
            (
                "resumed",
                "<ul>"
                + "".join(f"<li>{esc(_start_line(start))}</li>" for start in summary["starts"])
                + "</ul>the steps after each checkpoint were done again",
            )
        )
    if summary.get("error_log"):
        entries = "".join(f"<li>{esc(line)}</li>" for line in summary["error_log"])
        facts.append(("errors.log", f'<a href="errors.log">full tracebacks</a><ul>{entries}</ul>'))
    about = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    metrics = "".join(f"<tr><th>{esc(k)}</th><td>{v:.4g}</td></tr>" for k, v in final.items())
    settings = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
        for k, v in config.items()
    )
    (run_dir / "report.html").write_text(
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
.status-failed, .status-interrupted, .status-killed {{ color: #b00; font-weight: bold; }}
.status-running {{ color: #a60; }}
ul {{ margin: 0.2em 0; padding-left: 1.2em; }} .sub {{ color: #666; margin-top: -0.6em; }}
</style></head><body>
<h1>{esc(recipe or run_dir.name)}</h1>
<p class="sub">{esc(run_dir.name)}</p>
<table>{about}</table>
<h2>Final metrics</h2>
<table>{metrics or "<tr><td>no completed epoch</td></tr>"}</table>
<h2>Plots</h2>
{chr(10).join(figures) or "<p>no plots</p>"}
<h2>Config</h2>
<table>{settings}</table>
</body></html>
""",
        encoding="utf-8",
    )


def _start_line(start: dict) -> str:
    restart = f"restart {start['restart']}: " if start["restart"] else ""
    if not start["resumed_from"]:
        return f"{restart}started afresh (no checkpoint yet)"
    return f"{restart}resumed from {start['resumed_from']} at step {start['global_step']} (epoch {start['epoch']})"


def _error_titles(path: Path, limit: int = 20) -> list[str]:
    """The heading line of each entry of a run's errors.log (``--- TIME step N: what failed``)."""
    try:
        lines = [
            line[4:].strip()
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.startswith("--- ")
        ]
    except OSError:
        return []
    return lines[-limit:]
