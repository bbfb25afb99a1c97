"""Checkpointing: ``last.pt`` to resume from, ``best.pt`` and the top-k by a metric, written
atomically, restored exactly (weights, optimizer, schedule, position within the epoch, random
generators and every stateful plugin) by ``minitrain run --resume PATH|auto``. On in every run
(``--no-plugin checkpoint`` turns it off), so that every run can be resumed and exported.

    minitrain run recipe.py --plugin checkpoint:every_steps=500,monitor=val_acc,top_k=3
    minitrain run recipe.py --run-dir runs/that-run --resume auto

Files go to ``<run dir>/checkpoints/`` (option ``dir``); a trainer without a run directory (built
by hand in a notebook) is not checkpointed:

* ``last.pt``, the newest state: at the end of every ``every``-th epoch, every ``every_steps``
  optimizer steps (mid-epoch too: a resume continues from the next batch, replaying none), at
  the end of fit, and, in one process, when the run fails or is interrupted *between* two
  batches. A failure inside a batch (``trainer.state.in_step``: from its ``train_step`` until its
  progress is counted) leaves the previous ``last.pt``, as a half-applied step cannot be resumed
  exactly.

No file is ever written from a state reached through a NaN or infinite loss, or holding
non-finite weights: before each save the plugin asks ``trainer.check_finite(weights=True)``
(saving synchronises with the device anyway), and on a non-finite value writes nothing and the
trainer stops the run, so ``last.pt`` keeps the last finite state. The plugin is ``critical``:
if it fails, the run stops (docs/plugins.md, "Faults"). Temporary files left by a process killed
in the middle of a save are removed when the next run starts.
* ``best.pt``, the best ``monitor`` value seen at a saving epoch end (not with ``top_k=0``);
* for ``top_k`` above 1, also the k best as ``epoch=E-step=S-<monitor>=V.pt``, where ``E`` counts
  completed epochs. The ranking is part of the plugin's checkpointed state, so after a resume it
  goes on deleting exactly the files that drop out of the k best.

A run that starts from an earlier step than its folder's checkpoints reached (resumed from an
older checkpoint, or started afresh in a used run directory) redoes those steps. Their files
are moved out of the way, into ``set-aside-after-step-S/`` in the folder, with a warning:
left in place they would crowd the ranking, and ``--resume auto``, which takes the newest file,
would go back to the abandoned ``last.pt`` if this run stopped before its first save.

The file format, atomic writing and safe loading are :mod:`minitrain.engine.checkpointing`.

**Under torchrun** the plugin runs on every rank, and every rank reaches the same save points
(they depend only on the step, the epoch and the epoch metrics, which the ranks share). There the
ranks agree that their state is finite, each contributes its own partial loss sum and random
generators (``trainer.state_dict(gather=True)``), rank 0 alone writes the files and announces
them, and the others wait until it has (a barrier). So a checkpoint holds every rank's state,
and when torchrun restarts the group after a failure, no rank has run ahead of the newest
complete file. These are the only collectives the plugin adds, at save points only. A run that
fails or is interrupted between save points writes nothing more: the ranks would have to meet to
save together, and a failed rank cannot. ``--resume`` loads the file on every rank, and the
weights in it are the plain model's, whatever the number of processes.

**The worked example of a plugin-defined event.** Each file written is announced as a
:class:`CheckpointSaved` event on a hook this plugin adds, ``on_checkpoint_saved(event,
trainer)``. Any plugin can implement it, e.g. to upload checkpoints as they appear::

    class Uploader:
        @minitrain.hookimpl(optionalhook=True)  # without it, a run without checkpoint refuses
        def on_checkpoint_saved(self, event, trainer):  # this plugin (an unknown hook)
            upload(event.path)

Declaring your own event takes the same four steps as here:

1. subclass :class:`minitrain.engine.events.Event`; the class name gives the hook name
   (``CheckpointSaved`` -> ``on_checkpoint_saved``), and the fields are validated, serialise to
   one JSON line and have a JSON Schema like any core event's;
2. write its ``@minitrain.hookspec`` in a class or module (:class:`CheckpointHookspecs`);
3. publish that as the plugin's ``hookspecs`` attribute: the plugin manager adds the spec when
   it registers the plugin, so implementations elsewhere are checked against it;
4. ``trainer.emit(event)``: every implementation of the hook runs, then ``on_event`` (which is
   how the event reaches ``events.jsonl`` without the JSONL plugin knowing about it).

Because the event is emitted from inside the ``on_epoch_end``/``on_fit_end`` hooks, its line in
``events.jsonl`` comes just before the line of the event that triggered the save.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from minitrain import PluginConfig, hookimpl, hookspec
from minitrain.engine import checkpointing, distributed
from minitrain.engine.events import Count, Event
from minitrain.engine.files import check_writable
from minitrain_plugins._metric import Mode, improves, resolve_monitor

Kind = Literal["last", "best", "topk"]
"""Which of the plugin's files a checkpoint is."""


class CheckpointSaved(Event):
    """A checkpoint file was written (and is complete on disk)."""

    path: str = Field(description="the file written")
    kind: Kind = Field(description="which of the plugin's files it is")
    epoch: Count = Field(description="epochs completed when saved (with batch_idx: where a resume starts)")
    batch_idx: Count = Field(description="batches of the next epoch already done (0 at an epoch end)")
    global_step: Count
    monitor: str | None = Field(default=None, description="the metric ranking best/top-k files, if measured")
    metric: float | None = Field(default=None, description="its value at this save, if measured")


class CheckpointHookspecs:
    """The hook this plugin adds. pluggy reads the marker; the body is never called."""

    @staticmethod
    @hookspec
    def on_checkpoint_saved(event: CheckpointSaved, trainer) -> None:
        """After each checkpoint file is written (last.pt, best.pt or a top-k file)."""


class Checkpoint:
    enabled_by_default = True  # every run can be resumed and exported; --no-plugin checkpoint turns it off
    role = "critical"  # a run that cannot save must not go on as if it could
    changes_training = False  # so a resume may change its options, or leave it out
    hookspecs = CheckpointHookspecs

    class Config(PluginConfig):
        dir: str = Field(checkpointing.DEFAULT_DIR, description="checkpoint folder; relative to the run dir")
        every: int = Field(1, ge=0, description="save at the end of every N-th epoch (0: never)")
        every_steps: int = Field(0, ge=0, description="also save last.pt every N optimizer steps (0: never)")
        monitor: str | None = Field(
            None,
            description="epoch metric that ranks best.pt and the top-k files "
            "(default: val_loss, or train_loss in a run without validation)",
        )
        mode: Mode = Field("auto", description="min or max is better; auto: max for accuracies, else min")
        top_k: int = Field(1, ge=0, description="keep the k best checkpoints (0: none, no best.pt)")
        save_last: bool = Field(True, description="keep last.pt, the newest state, for resuming")

        @model_validator(mode="after")
        def _last_for_steps(self):
            if self.every_steps and not self.save_last:
                raise ValueError("every_steps saves last.pt, so it needs save_last=true")
            return self

    def __init__(self, config: Config):
        self.config = config
        self.monitor, self.mode = config.monitor, config.mode
        self.top: list[dict] = []  # best first: {"metric", "epoch", "global_step", "file"}
        self.folder: Path | None = None  # set at fit start; None: the trainer has no run directory to write to
        self.last_saved: tuple[int, int, int] | None = None  # (epoch, batch_idx, step) in last.pt
        if not config.every_steps:
            # not a hook implementation then: no call at every step (mypy: shadowing a method is deliberate)
            self.on_batch_end = None  # type: ignore[method-assign, assignment]

    def checkpoint_dir(self, run_dir: str | Path) -> Path:
        """Where this plugin writes for ``run_dir`` (``--resume auto`` looks here)."""
        return Path(run_dir) / self.config.dir

    # --- plugin state, carried in the checkpoints themselves ---------------------------------

    def state_dict(self) -> dict:
        return {"top": [dict(entry) for entry in self.top]}

    def load_state_dict(self, state: dict) -> None:
        self.top = [dict(entry) for entry in state["top"]]

    # --- when to save ------------------------------------------------------------------------

    @hookimpl
    def check(self, trainer) -> None:
        if self.config.top_k:
            self.monitor, self.mode = resolve_monitor("checkpoint", self.config.monitor, self.config.mode, trainer)
        if distributed.is_main() and trainer.run_dir is not None:  # the rank that writes
            check_writable(self.checkpoint_dir(trainer.run_dir), "checkpoint folder")

    @hookimpl
    def on_fit_start(self, event) -> None:
        self.folder = None if event.run_dir is None else self.checkpoint_dir(event.run_dir)
        if self.folder is not None and distributed.is_main():
            checkpointing.remove_temporaries(self.folder)
            self._set_aside_later_than(event.global_step)

    def _set_aside_later_than(self, step: int) -> None:
        """Move the checkpoints of steps after ``step``, which this run redoes, to a subfolder."""
        folder = self.folder
        assert folder is not None  # called only with a folder to write to
        later = [
            path
            for path in sorted(folder.glob("*.pt"))
            if (head := checkpointing.read_header(path)) is not None and head.get("global_step", 0) > step
        ]
        if not later:
            return
        aside, tries = folder / f"set-aside-after-step-{step}", 1
        while aside.exists():  # set aside at this step before: keep that too
            tries += 1
            aside = folder / f"set-aside-after-step-{step}-{tries}"
        aside.mkdir()
        for path in later:
            os.replace(path, aside / path.name)
        warnings.warn(
            f"checkpoint: this run starts at step {step} and redoes later steps; moved their "
            f"{len(later)} checkpoint(s) ({', '.join(p.name for p in later)}) to {aside}",
            stacklevel=2,
        )

    @hookimpl(trylast=True)  # after other plugins, so their state in the file is this step's
    def on_batch_end(self, event, trainer) -> None:
        if (
            self.folder is not None
            and self.config.every_steps
            and event.global_step % self.config.every_steps == 0
            and self._finite(trainer)
        ):
            self._save(trainer, {"last": "last.pt"})

    @hookimpl(trylast=True)  # after early stopping & co. have updated their state for this epoch
    def on_epoch_end(self, event, trainer) -> None:
        due = self.folder is not None and self.config.every and trainer.state.epoch % self.config.every == 0
        if not due or not self._finite(trainer):
            return  # (a non-finite state enters no ranking either)
        assert self.folder is not None  # implied by due
        files: dict[Kind, str] = {}
        dropped: list[dict] = []
        metric = event.metrics.get(self.monitor) if self.config.top_k else None
        if metric is not None:  # (an epoch without validation enters no ranking)
            files, dropped = self._rank(metric, trainer)
        if self.config.save_last:
            files["last"] = "last.pt"
        self._save(trainer, files, metric)
        for entry in dropped if distributed.is_main() else ():
            (self.folder / entry["file"]).unlink(missing_ok=True)

    @hookimpl(trylast=True)
    def on_fit_end(self, trainer) -> None:
        if (
            self.folder is not None
            and self.config.save_last
            and self.last_saved != _position(trainer)
            and self._finite(trainer)
        ):
            self._save(trainer, {"last": "last.pt"})

    @hookimpl(trylast=True)
    def on_exception_raised(self, trainer) -> None:
        self._save_on_failure(trainer)

    @hookimpl(trylast=True)
    def on_interrupted(self, trainer) -> None:
        self._save_on_failure(trainer)

    def _save_on_failure(self, trainer) -> None:
        """Keep the progress made since the last save, if the state is whole; never let a failed
        save here hide the error that is ending the run."""
        if self.folder is None or not self.config.save_last or self.last_saved == _position(trainer):
            return
        held = f"step {self.last_saved[2]}" if self.last_saved else "no state from this run"
        if distributed.world_size() > 1:
            if distributed.is_main():
                warnings.warn(
                    f"checkpoint: under torchrun a stopping run saves nothing between save points (the "
                    f"ranks cannot meet to save together); last.pt holds {held}",
                    stacklevel=2,
                )
            return
        if trainer.state.in_step:
            warnings.warn(
                f"checkpoint: the run stopped inside a batch, whose half-applied state is not "
                f"saved; last.pt holds {held}",
                stacklevel=2,
            )
            return
        if not trainer.check_finite(weights=True):
            warnings.warn(f"checkpoint: not saving a state with non-finite values; last.pt holds {held}", stacklevel=2)
            return
        try:
            self._save(trainer, {"last": "last.pt"})
        except Exception as exc:  # the run's own error is the one to report
            warnings.warn(f"checkpoint: {exc}", stacklevel=2)

    # --- what to save ------------------------------------------------------------------------

    def _rank(self, metric: float, trainer) -> tuple[dict[Kind, str], list[dict]]:
        """Enter this epoch in the best-k list if it qualifies. Returns the files to write for it
        and the entries it pushed out (whose files go once the new ones are safely written)."""
        worst = self.top[-1]["metric"] if len(self.top) == self.config.top_k else None
        if not improves(metric, worst, self.mode):
            return {}, []
        assert self.monitor is not None  # the metric ranked is event.metrics[self.monitor]
        name = re.sub(r"[^\w.-]", "_", self.monitor)
        entry = {
            "metric": metric,
            "epoch": trainer.state.epoch,
            "global_step": trainer.state.global_step,
            "file": f"epoch={trainer.state.epoch}-step={trainer.state.global_step}-{name}={metric:.4f}.pt",
        }
        ranked = sorted([*self.top, entry], key=lambda e: e["metric"], reverse=self.mode == "max")
        self.top, dropped = ranked[: self.config.top_k], ranked[self.config.top_k :]
        files: dict[Kind, str] = {"topk": entry["file"]} if self.config.top_k > 1 else {}
        if ranked[0] is entry:
            files["best"] = "best.pt"
        return files, dropped if self.config.top_k > 1 else []  # top-1 keeps best.pt alone, no copy

    def _finite(self, trainer) -> bool:
        """Whether the state may be saved: every loss of the epoch so far and every weight finite
        (``trainer.check_finite``; a non-finite one stops the run), on every rank alike."""
        finite = trainer.check_finite(weights=True)
        return all(distributed.gather(finite)) if distributed.world_size() > 1 else finite

    def _save(self, trainer, files: dict[Kind, str], metric: float | None = None) -> None:
        """Write one trainer state, finite (see :meth:`_finite`), to each of ``files`` (kind -> file
        name), announcing each. Under torchrun every rank calls this at the same point: the state
        holds each rank's own part, rank 0 writes, and the others wait until it has."""
        if not files:
            return
        assert self.folder is not None  # every caller checks it
        state = trainer.state_dict(gather=True)
        monitor = self.monitor if metric is not None else None
        for kind, name in files.items():
            path = self.folder / name
            if distributed.is_main():
                checkpointing.save(
                    path, checkpointing.header(trainer, kind=kind, monitor=monitor, metric=metric), state
                )
            if kind == "last":
                self.last_saved = _position(trainer)
            if distributed.is_main():
                trainer.emit(
                    CheckpointSaved(
                        path=str(path),
                        kind=kind,
                        epoch=trainer.state.epoch,
                        batch_idx=trainer.state.batch_idx,
                        global_step=trainer.state.global_step,
                        monitor=monitor,
                        metric=metric,
                    )
                )
        distributed.barrier()  # no rank runs ahead of the file it would restart from


def _position(trainer) -> tuple[int, int, int]:
    return trainer.state.epoch, trainer.state.batch_idx, trainer.state.global_step
