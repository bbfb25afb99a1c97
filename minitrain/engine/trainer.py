"""The Trainer: a loop that calls pipeline hooks and emits events, and nothing else.

Metrics stay on the device while an epoch runs and are read back once, at its end. Progress
(epoch, batch within the epoch, global step, the epoch's loss sum) is one object,
``trainer.state`` (:class:`~minitrain.engine.state.RunState`), so that a checkpoint can stop and
resume the loop between any two batches. What a plugin may use of the trainer is stated in
:mod:`minitrain.engine.surface`; the Trainer satisfies its ``TrainerView``.

It is also where a run survives what goes wrong around it (docs/plugins.md, "Faults"): an
observer plugin that raises is disabled and the run goes on; SIGINT/SIGTERM stop it at the next
step boundary; a non-finite loss stops it (or, by policy, the step is skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minitrain.engine import distributed
from minitrain.engine import events as ev
from minitrain.engine.device import batch_size, get_rng_state, resolve_device, set_rng_state
from minitrain.engine.dispatch import PluginManager
from minitrain.engine.errors import (
    ERROR_LOG,
    MinitrainError,
    NonFiniteError,
    NothingTrained,
    TrainingInterrupted,
    one_line,
)
from minitrain.engine.registry import (
    CORE,
    ObserverFailed,
    check_hooks,
    guard_observers,
    make_plugin_manager,
    recorded_options,
    register_plugin,
    resolve,
)
from minitrain.engine.state import Limits, RunState, Steps, Stop, StopKind
from minitrain.engine.surface import Shared

NONFINITE_POLICIES = ("stop", "skip")


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
        plugins: Iterable[object] | None = None,
        run_dir: str | Path | None = None,
        config: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        plugin_manager: PluginManager | None = None,
        nonfinite_loss: str = "stop",
        metrics: Any = None,
        eval_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        limits: Limits | None = None,
        make_scheduler: Callable[[Steps], Any] | None = None,
    ):
        if scheduler is not None and make_scheduler is not None:
            raise MinitrainError("give a scheduler or make_scheduler, not both")
        if scheduler_interval not in ("epoch", "step"):
            raise MinitrainError(f"scheduler_interval must be 'epoch' or 'step', not {scheduler_interval!r}")
        if nonfinite_loss not in NONFINITE_POLICIES:
            raise MinitrainError(f"nonfinite_loss must be 'stop' or 'skip', not {nonfinite_loss!r}")
        self.module = model  # the recipe's model; `model` may become a wrapper of it (compile, DDP)
        self.model = model
        self.optimizer = optimizer
        seed = (config or {}).get("seed", 0)  # under torchrun, a plain DataLoader is sharded by rank
        self.train_loader = distributed.shard(train_loader, train=True, seed=seed)
        self.val_loader = distributed.shard(val_loader, train=False)
        self.epochs = epochs
        self.limits = limits or Limits()
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.make_scheduler = make_scheduler  # called with the run's Steps, once they are known (below)
        self.schedule_steps: Steps | None = None  # the Steps the schedule was sized for, if make_scheduler made it
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.config = config or {}
        self.class_names = class_names
        self.nonfinite_loss = nonfinite_loss
        from minitrain.engine.metrics import Validation, collection, is_classifier  # torchmetrics: seconds

        self.validation = Validation(
            collection(metrics),
            eval_loss_fn or loss_fn,
            is_classifier(loss_fn, class_names),
            len(class_names) if class_names else None,
        )
        self.pm = plugin_manager or make_plugin_manager()
        if not isinstance(self.pm, PluginManager):
            raise MinitrainError("plugin_manager must be one made by minitrain.engine.registry.make_plugin_manager()")
        if plugins is None:  # built by hand (a notebook): the plugins a run has by default, progress included
            plugins = [plugin for _, plugin in resolve([])] if plugin_manager is None else []
        for plugin in plugins:
            register_plugin(self.pm, plugin)
        check_hooks(self.pm)
        self.hook = self.pm.hook  # pluggy's hook callers, for calls outside the loop
        self.calls = self.pm.calls  # the same hooks, resolved once for the loop (minitrain.engine.dispatch)
        if make_scheduler is not None:  # loaders, limits and plugins (accumulate) are known now
            self._size_schedule(self.planned_steps())

        self.state = RunState(loss_sum=torch.zeros((), device=self.device))
        self.shared = Shared()  # what the step's plugins share (minitrain.engine.surface)
        self.replaying = False  # (minitrain.commands.replay's stand-in says True)
        self.resumed_from: str | None = None  # the checkpoint a resume loaded (minitrain.engine.checkpointing.resume)
        self.config_changes: dict[str, list[Any]] = {}  # what that resume changed (minitrain.commands.start)
        self.restart = 0  # which restart of torchrun's worker group this is (minitrain.commands.start)
        self.recorded_plugins: dict[str, dict[str, Any]] | None = None  # the run's plugins and options, as
        #                                 run.json and checkpoints record them (minitrain.commands.start)
        self.run_lock: Any = None  # the run directory's lock (minitrain.engine.lock), held until fit ends
        self.checked = False  # check() passed for the current settings
        self._skipped_in_fit = 0  # steps of this fit skipped (a fit of skipped steps alone trained nothing)
        self._running: int | None = None  # the number of the epoch in progress, EpochStart to EpochEnd
        self._finite_through = 0  # the last step at which the losses were known finite
        self._nonfinite: str | None = None  # what was found non-finite, once it was
        self._signal: str | None = None  # the signal that asked the run to stop

    # --- the loop ---------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse, before anything is written or trained, settings that cannot work: a finished
        run with nothing left to train, an empty training loader, and whatever each plugin's
        ``check`` hook refuses (a ``monitor`` naming a metric the run never produces, a folder that
        cannot be written). ``minitrain run`` calls it before it writes the run's files; ``fit``
        calls it when nobody has."""
        state, limits = self.state, self.limits
        if state.epoch >= self.epochs:
            raise MinitrainError(
                f"nothing to train: {state.epoch} of {self.epochs} epochs are done (to train on, "
                "raise epochs: --set epochs=N with --resume, or trainer.epochs)"
            )
        if limits.max_steps is not None and state.global_step >= limits.max_steps:
            raise MinitrainError(
                f"nothing to train: max_steps={limits.max_steps} are done (to train on, raise "
                "max_steps: --set max_steps=N with --resume)"
            )
        if _length(self.train_loader) == 0:
            raise MinitrainError(
                "the training loader has no batches (is the data set smaller than one batch with drop_last?)"
            )
        for name, limit, loader in (
            ("limit_train_batches", limits.train_batches, self.train_loader),
            ("limit_val_batches", limits.val_batches, self.val_loader),
        ):
            if isinstance(limit, float) and loader is not None and _length(loader) is None:
                raise MinitrainError(
                    f"{name} is a fraction, but the loader has no length to take it of; give a number of batches"
                )
        if self.calls.check:
            self.calls.check(self)
        self.checked = True

    def metric_names(self) -> list[str]:
        """The epoch metrics this run reports (in ``EpochEnd``), for plugins that check a
        ``monitor`` before the first epoch. Vector metrics add ``_<index>`` to their name."""
        names = ["train_loss", "lr", "epoch_time", "samples_per_s"]
        if self.nonfinite_loss == "skip":
            names.append("skipped_steps")
        return names + (self.validation.names() if self.val_loader is not None else [])

    def metric_mode(self, name: str) -> str | None:
        """``"min"`` or ``"max"``: which way is better for metric ``name``, where the run knows."""
        return "min" if name == "train_loss" else self.validation.mode(name)

    def fit(self) -> dict[str, float]:
        """Train from the current position to ``epochs``; return the last epoch's metrics.

        Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM, :class:`NonFiniteError` on a
        NaN/inf loss (policy ``stop``) and :class:`NothingTrained` when no step trained, once every
        plugin has seen the final event."""
        if not self.checked:
            self.check()
        self.checked = False  # a later fit() checks again
        self.state.stop, self._nonfinite, self._signal = None, None, None
        self._alone = distributed.world_size() == 1  # under torchrun, ranks stop together (_stopping)
        self._finite_through, first_step, self._skipped_in_fit = self.state.global_step, self.state.global_step, 0
        if self.nonfinite_loss == "skip" and distributed.world_size() > 1:
            raise MinitrainError(
                "nonfinite_loss=skip needs one process: under torchrun a rank that skips "
                "its backward would leave the others waiting for its gradients"
            )
        guard_observers(self.pm, self._observer_failed)
        with self._holding_run_dir():
            self._fit(first_step)
        return self.state.metrics

    def _fit(self, first_step: int) -> None:
        state = self.state
        with self._stop_on_signals(), self._stop_after(self.limits.max_time):
            try:
                self.calls.setup(self)
                self.validation.to(self.device)
                self.emit(
                    ev.FitStart(
                        epochs=self.epochs,
                        start_epoch=state.epoch + 1,
                        global_step=state.global_step,
                        steps_per_epoch=self.steps_per_epoch,
                        device=str(self.device),
                        run_dir=None if self.run_dir is None else str(self.run_dir),
                        config=self.config,
                        class_names=self.class_names,
                        resumed_from=self.resumed_from,
                        changed=self.config_changes,
                        restart=self.restart,
                    )
                )
                while state.epoch < self.epochs and not self._stopping():
                    self._train_epoch()
                if self._nonfinite is not None:
                    raise NonFiniteError(self._nonfinite)
                if self._signal is not None:
                    raise TrainingInterrupted(self._signal, graceful=True)
                if state.global_step > first_step and self._skipped_in_fit == state.global_step - first_step:
                    raise NothingTrained(
                        f"no step trained: all {state.global_step - first_step} steps had a "
                        "non-finite loss and were skipped (nonfinite_loss=skip)"
                    )
            except KeyboardInterrupt as exc:
                self._announce(
                    ev.Interrupted(
                        epoch=self.epoch_number, global_step=state.global_step, signal=getattr(exc, "signal", "SIGINT")
                    )
                )
                raise
            except Exception as exc:
                self._log_error("the run failed", exc)
                self._announce(
                    ev.ExceptionRaised(
                        epoch=self.epoch_number,
                        global_step=state.global_step,
                        error_type=type(exc).__name__,
                        message=str(exc),
                        traceback=traceback.format_exc(),
                    )
                )
                raise
        stop = state.stop
        self.emit(
            ev.FitEnd(
                epochs_completed=state.epoch,
                global_step=state.global_step,
                metrics=state.metrics,
                stop_reason=None if stop is None else stop.reason,
                stop_kind=None if stop is None else stop.kind.value,
            )
        )

    @property
    def epoch_number(self) -> int:
        """The epoch running, numbered from 1 as events are: from its EpochStart to its EpochEnd's
        hooks included (where ``state.epoch`` already counts it as done), and the next one between two."""
        return self._running or max(1, min(self.state.epoch + 1, self.epochs))

    def _train_epoch(self) -> None:
        state, calls = self.state, self.calls
        epoch, number = state.epoch, state.epoch + 1
        self._running = number
        skip = self.nonfinite_loss == "skip"
        batches = self._batches()
        self.emit(
            ev.EpochStart(
                epoch=number, global_step=state.global_step, steps=self.steps_per_epoch, start_batch=state.batch_idx
            )
        )
        self.model.train()
        started, samples = time.perf_counter(), 0
        for batch in batches:
            n = batch_size(batch)
            if calls.on_batch_start:  # a per-step event is built only if someone listens, and unvalidated
                calls.on_batch_start(
                    ev.BatchStart.trusted(
                        epoch=number, batch_idx=state.batch_idx, global_step=state.global_step, batch_size=n
                    ),
                    self,
                )
            state.in_step = True
            loss = calls.train_step(self, batch)
            if skip and not torch.isfinite(loss):  # policy "skip" only: a host sync per step
                state.skipped += 1
                self._skipped_in_fit += 1
                loss = loss.detach()
            else:
                calls.backward(self, loss)
                calls.optimizer_step(self)
                loss = loss.detach()
                state.loss_sum += loss  # NaN and inf propagate: the one read at epoch end shows them
            state.batch_idx += 1
            state.global_step += 1
            state.in_step = False
            samples += n
            if calls.on_batch_end:
                calls.on_batch_end(
                    ev.BatchEnd.trusted(
                        epoch=number,
                        batch_idx=state.batch_idx - 1,
                        global_step=state.global_step,
                        batch_size=n,
                        loss=loss,
                    ),
                    self,
                )
            if state.stop is not None and self._alone:
                return  # stopped mid-epoch: progress stays here so a checkpoint resumes from it

        if state.batch_idx == 0:
            raise NothingTrained(f"epoch {number}: the training loader yielded no batches")
        if state.global_step == self.limits.max_steps:  # the limit cut the loader short, or met the epoch's end
            self.request_stop(f"max_steps={self.limits.max_steps} reached", StopKind.MAX_STEPS)
            if state.batch_idx != self.steps_per_epoch:
                return  # mid-epoch: progress stays here so a checkpoint resumes from it
        elapsed = time.perf_counter() - started
        ranks = distributed.world_size()  # every rank ran as many batches as this one
        loss_sum = distributed.sum_over_ranks(state.loss_sum).item()  # the epoch's one read
        if not math.isfinite(loss_sum):
            self._nonfinite = self._nonfinite_loss(loss_sum)
            raise NonFiniteError(self._nonfinite)
        self._finite_through = state.global_step
        metrics = {
            "train_loss": loss_sum / max((state.batch_idx - state.skipped) * ranks, 1),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "epoch_time": elapsed,
            "samples_per_s": samples * ranks / elapsed if elapsed > 0 else 0.0,
        }
        if skip:
            metrics["skipped_steps"] = float(state.skipped)
            if state.skipped:
                warnings.warn(
                    f"epoch {number}: skipped {state.skipped} step(s) with a non-finite loss (nonfinite_loss=skip)",
                    stacklevel=2,
                )
        if self.val_loader is not None:
            metrics.update(self.validate(number))
        metrics |= {name: derive(metrics) for name, derive in self.shared.epoch_metrics.items()}
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        state.epoch, state.batch_idx, state.metrics, state.skipped = epoch + 1, 0, metrics, 0
        state.loss_sum.zero_()
        self.emit(ev.EpochEnd(epoch=number, global_step=state.global_step, metrics=metrics))
        self._running = None

    @torch.no_grad()
    def validate(self, epoch: int | None = None) -> dict[str, float]:
        """The validation loss and the recipe's metrics over ``val_loader`` (see
        :mod:`minitrain.engine.metrics`), read from the device once. Under DDP each rank evaluates its
        shard and torchmetrics adds the states up over ranks, so every rank (and every plugin)
        sees the figures of the whole validation set. ``epoch`` labels the events (default: the
        current one)."""
        emit, epoch, step = self.emit, epoch or self.epoch_number, self.state.global_step
        emit(ev.ValidationStart(epoch=epoch, global_step=step))
        self.model.eval()
        validation = self.validation.to(self.device)
        validation.reset()
        batches = 0
        for batch in itertools.islice(self.val_loader, _limit(_length(self.val_loader), self.limits.val_batches)):
            outputs, targets = self.calls.eval_step(self, batch)
            validation.update(outputs, targets)
            batches += 1
        self.model.train()
        if batches == 0:
            raise MinitrainError("the validation loader yielded no batches")
        metrics, confusion = validation.results()
        emit(ev.ValidationEnd(epoch=epoch, global_step=step, metrics=metrics, confusion=confusion))
        return metrics

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches an epoch trains: the loader's length, or ``limit_train_batches`` of it."""
        return _limit(_length(self.train_loader), self.limits.train_batches)

    def planned_steps(self) -> Steps:
        """The optimizer steps this run makes from its first step to its end: batches per epoch
        after ``limit_train_batches``, ``epochs`` of them or fewer under ``max_steps``, and one
        optimizer step per ``batches_per_step`` batches where a plugin (``accumulate``) says so."""
        batches = self.steps_per_epoch
        if batches is None:
            raise MinitrainError(
                "the schedule cannot be sized: the training loader has no length "
                "(give limit_train_batches as a number of batches)"
            )
        every = max([1, *(getattr(p, "batches_per_step", 1) for p in self.pm.get_plugins())])
        trained = self.epochs * batches
        if self.limits.max_steps is not None:
            trained = min(trained, self.limits.max_steps)
        full, rest = divmod(trained, batches)
        per_epoch = -(-batches // every)  # an epoch's last batch steps, its window full or not
        return Steps(per_epoch=per_epoch, total=full * per_epoch + rest // every, epochs=full + (rest > 0))

    def _size_schedule(self, steps: Steps) -> None:
        assert self.make_scheduler is not None
        try:
            scheduler = self.make_scheduler(steps)
        except MinitrainError:
            raise
        except Exception as exc:  # the recipe's code: one line, as for an exception in build()
            raise MinitrainError(f"make_scheduler({steps}) failed: {type(exc).__name__}: {exc}") from exc
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise MinitrainError(f"make_scheduler returned a {type(scheduler).__name__}, which has no step()")
        self.scheduler, self.schedule_steps = scheduler, steps

    def _batches(self) -> Iterable:
        """This epoch's batches from `batch_idx` on, up to the epoch's limit and ``max_steps``. A
        loader with ``set_position(epoch, batch_idx)`` starts there without loading earlier
        batches; any other loader is fast-forwarded."""
        loader, stop, state, max_steps = self.train_loader, self.steps_per_epoch, self.state, self.limits.max_steps
        if max_steps is not None:
            stop = min(stop or max_steps, state.batch_idx + max_steps - state.global_step)
        if stop == _length(loader):
            stop = None  # the whole epoch: the loader alone
        if hasattr(loader, "set_position"):
            loader.set_position(state.epoch, state.batch_idx)
            return loader if stop is None else itertools.islice(loader, stop - state.batch_idx)
        sampler: Any = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        return itertools.islice(loader, state.batch_idx, stop) if state.batch_idx or stop is not None else loader

    # --- what plugins use (minitrain.engine.surface) ------------------------------------------

    def emit(self, event: ev.Event) -> None:
        """Deliver ``event`` to every implementation of its hook, then of ``on_event`` (custom
        events included)."""
        try:
            notify = getattr(self.calls, event.hook)
        except AttributeError:  # no spec: an optionalhook implementation alone is not one
            raise MinitrainError(
                f"event {type(event).__name__} has no hook {event.hook!r}: register its hookspec "
                "(a plugin's `hookspecs` attribute) before emitting it"
            ) from None
        if notify is not None:
            notify(event, self)

    def request_stop(self, reason: str, kind: StopKind = StopKind.REQUESTED) -> None:
        """Ask the loop to stop after the current batch (early stopping, signals, limits); under
        torchrun, at the end of the current epoch, on every rank (see :meth:`_stopping`)."""
        self.state.stop = Stop(kind, reason)

    def plugin_options(self) -> dict[str, dict[str, Any]]:
        """The run's plugins by name, with their options: as recorded when ``minitrain run``
        planned it, else (a trainer built by hand) those registered."""
        if self.recorded_plugins is not None:
            return dict(self.recorded_plugins)
        return {
            name: recorded_options(plugin)
            for name, plugin in self.pm.list_name_plugin()
            if plugin is not None and name != CORE
        }

    def remove_plugin(self, plugin: object) -> None:
        """Unregister ``plugin``: the loop makes no more calls to it."""
        self.pm.unregister(plugin)

    def _stopping(self) -> bool:
        """Whether the run ends here, before another epoch. Under torchrun a rank that stopped
        alone would leave the others waiting at their next collective, so the ranks agree here, at
        every epoch's end: a stop that any of them requested ends the run on all of them."""
        if not self._alone:
            self.state.stop = next((s for s in distributed.gather(self.state.stop) if s is not None), None)
        return self.state.stop is not None

    def check_finite(self, weights: bool = False) -> bool:
        """Whether every training loss of this epoch so far was finite (and, with ``weights``, every
        weight of the model is). NaN and inf propagate into the epoch's device-side loss sum, so
        this reads one number, but reading it is a host-device sync: call it where you synchronise
        anyway, as the checkpoint plugin does before each save. A non-finite value asks the loop to
        stop at the next step boundary, and ``fit`` then raises :class:`NonFiniteError`."""
        if self._nonfinite is None:
            loss_sum = self.state.loss_sum.item()
            if not math.isfinite(loss_sum):
                self._nonfinite = self._nonfinite_loss(loss_sum)
            elif weights and (bad := _nonfinite_tensors(self.module)):
                self._nonfinite = (
                    f"non-finite weights after step {self.state.global_step} ({', '.join(bad)}); "
                    "stopped before saving them"
                )
            else:
                self._finite_through = self.state.global_step
            if self._nonfinite is not None:
                self.request_stop("non-finite values", StopKind.NONFINITE)
        return self._nonfinite is None

    def _nonfinite_loss(self, loss_sum: float) -> str:
        first, last = self._finite_through + 1, self.state.global_step
        steps = f"step {last}" if first >= last else f"steps {first}-{last}"
        return (
            f"non-finite training loss ({loss_sum}) in epoch {self.state.epoch + 1}, {steps}; stopped "
            "(--set nonfinite_loss=skip skips such steps instead)"
        )

    # --- faults -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _holding_run_dir(self):
        """Hold the run directory's lock while fitting, and let go of it when fit ends, however it
        ends: another start may then use the directory (``--resume auto``). A later ``fit()``
        takes it again."""
        if self.run_lock is None:
            yield
            return
        self.run_lock.acquire()
        try:
            yield
        finally:
            self.run_lock.release()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While fit runs, SIGINT and SIGTERM ask the loop to stop at the next step boundary (so a
        checkpoint written on the way out resumes exactly); a second one interrupts at once. Only
        the main thread may set handlers, and under torchrun every rank would have to stop at the
        same step, so there signals keep whatever behaviour they had."""
        if threading.current_thread() is not threading.main_thread() or distributed.world_size() > 1:
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    @contextlib.contextmanager
    def _stop_after(self, seconds: float | None):
        """Ask the loop to stop once ``seconds`` have passed (``max_time``), from a timer thread:
        the loop already looks at ``state.stop`` after every step, so the limit costs nothing
        per step. Under torchrun the stop, like any, takes effect at the end of the epoch."""
        if seconds is None:
            yield
            return
        hours, rest = divmod(round(seconds), 3600)
        reason = f"max_time={hours}:{rest // 60:02}:{rest % 60:02} reached"
        timer = threading.Timer(seconds, self.request_stop, [reason, StopKind.MAX_TIME])
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            raise TrainingInterrupted(name, graceful=False)
        self._signal = name
        self.request_stop(f"{name} received", StopKind.SIGNAL)

    def _observer_failed(self, plugin: str, hook: str, exc: Exception) -> None:
        """An observer raised: take it out of the run, once, and say so. The other plugins still
        get the event it failed on (a call in progress keeps the implementations it began with) and
        every later one."""
        if self.pm.get_plugin(plugin) is None:
            return
        self.pm.unregister(name=plugin)
        where = self._log_error(f"plugin {plugin!r} failed in {hook} and was disabled", exc)
        warnings.warn(
            f"plugin {plugin!r} failed in {hook} ({one_line(exc)}) and is disabled for the rest of "
            f"the run; training goes on{where}",
            ObserverFailed,
            stacklevel=2,
        )

    def _announce(self, event: ev.Event) -> None:
        """Deliver a final event (ExceptionRaised, Interrupted) to every plugin, each on its own,
        so that one failing again cannot keep the others (a final checkpoint) from it, nor hide
        the error that is ending the run: its failure is reported as a warning."""
        for hook in (event.hook, "on_event"):
            for impl in reversed(getattr(self.hook, hook).get_hookimpls()):
                others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
                try:
                    self.pm.subset_hook_caller(hook, others)(event=event, trainer=self)
                except Exception as exc:
                    name = self.pm.get_name(impl.plugin)
                    where = self._log_error(f"plugin {name!r} failed in {hook} while the run was stopping", exc)
                    warnings.warn(
                        f"plugin {name!r} failed in {hook} while the run was stopping ({one_line(exc)}){where}",
                        stacklevel=2,
                    )

    def _log_error(self, title: str, exc: BaseException) -> str:
        """Append ``exc``'s traceback to the run's error log; returns `` (traceback in PATH)``, or
        nothing when there is no run directory or it cannot be written."""
        if self.run_dir is None:
            return ""
        path = self.run_dir / ERROR_LOG
        try:
            with open(path, "a", encoding="utf-8") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} step {self.state.global_step}: {title}\n")
                log.write("".join(traceback.format_exception(exc)))
        except OSError:
            return ""
        return f" (traceback in {path})"

    def state_dict(self, gather: bool = False) -> dict[str, Any]:
        """Everything needed to continue this run exactly: weights, optimizer, schedule, progress,
        random generators and the state of every plugin that keeps some: this rank's (the weights,
        optimizer and schedule are every rank's under DDP).

        ``gather=True`` also holds, under torchrun, each rank's own partial loss sum of the epoch and
        random generators, in rank order (``"ranks"``), so that a resume with as many processes
        restores every rank as it was. That is a collective: every rank must call it, at the same
        point (the ``checkpoint`` plugin does, at its save points). With one process it adds nothing."""
        run = self.state
        state: dict[str, Any] = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {
                "epoch": run.epoch,
                "batch_idx": run.batch_idx,
                "global_step": run.global_step,
                "loss_sum": run.loss_sum.detach().cpu(),
                "skipped": run.skipped,
                "metrics": dict(run.metrics),
            },
            "rng": get_rng_state(),
            "plugins": {name: plugin.state_dict() for name, plugin in self._stateful_plugins()},
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.schedule_steps is not None:  # what a resume sizes the schedule from (load_state_dict)
            state["schedule_steps"] = dataclasses.asdict(self.schedule_steps)
        if gather and distributed.world_size() > 1:
            state["ranks"] = distributed.gather({"loss_sum": state["progress"]["loss_sum"], "rng": state["rng"]})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on where ``state`` left off. A schedule that ``make_scheduler`` made keeps the size
        the run started with, so that its shape does not change at the resume point: it is made
        again from the saved ``Steps`` if this trainer's differ (``minitrain run`` refuses a
        ``--set`` that would change them, see docs/runs-and-resume.md)."""
        saved_steps = state.get("schedule_steps")
        if self.make_scheduler is not None and saved_steps is not None:
            steps, now = Steps(**saved_steps), self.schedule_steps
            if steps != now:  # before the optimizer's state: making a schedule sets the lr
                if distributed.is_main() and now is not None:
                    warnings.warn(
                        f"the learning-rate schedule keeps the size it had when the run started, {steps.total} "
                        f"optimizer steps ({now.total} with this trainer's settings)",
                        stacklevel=2,
                    )
                self._size_schedule(steps)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        progress, run = state["progress"], self.state
        run.epoch, run.batch_idx, run.global_step = progress["epoch"], progress["batch_idx"], progress["global_step"]
        run.metrics = dict(progress["metrics"])
        own = _own_entry(state.get("ranks"))  # this rank's loss sum and generators, if saved by as many ranks
        run.loss_sum = (own or progress)["loss_sum"].to(self.device)
        run.skipped = progress.get("skipped", 0)
        set_rng_state((own or state)["rng"])
        saved = state.get("plugins", {})
        for name, plugin in self._stateful_plugins():
            if name in saved:
                plugin.load_state_dict(saved[name])

    def _stateful_plugins(self) -> list[tuple[str, Any]]:
        return [
            (name, plugin)
            for name, plugin in self.pm.list_name_plugin()
            if callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None))
        ]


def _own_entry(ranks: Any) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's per-rank state (``state_dict(gather=True)``), if the
    checkpoint was written by as many ranks as run now; else None (rank 0's state is used)."""
    if isinstance(ranks, list) and len(ranks) == distributed.world_size() > 1:
        return ranks[distributed.rank()]
    return None


def _nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point tensors holding a NaN or inf (one sync for them all)."""
    tensors = {name: t for name, t in module.state_dict().items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist() if tensors else []
    return [name for name, ok in zip(tensors, finite) if not ok]


def _limit(length: int | None, limit: int | float | None) -> int | None:
    """Batches to take of a loader of ``length`` (None: unknown): all, a number, or a fraction."""
    if limit is None:
        return length
    if isinstance(limit, float):
        assert length is not None  # check() refuses a fraction of a loader without a length
        return max(1, int(length * limit))
    return limit if length is None else min(length, limit)


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
