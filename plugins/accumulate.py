"""Gradient accumulation: one optimizer step every ``steps`` batches, so that K batches of b train
like one batch of K·b (for a model without BatchNorm, whose statistics see b at a time).

    minitrain run recipe.py --plugin accumulate:steps=4

Each batch still runs ``train_step`` and ``backward``; the gradients add up in ``.grad``. The
batch that ends a window (every K-th, and the last of an epoch) divides them by the window's
length, as if its losses had been averaged, and steps: ``optimizer_step`` (and with it a per-step
scheduler, gradient clipping, EMA and the grad scaler's update) runs only there. The other
batches' ``optimizer_step`` returns at once. ``trainer.shared.stepping`` says, from ``train_step`` on,
whether the current batch steps, for plugins that must act only then.

``global_step`` and ``BatchEnd`` still count batches: every batch is a ``BatchEnd``, and
``global_step``, ``max_steps`` and ``checkpoint:every_steps`` are in batches. A per-step schedule
advances once per optimizer step, K times less often than per batch: a schedule from the recipe's
``make_scheduler`` is sized in optimizer steps (``batches_per_step``); one that the recipe sizes
itself as ``epochs * len(train_loader)`` steps should divide by K (the plugin warns).

Under DDP the batches that do not step skip the gradient all-reduce (``require_backward_grad_sync``,
what ``no_sync()`` sets): the ranks exchange gradients once per window. A checkpoint may fall inside
a window: the gradients gathered so far travel in it, so a resume continues the window bit for bit.
"""

from __future__ import annotations

import warnings

import torch
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import MinitrainError


class Accumulate:
    enabled_by_default = False
    role = "critical"  # it decides when the weights change

    class Config(PluginConfig):
        steps: int = Field(2, ge=1, description="batches per optimizer step")

    def __init__(self, config: Config):
        self.config = config
        self.window = 0  # batches of the current window whose gradients are in .grad
        self.parameters: list[torch.nn.Parameter] = []
        self.epoch_steps: int | None = None  # batches per epoch, fixed for a fit
        self._grads: list[torch.Tensor | None] | None = None  # from a checkpoint, for set-up

    @hookimpl
    def check(self, trainer) -> None:
        if trainer.nonfinite_loss == "skip":
            raise MinitrainError(
                "accumulate: nonfinite_loss=skip would drop a batch from a window without its "
                "step; use nonfinite_loss=stop with accumulation"
            )
        per_step = trainer.scheduler is not None and trainer.scheduler_interval == "step"
        if self.config.steps > 1 and per_step and getattr(trainer, "schedule_steps", None) is None:  # not sized by it
            warnings.warn(
                f"accumulate: the recipe's per-step schedule advances once per optimizer step, every "
                f"{self.config.steps} batches; if it counts batches it will not finish",
                stacklevel=2,
            )

    @property
    def batches_per_step(self) -> int:
        """What the trainer divides batches by to size a recipe's ``make_scheduler``."""
        return self.config.steps

    @hookimpl(trylast=True)
    def setup(self, trainer) -> None:
        self.parameters = list(trainer.module.parameters())
        self.epoch_steps = trainer.steps_per_epoch
        if self._grads is not None:  # resumed inside a window: its gradients so far
            for parameter, grad in zip(self.parameters, self._grads):
                parameter.grad = None if grad is None else grad.to(parameter.device, parameter.dtype)
            self._grads = None

    @hookimpl(wrapper=True, tryfirst=True)
    def train_step(self, trainer):
        trainer.shared.stepping = self.window + 1 == self.config.steps or (
            self.epoch_steps is not None and trainer.state.batch_idx + 1 == self.epoch_steps
        )
        if isinstance(trainer.model, DistributedDataParallel):
            trainer.model.require_backward_grad_sync = trainer.shared.stepping
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def backward(self, trainer):
        done = yield
        self.window += 1
        if trainer.shared.stepping and self.window > 1:
            grads = [p.grad for p in self.parameters if p.grad is not None]
            torch._foreach_div_(grads, self.window)  # the mean over the window, on the device
        return done

    @hookimpl(tryfirst=True)
    def optimizer_step(self, trainer) -> bool | None:
        """Between steps, nothing: no step, no zero_grad, no scheduler. On a stepping batch the
        other implementations run."""
        if not trainer.shared.stepping:
            return True
        self.window = 0
        return None

    @hookimpl
    def on_fit_end(self, trainer) -> None:
        trainer.shared.stepping = True  # a later fit, or a plugin reading it, sees the default

    def state_dict(self) -> dict:
        if not self.window:
            return {"window": 0}
        return {"window": self.window, "grads": [p.grad for p in self.parameters]}

    def load_state_dict(self, state: dict) -> None:
        self.window = state["window"]
        self._grads = state.get("grads")
