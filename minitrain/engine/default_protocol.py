"""The default training protocol, as an ordinary plugin (registered as ``core``).

Each implementation is ``trylast`` (``setup``: ``tryfirst``) so that any plugin's own
implementation or wrapper runs around or instead of it.
"""

from __future__ import annotations

from typing import Any

import torch

from minitrain.engine.device import to_device
from minitrain.engine.hookspecs import hookimpl


class DefaultProtocol:
    @hookimpl(tryfirst=True)
    def setup(self, trainer) -> None:
        trainer.model.to(trainer.device)

    @hookimpl(trylast=True)
    def train_step(self, trainer, batch: Any) -> torch.Tensor:
        if trainer.device.type != "cpu":  # on the CPU a batch is where it is used: no call at all
            batch = to_device(batch, trainer.device)
        inputs, targets = batch
        return trainer.loss_fn(trainer.model(inputs), targets)

    @hookimpl(trylast=True)
    def backward(self, trainer, loss: torch.Tensor) -> bool:  # all the spec's arguments: called directly
        loss.backward()
        return True

    @hookimpl(trylast=True)
    def optimizer_step(self, trainer) -> bool:
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.scheduler is not None and trainer.scheduler_interval == "step":
            trainer.scheduler.step()
        return True

    @hookimpl(trylast=True)
    def eval_step(self, trainer, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = to_device(batch, trainer.device)
        return trainer.model(inputs), targets
