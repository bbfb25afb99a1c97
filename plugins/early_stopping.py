"""Early stopping: end the run when an epoch metric has stopped improving.

    minitrain run recipe.py --plugin early_stopping:monitor=val_acc,patience=5

After every epoch it compares ``monitor`` with the best value so far; after ``patience`` epochs
in a row without an improvement larger than ``min_delta`` it calls ``trainer.request_stop``, so
the run ends there with ``FitEnd.stop_reason`` saying why. The best value and the count of
epochs without improvement travel in checkpoints, so a resumed run stops when the uninterrupted
one would have, and a run it ended stays ended when resumed (unless resumed with a larger
``patience``).
"""

from __future__ import annotations

from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain_plugins._metric import Mode, improves, resolve_monitor


class EarlyStopping:
    enabled_by_default = False
    role = "critical"  # it decides when training ends

    class Config(PluginConfig):
        changeable_on_resume = frozenset({"patience"})  # a run it stopped goes on with a larger one

        monitor: str | None = Field(
            None, description="the epoch metric to watch (default: val_loss, or train_loss in a run without validation)"
        )
        patience: int = Field(3, ge=1, description="epochs without improvement before stopping")
        mode: Mode = Field("auto", description="min or max is better; auto: max for accuracies, else min")
        min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")

    def __init__(self, config: Config):
        self.config = config
        self.monitor, self.mode = config.monitor, config.mode
        self.best: float | None = None
        self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]

    @hookimpl
    def check(self, trainer) -> None:
        self.monitor, self.mode = resolve_monitor("early_stopping", self.config.monitor, self.config.mode, trainer)

    @hookimpl
    def on_fit_start(self, trainer) -> None:
        self._stop_if_patience_ran_out(trainer)  # a resumed run that this plugin had ended

    @hookimpl
    def on_epoch_end(self, event, trainer) -> None:
        value = event.metrics.get(self.monitor)
        if value is None:
            return  # an epoch without validation (the validation plugin): nothing to compare
        if improves(value, self.best, self.mode, self.config.min_delta):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        self._stop_if_patience_ran_out(trainer)

    def _stop_if_patience_ran_out(self, trainer) -> None:
        if self.bad_epochs >= self.config.patience:
            best = "none" if self.best is None else f"{self.best:.4g}"
            trainer.request_stop(
                f"{self.monitor} did not improve for {self.bad_epochs} epochs (best {best}, mode {self.mode})"
            )
