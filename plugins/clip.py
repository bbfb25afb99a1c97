"""Gradient clipping: before each optimizer step, scale the gradients down so that their total
norm is at most ``max_norm``, or clamp each to ``[-value, value]``.

    minitrain run recipe.py --plugin clip:max_norm=1.0
    minitrain run recipe.py --plugin clip:value=0.5

It wraps ``optimizer_step`` and acts only on batches that step (``trainer.shared.stepping``, see the
``accumulate`` plugin). With fp16 loss scaling (the ``amp`` plugin's ``trainer.shared.grad_scaler``) the
gradients are unscaled first, so the limit applies to the true gradients. The pre-clip norm is
published as ``trainer.shared.step_metrics["grad_norm"]``, a device tensor: no host sync here; ``console``
and ``tensorboard`` read it when they read the loss, every N steps.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from minitrain import PluginConfig, hookimpl


class Clip:
    enabled_by_default = False
    role = "critical"  # it changes every step

    class Config(PluginConfig):
        max_norm: float | None = Field(None, gt=0, description="largest total gradient norm")
        value: float | None = Field(None, gt=0, description="largest absolute value of each gradient")
        norm_type: float = Field(2.0, gt=0, description="the p of the p-norm (inf for the largest value)")

        @model_validator(mode="after")
        def _one_limit(self):
            if (self.max_norm is None) == (self.value is None):
                raise ValueError("give one of max_norm=X or value=X")
            return self

    def __init__(self, config: Config):
        self.config = config
        self.parameters: list[torch.nn.Parameter] = []

    @hookimpl
    def setup(self, trainer) -> None:
        self.parameters = [p for p in trainer.module.parameters() if p.requires_grad]

    @hookimpl(wrapper=True)
    def optimizer_step(self, trainer):
        if trainer.shared.stepping:
            if trainer.shared.grad_scaler is not None:
                trainer.shared.grad_scaler.unscale_(trainer.optimizer)
            grads = [p.grad for p in self.parameters if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, self.config.norm_type)
            if self.config.max_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.parameters, self.config.max_norm, norm)
            else:
                assert self.config.value is not None  # Config allows exactly one of max_norm and value
                torch.nn.utils.clip_grad_value_(self.parameters, self.config.value)
            trainer.shared.step_metrics["grad_norm"] = norm
        return (yield)
