"""The Trainer: a loop that calls pipeline hooks and emits events, and nothing else.

Metrics stay on the device while an epoch runs and are read back once, at its end. Progress
(epoch, batch within the epoch, global step) lives here so that a checkpoint can stop and resume
the loop between any two batches.
"""
from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import pluggy
import torch
import torch.nn.functional as F

from minitrain import events as ev
from minitrain.device import batch_size, get_rng_state, resolve_device, set_rng_state
from minitrain.errors import MinitrainError
from minitrain.plugins import check_hooks, make_plugin_manager, register_plugin


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        epochs: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        device: str | torch.device = "auto",
        plugins: Iterable[object] = (),
        run_dir: str | None = None,
        config: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ):
        if scheduler_interval not in ("epoch", "step"):
            raise MinitrainError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}")
        self.module = model  # the recipe's model; `model` may become a wrapper of it (compile, DDP)
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.epochs = epochs
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.run_dir = run_dir
        self.config = config or {}
        self.class_names = class_names
        self.pm = plugin_manager or make_plugin_manager()
        for plugin in plugins:
            register_plugin(self.pm, plugin)
        check_hooks(self.pm)
        self.hook = self.pm.hook

        self.epoch = 0          # the epoch being run (or next to run)
        self.batch_idx = 0      # the next batch to run within `epoch`
        self.global_step = 0    # optimizer steps taken
        self.stop_reason: str | None = None
        self.metrics: dict[str, float] = {}
        self._loss_sum = torch.zeros((), device=self.device)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train from the current position to ``epochs``; return the last epoch's metrics."""
        self.stop_reason = None
        try:
            self.hook.setup(trainer=self)
            self.emit(ev.FitStart(
                epochs=self.epochs, start_epoch=self.epoch, global_step=self.global_step,
                steps_per_epoch=_length(self.train_loader), device=str(self.device),
                run_dir=self.run_dir, config=self.config, class_names=self.class_names,
            ))
            while self.epoch < self.epochs and self.stop_reason is None:
                self._train_epoch()
        except KeyboardInterrupt:
            self.emit(ev.Interrupted(epoch=self.epoch, global_step=self.global_step))
            raise
        except Exception as exc:
            self.emit(ev.ExceptionRaised(
                epoch=self.epoch, global_step=self.global_step, error_type=type(exc).__name__,
                message=str(exc), traceback=traceback.format_exc(),
            ))
            raise
        self.emit(ev.FitEnd(epochs_completed=self.epoch, global_step=self.global_step,
                            metrics=self.metrics, stop_reason=self.stop_reason))
        return self.metrics

    def _train_epoch(self) -> None:
        epoch, hook, emit = self.epoch, self.hook, self.emit
        batches = self._batches()
        emit(ev.EpochStart(epoch=epoch, global_step=self.global_step, steps=_length(self.train_loader)))
        self.model.train()
        started, samples = time.perf_counter(), 0
        for batch in batches:
            n = batch_size(batch)
            emit(ev.BatchStart(epoch=epoch, batch_idx=self.batch_idx, global_step=self.global_step, batch_size=n))
            loss = hook.train_step(trainer=self, batch=batch)
            hook.backward(trainer=self, loss=loss)
            hook.optimizer_step(trainer=self)
            loss = loss.detach()
            self._loss_sum += loss
            self.batch_idx += 1
            self.global_step += 1
            samples += n
            emit(ev.BatchEnd(epoch=epoch, batch_idx=self.batch_idx - 1, global_step=self.global_step,
                             batch_size=n, loss=loss))
            if self.stop_reason is not None:
                return  # stopped mid-epoch: progress stays here so a checkpoint resumes from it

        elapsed = time.perf_counter() - started
        metrics = {
            "train_loss": self._loss_sum.item() / max(self.batch_idx, 1),  # the epoch's one read
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "epoch_time": elapsed,
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        }
        if self.val_loader is not None:
            metrics.update(self.validate())
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        self.epoch, self.batch_idx, self.metrics = epoch + 1, 0, metrics
        self._loss_sum.zero_()
        emit(ev.EpochEnd(epoch=epoch, global_step=self.global_step, metrics=metrics))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, accuracy and confusion matrix over ``val_loader``, read from the device once."""
        emit = self.emit
        emit(ev.ValidationStart(epoch=self.epoch, global_step=self.global_step))
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        confusion, count = None, 0
        for batch in self.val_loader:
            logits, targets = self.hook.eval_step(trainer=self, batch=batch)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
            classes = logits.shape[1]
            pairs = torch.bincount(targets * classes + logits.argmax(1), minlength=classes * classes)
            confusion = pairs if confusion is None else confusion + pairs
            count += targets.shape[0]
        self.model.train()
        if confusion is None:
            raise MinitrainError("the validation loader yielded no batches")
        matrix = confusion.view(classes, classes).tolist()
        metrics = {"val_loss": loss_sum.item() / count,
                   "val_acc": sum(matrix[i][i] for i in range(classes)) / count}
        emit(ev.ValidationEnd(epoch=self.epoch, global_step=self.global_step, metrics=metrics, confusion=matrix))
        return metrics

    def _batches(self) -> Iterable:
        """This epoch's batches from `batch_idx` on. A loader with ``set_position(epoch, batch_idx)``
        starts there without loading earlier batches; any other loader is fast-forwarded."""
        loader = self.train_loader
        if hasattr(loader, "set_position"):
            loader.set_position(self.epoch, self.batch_idx)
            return loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        return itertools.islice(loader, self.batch_idx, None) if self.batch_idx else loader

    # --- what plugins use -------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        """Deliver ``event`` to every implementation of its hook (custom events included)."""
        caller = getattr(self.hook, event.hook, None)
        if caller is None or caller.spec is None:  # an optionalhook impl alone is not a spec
            raise MinitrainError(
                f"event {type(event).__name__} has no hook {event.hook!r}: register its hookspec "
                "(a plugin's `hookspecs` attribute) before emitting it")
        caller(event=event, trainer=self)
        self.hook.on_event(event=event, trainer=self)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current batch (early stopping, signals)."""
        self.stop_reason = reason

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights, optimizer, schedule, progress,
        random generators and the state of every plugin that keeps some."""
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {"epoch": self.epoch, "batch_idx": self.batch_idx, "global_step": self.global_step,
                         "loss_sum": self._loss_sum.detach().cpu(), "metrics": dict(self.metrics)},
            "rng": get_rng_state(),
            "plugins": {name: plugin.state_dict() for name, plugin in self._stateful_plugins()},
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        progress = state["progress"]
        self.epoch, self.batch_idx, self.global_step = progress["epoch"], progress["batch_idx"], progress["global_step"]
        self.metrics = dict(progress["metrics"])
        self._loss_sum = progress["loss_sum"].to(self.device)
        set_rng_state(state["rng"])
        saved = state.get("plugins", {})
        for name, plugin in self._stateful_plugins():
            if name in saved:
                plugin.load_state_dict(saved[name])

    def _stateful_plugins(self) -> list[tuple[str, Any]]:
        return [(name, plugin) for name, plugin in self.pm.list_name_plugin()
                if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None))]


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
