"""Test-time augmentation: validation logits averaged over horizontal flips and, optionally,
small translations of each image (:mod:`minitrain.kit.augment`). Overrides the ``eval_step``
pipeline hook, so it composes with anything that wraps it (mixed precision). ``minitrain export
--tta`` builds the same views into an exported model.
"""

from __future__ import annotations

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.device import to_device
from minitrain.kit.augment import augmented_logits

__all__ = ["TestTimeAugmentation", "augmented_logits"]


class TestTimeAugmentation:
    role = "critical"  # it computes the validation metrics

    class Config(PluginConfig):
        flip: bool = True
        translate: int = Field(0, ge=0, le=4, description="also shift by ±this many pixels (reflect-padded)")

    def __init__(self, config: Config):
        self.config = config
        self.test_time_augmentation = config.model_dump()  # in run.json, for `minitrain export --tta`

    @hookimpl
    def eval_step(self, trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = to_device(batch, trainer.device)
        return augmented_logits(trainer.model, inputs, self.config.flip, self.config.translate), targets
