"""Test-time augmentation: validation logits averaged over horizontal flips and, optionally,
small translations of each image. Overrides the ``eval_step`` pipeline hook, so it composes
with anything that wraps it (mixed precision).

The untranslated image is the most informative view, so with ``translate`` the shifted views
together weigh as much as it does (each flip pair is averaged first): the weighting of the
fast CIFAR-10 scripts. :func:`augmented_logits` is the same computation for code that drives a
model without a trainer (a hand-written benchmark loop).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.device import to_device


def augmented_logits(model, inputs: torch.Tensor, flip: bool = True, translate: int = 0) -> torch.Tensor:
    """``model``'s logits for ``inputs`` averaged over the views described in the module doc."""
    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return (model(x) + model(x.flip(3))) / 2 if flip else model(x)

    logits = mirrored(inputs)
    if translate:
        t, (h, w) = translate, inputs.shape[2:]
        padded = F.pad(inputs, (t,) * 4, mode="reflect")
        shifted = (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2 * t:, 2 * t:])) / 2
        logits = (logits + shifted) / 2
    return logits


class TestTimeAugmentation:
    role = "critical"  # it computes the validation metrics
    class Config(PluginConfig):
        flip: bool = True
        translate: int = Field(0, ge=0, le=4, description="also shift by ±this many pixels (reflect-padded)")

    def __init__(self, config: Config):
        self.config = config

    @hookimpl
    def eval_step(self, trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = to_device(batch, trainer.device)
        return augmented_logits(trainer.model, inputs, self.config.flip, self.config.translate), targets
