"""An exponential moving average of the weights, kept on the device beside the model:
``average = decay * average + (1 - decay) * weights`` after every ``every``-th optimizer step
(buffers, such as BatchNorm's statistics, are copied). With ``warmup`` (on by default) the
decay of the n-th update is ``min(decay, (1 + n) / (10 + n))``: without it, the average of a short
run is mostly the initial weights (0.999 over 200 updates keeps 82% of them), and validating it
shows an untrained model.

    minitrain run recipe.py --plugin ema:decay=0.999,evaluate=true
    minitrain export RUN_DIR --ema

The average travels in checkpoints (exact resume). With ``evaluate=true`` each validation
evaluates the average instead of the trained weights, which are put back afterwards; with
``minitrain export --ema`` the exported model carries the average. Training itself never sees it.
Updates are ``torch._foreach`` operations on the device: no host sync.
"""

from __future__ import annotations

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import MinitrainError

STATE = "ema_weights"
"""Where the plugin's checkpointed state keeps the averaged weights (`minitrain export --ema` reads them)."""


class EMA:
    enabled_by_default = False
    role = "critical"  # its state must travel with the run, and it may decide what is validated

    class Config(PluginConfig):
        decay: float = Field(0.999, gt=0, lt=1, description="weight of the old average at each update")
        every: int = Field(1, ge=1, description="optimizer steps between updates")
        warmup: bool = Field(True, description="a smaller decay for the first updates: min(decay, (1+n)/(10+n))")
        evaluate: bool = Field(False, description="validate the average instead of the trained weights")

    def __init__(self, config: Config):
        self.config = config
        self.updates = 0
        self.names: list[str] = []
        self.average: list[torch.Tensor] = []
        self._loaded: dict[str, torch.Tensor] | None = None
        self._swapped: list[torch.Tensor] | None = None

    @hookimpl(trylast=True)  # after dtype and device changes to the model (amp, core)
    def setup(self, trainer) -> None:
        state = trainer.module.state_dict(keep_vars=True)
        self.names = [name for name, t in state.items() if t.is_floating_point()]
        trained = {id(p) for p in trainer.module.parameters()}  # averaged; buffers are copied
        is_trained = [id(state[name]) in trained for name in self.names]
        self.tracked = [state[name].detach() for name in self.names]  # views: they follow the weights
        source = self._loaded or (dict(zip(self.names, self.average)) if self.average else None)
        if source is not None and sorted(source) != sorted(self.names):
            raise MinitrainError("ema: the saved average does not fit this model's tensors")
        self.average = [
            (source[name] if source is not None else t).detach().to(t.device, t.dtype, copy=True)
            for name, t in zip(self.names, self.tracked)
        ]
        self._loaded = None
        pairs = list(zip(self.average, self.tracked, is_trained))
        self._lerped = ([a for a, _, w in pairs if w], [t for _, t, w in pairs if w])  # (averages, weights)
        self._copied = ([a for a, _, w in pairs if not w], [t for _, t, w in pairs if not w])

    @hookimpl(wrapper=True)
    def optimizer_step(self, trainer):
        result = yield
        if trainer.shared.stepping:
            self.updates += 1
            if self.updates % self.config.every == 0:
                self._update(self._decay(self.updates // self.config.every - 1))
        return result

    def _decay(self, averaged: int) -> float:
        """The decay of an update after ``averaged`` earlier ones."""
        return min(self.config.decay, (1 + averaged) / (10 + averaged)) if self.config.warmup else self.config.decay

    @torch.no_grad()
    def _update(self, decay: float) -> None:
        if self._lerped[0]:
            torch._foreach_lerp_(*self._lerped, 1 - decay)
        if self._copied[0]:
            torch._foreach_copy_(*self._copied)

    @hookimpl
    def on_validation_start(self) -> None:
        if self.config.evaluate and self.updates:
            self._swapped = [t.clone() for t in self.tracked]
            with torch.no_grad():
                torch._foreach_copy_(self.tracked, self.average)

    @hookimpl
    def on_validation_end(self) -> None:
        self._put_back()

    @hookimpl
    def on_exception_raised(self) -> None:
        self._put_back()

    @hookimpl
    def on_interrupted(self) -> None:
        self._put_back()

    def _put_back(self) -> None:
        if self._swapped is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.tracked, self._swapped)
            self._swapped = None

    def state_dict(self) -> dict:
        return {STATE: dict(zip(self.names, self.average)), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self._loaded, self.updates = dict(state[STATE]), state["updates"]
        if self.names:  # set up already (a second fit): take it at once
            torch._foreach_copy_(self.average, [self._loaded[name] for name in self.names])  # in place: kept in _lerped
            self._loaded = None
