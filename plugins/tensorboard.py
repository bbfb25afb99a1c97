"""TensorBoard scalars through PyTorch's own ``SummaryWriter``, into ``<run_dir>/tensorboard``.

``tensorboard --logdir runs/`` then shows every run side by side. Written:

* ``train/loss``: the batch loss every ``log_every`` steps, and beside it every per-step value
  plugins publish in ``trainer.shared.step_metrics`` (``train/grad_norm`` with ``clip``). Reading them is a
  host-device sync, so it happens at most once per ``log_every`` steps, never every step;
* ``epoch/<name>`` for each epoch metric (train_loss, val_loss, val_acc, lr, samples_per_s, ...);
* the run's config, as text, and where each resume or restart went on from (``resumes``): the
  curves of steps done again show both attempts at those steps.

All against the global step, so per-step and per-epoch curves share one x axis. It reads only
events, so ``minitrain replay RUN --plugin tensorboard`` writes the same files after the fact. A
replay refuses a folder that already holds event files (the run wrote them live, or an earlier
replay did): TensorBoard would show every point twice. ``subdir`` names another folder for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field
from torch.utils.tensorboard import SummaryWriter

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import MinitrainError
from minitrain.engine.files import check_writable

EVENT_FILES = "events.out.tfevents.*"


class TensorBoard:
    enabled_by_default = False
    role = "observer"
    main_process_only = True  # under torchrun, on rank 0 only (see docs/plugins.md)

    class Config(PluginConfig):
        log_every: int = Field(50, ge=1, description="steps between logged batch losses")
        subdir: str = Field("tensorboard", description="folder under the run directory")

    def __init__(self, config: Config):
        self.config = config
        self.writer: SummaryWriter | None = None
        self.fits = 0  # FitStarts seen: a replayed resumed run has one per start

    @hookimpl
    def check(self, trainer) -> None:
        if trainer.run_dir is not None:
            check_writable(Path(trainer.run_dir) / self.config.subdir, "tensorboard folder")

    @hookimpl(tryfirst=True)  # a replay it refuses starts no other plugin
    def on_fit_start(self, event, trainer) -> None:
        self.fits += 1
        if event.run_dir is None:
            return
        folder = Path(event.run_dir) / self.config.subdir
        if trainer.replaying and self.fits == 1 and next(folder.glob(EVENT_FILES), None) is not None:
            raise MinitrainError(
                f"tensorboard: {folder} already holds TensorBoard event files (the run wrote them live, or "
                "an earlier replay did), and a replay there would show every point twice; replay into "
                f"another folder under the run directory: --plugin tensorboard:subdir={self.config.subdir}-replay"
            )
        self.writer = SummaryWriter(log_dir=str(folder))
        self.writer.add_text("config", f"```\n{json.dumps(event.config, indent=2)}\n```", event.global_step)
        if event.resumed_from or event.restart:
            where = f"resumed from {event.resumed_from}" if event.resumed_from else "started afresh (no checkpoint yet)"
            self.writer.add_text(
                "resumes",
                f"{f'restart {event.restart}: ' if event.restart else ''}{where} at step {event.global_step}",
                event.global_step,
            )

    @hookimpl
    def on_batch_end(self, event, trainer) -> None:
        if self.writer is not None and event.global_step % self.config.log_every == 0:
            self.writer.add_scalar("train/loss", float(event.loss), event.global_step)
            for name, value in trainer.shared.step_metrics.items():  # grad_norm, ... (empty in a replay)
                self.writer.add_scalar(f"train/{name}", float(value), event.global_step)

    @hookimpl
    def on_epoch_end(self, event) -> None:
        if self.writer is None:
            return
        for name, value in event.metrics.items():
            self.writer.add_scalar(f"epoch/{name}", value, event.global_step)
        self.writer.flush()

    @hookimpl
    def on_fit_end(self) -> None:
        self._close()

    @hookimpl
    def on_exception_raised(self) -> None:
        self._close()

    @hookimpl
    def on_interrupted(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
