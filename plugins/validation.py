"""Validation every N epochs instead of after every epoch; the last epoch is always validated.

For recipes whose evaluation is costly next to an epoch of training: a seconds-long speedrun
whose test-time-augmented evaluation takes as long as several epochs should evaluate once, at
the end. The plugin hides the validation loader from the trainer in the epochs it skips and
gives it back when the fit ends, however it ends.
"""

from __future__ import annotations

from pydantic import Field

from minitrain import PluginConfig, hookimpl


class ValidationSchedule:
    enabled_by_default = False
    role = "critical"  # it decides what is validated

    class Config(PluginConfig):
        every: int = Field(1, ge=0, description="epochs between validations; 0: after the last epoch only")

    def __init__(self, config: Config):
        self.config = config
        self.loader = None

    @hookimpl(tryfirst=True)
    def on_epoch_start(self, event, trainer) -> None:
        if self.loader is None:
            self.loader = trainer.val_loader
        every, done = self.config.every, event.epoch
        due = done >= trainer.epochs or (every > 0 and done % every == 0)
        trainer.val_loader = self.loader if due else None

    @hookimpl
    def on_fit_end(self, trainer) -> None:
        self._restore(trainer)

    @hookimpl
    def on_exception_raised(self, trainer) -> None:
        self._restore(trainer)

    @hookimpl
    def on_interrupted(self, trainer) -> None:
        self._restore(trainer)

    def _restore(self, trainer) -> None:
        if self.loader is not None:
            trainer.val_loader = self.loader
