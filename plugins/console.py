"""Console progress: a live bar per epoch (step, loss, samples/s, ETA) and one line per epoch.

On a terminal the bar is tqdm's; in a log file (not a terminal) it prints plain lines instead,
so logs hold no control characters. The loss is shown every ``refresh_every`` steps only; on an
accelerator it is the loss of the previous refresh, copied to the host in the background, so the
display never makes the host wait for the device. A loss the recipe sums over each batch is shown
per sample, as every report shows it (:mod:`minitrain.records.losses`), and a line at the start
says so.

The epoch line also says what share of the epoch's training time the loop spent waiting for its
next batch (host time from one batch's end to the next one's start: the loader's work, or its
wait for its workers), so a user knows when to raise ``num_workers``. It costs two clock reads a
step and no device sync.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from pydantic import Field
from tqdm import tqdm

from minitrain import PluginConfig, hookimpl
from minitrain.engine import distributed
from minitrain.engine.device import HostCopy
from minitrain.kit.summary import describe_model
from minitrain.records.losses import MEAN, NOTE, SUM, loss_reduction, per_sample_metrics


class Console:
    enabled_by_default = True
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        refresh_every: int = Field(25, ge=1, description="steps between reads of the loss")
        plain_lines: int = Field(5, ge=0, description="progress lines per epoch when not on a terminal")

    def __init__(self, config: Config):
        self.config = config
        self.stream = sys.stderr
        self.bar: tqdm | None = None
        self.every, self.start_batch = sys.maxsize, 0  # steps between progress updates; set per epoch
        self.pending: dict[str, HostCopy] = {}  # the values (loss, grad_norm) asked for at the last refresh
        self.divisors: dict[str, int] = {}  # what each is shown divided by (a summed loss: its batch's size)
        self.reduction = MEAN  # "sum": the loss is shown per sample (minitrain.records.losses)
        self.batch_size: int | None = None  # the recipe's: what an epoch's summed train_loss is divided by
        self.mark = self.waited = 0.0  # when the last batch ended; time spent between batches this epoch

    @hookimpl
    def on_fit_start(self, event, trainer) -> None:
        self.epochs = event.epochs
        self.tty = self.stream.isatty()
        where = f", writing to {event.run_dir}" if event.run_dir else ""
        restart = ""
        if event.restart:  # torchrun restarted the group after a failure
            budget = os.environ.get(distributed.MAX_RESTARTS_ENV)
            restart = f"restart {event.restart}{f' of {budget}' if budget else ''}: "
        if event.resumed_from:
            print(
                f"{restart}resuming from {event.resumed_from}: epoch {event.start_epoch}, step {event.global_step}",
                flush=True,
            )
        elif restart:
            print(f"{restart}no checkpoint was written before; starting afresh", flush=True)
        for key, (old, new) in event.changed.items():
            print(f"  changed on resume: {key} {old} -> {new}", flush=True)
        resumed = f" from epoch {event.start_epoch}" if event.start_epoch > 1 else ""
        print(f"training {event.epochs} epochs on {event.device}{resumed}{where}", flush=True)
        print(f"model: {describe_model(trainer.module)}", flush=True)
        self.reduction = loss_reduction(getattr(trainer, "loss_fn", None))
        batch_size = trainer.config.get("batch_size")
        self.batch_size = batch_size if isinstance(batch_size, int) else None
        if self.reduction == SUM:
            print(f"loss: {NOTE}", flush=True)

    @hookimpl
    def on_epoch_start(self, event) -> None:
        self.steps, self.start_batch = event.steps, event.start_batch
        self.started = self.mark = time.perf_counter()
        self.waited = 0.0
        if self.tty:
            self.every = self.config.refresh_every
            self.bar = tqdm(
                total=event.steps,
                initial=event.start_batch,
                desc=f"epoch {event.epoch}/{self.epochs}",
                unit="step",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )
        else:
            lines = self.config.plain_lines
            self.every = max(1, (event.steps or 50 * lines) // lines) if lines else sys.maxsize

    @hookimpl(tryfirst=True)  # first and last: other plugins' work between batches is not the loader's
    def on_batch_start(self) -> None:
        self.waited += time.perf_counter() - self.mark

    @hookimpl(trylast=True)
    def on_batch_end(self, event, trainer) -> None:
        done = event.batch_idx + 1 - self.start_batch  # steps run this epoch by this process
        if done % self.every == 0:  # one step in `every`
            self._progress(event, trainer, done)
        self.mark = time.perf_counter()

    def _progress(self, event, trainer, done: int) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = done * event.batch_size / elapsed  # as if every batch were this one's size
        values = {"loss": self._read("loss", event.loss, event.batch_size if self.reduction == SUM else 1)}
        values |= {name: self._read(name, value) for name, value in trainer.shared.step_metrics.items()}
        if self.bar is not None:
            self.bar.set_postfix(**values, rate=f"{rate:.0f}/s", refresh=False)
            self.bar.update(event.batch_idx + 1 - self.bar.n)
        else:
            total = self.steps or 0
            eta = (total - event.batch_idx - 1) * elapsed / done if total else 0
            shown = " ".join(f"{name} {value}" for name, value in values.items())
            print(
                f"  epoch {event.epoch} step {event.batch_idx + 1}/{total or '?'} {shown} "
                f"{rate:.0f} samples/s eta {eta:.0f}s",
                flush=True,
            )

    def _read(self, name: str, value, divisor: int = 1) -> str:
        """A per-step value as text (divided by ``divisor``: a summed loss by its batch's size),
        without making the host wait: on an accelerator, the value asked for at the previous
        refresh, if its copy has arrived."""
        if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
            return f"{float(value) / divisor:.4f}"
        shown, self.pending[name] = self.pending.get(name), HostCopy(value)
        by, self.divisors[name] = self.divisors.get(name, 1), divisor
        return f"{float(shown.get()) / by:.4f}" if shown is not None and shown.ready() else "-"

    @hookimpl
    def on_epoch_end(self, event) -> None:
        self._close_bar()
        trained = self.mark - self.started
        waiting = f", {self.waited / trained:.0%} waiting for data" if trained > 0 else ""
        m = per_sample_metrics(event.metrics, self.batch_size, self.reduction)
        parts = [f"{k} {m[k]:.4f}" for k in m if k == "train_loss" or k.startswith("val_")]
        print(
            f"epoch {event.epoch}/{self.epochs}: "
            + ", ".join(parts)
            + f" ({m.get('epoch_time', 0):.1f}s, {m.get('samples_per_s', 0):.0f} samples/s{_flops(m)}, "
            f"lr {m.get('lr', 0):.3g}{waiting})",
            flush=True,
        )

    @hookimpl
    def on_fit_end(self, event) -> None:
        self._close_bar()
        if event.stop_reason:
            print(f"stopped early: {event.stop_reason}", flush=True)

    @hookimpl
    def on_exception_raised(self) -> None:
        self._close_bar()

    @hookimpl
    def on_interrupted(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _flops(metrics: dict[str, float]) -> str:
    """The ``throughput`` plugin's model FLOP/s and MFU, where the epoch has them."""
    if "flops_per_s" not in metrics:
        return ""
    shown = f", {metrics['flops_per_s'] / 1e9:.3g} GFLOP/s"
    if "mfu" in metrics:
        of = "measured peak" if "measured_peak_flops_per_s" in metrics else "peak"
        shown += f", MFU {metrics['mfu']:.1%} of {of}"
    return shown
