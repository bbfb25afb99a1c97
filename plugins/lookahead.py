"""Lookahead averaging of the weights: every ``every`` steps the running average moves toward the
model and the model is reset to the average, so training follows a smoothed trajectory; when
training ends the model keeps the average.

The average's decay grows over the run, ``decay**every * (step / total_steps)**ramp``: early on
the average simply follows the model (fast progress), late in training it damps the noise of
large learning rates. All floating-point state is averaged, BatchNorm statistics included, so the
averaged model evaluates consistently. The average is plugin state: checkpoints carry it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import MinitrainError


class Lookahead:
    enabled_by_default = False
    role = "critical"  # it changes the weights

    class Config(PluginConfig):
        every: int = Field(5, ge=1, description="optimizer steps between updates of the average")
        decay: float = Field(0.95, ge=0, le=1, description="per-step decay of the average at the end of training")
        ramp: float = Field(3.0, ge=0, description="decay grows as (progress)**ramp")
        total_steps: int | None = Field(None, ge=1, description="length of the run, when the loader has no len()")

    def __init__(self, config: Config):
        self.config = config
        self.average: list[torch.Tensor] | None = None
        self._loaded: list[torch.Tensor] | None = None  # from a checkpoint, before the model is set up

    def start(self, model: torch.nn.Module, total_steps: int) -> None:
        """Track ``model`` (after any dtype/device conversion) for a run of ``total_steps``."""
        self.total, self.finished = total_steps, False
        self.tracked = [t for t in model.state_dict().values() if t.is_floating_point()]
        saved = self._loaded or self.average or self.tracked  # resumed, continued, or fresh
        if len(saved) != len(self.tracked):
            raise MinitrainError(f"lookahead: saved average has {len(saved)} tensors, the model {len(self.tracked)}")
        self.average = [s.detach().to(t.device, t.dtype, copy=True) for s, t in zip(saved, self.tracked)]
        self._loaded = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after optimizer step number ``step`` (1-based): updates the average on schedule
        and hands it to the model at the last step."""
        if step % self.config.every == 0:
            decay = self.config.decay**self.config.every * min(step / self.total, 1.0) ** self.config.ramp
            assert self.average is not None  # set by start(), like self.total above
            torch._foreach_lerp_(self.average, self.tracked, 1 - decay)
            torch._foreach_copy_(self.tracked, self.average)
        if step >= self.total:
            self.finish()

    @torch.no_grad()
    def finish(self) -> None:
        """Give the model the averaged weights (once per run)."""
        if not self.finished and self.average is not None:
            torch._foreach_copy_(self.tracked, self.average)
            self.finished = True

    @hookimpl
    def on_fit_start(self, event, trainer) -> None:
        total = self.config.total_steps or (event.steps_per_epoch and event.epochs * event.steps_per_epoch)
        if not total:
            raise MinitrainError("lookahead: the training loader has no length; set lookahead:total_steps=N")
        self.start(trainer.module, total)

    @hookimpl
    def on_batch_end(self, event) -> None:
        self.after_step(event.global_step)

    @hookimpl
    def on_fit_end(self) -> None:
        self.finish()  # stopped early: still end on the average

    def state_dict(self) -> dict:
        return {"average": list(self.average)} if self.average is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "average" in state:
            self._loaded = list(state["average"])
