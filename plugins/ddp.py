"""Data-parallel training: wraps the model in PyTorch's ``DistributedDataParallel`` when the run
was started by ``torchrun`` with more than one process, so that gradients are averaged over
ranks during ``backward``. On by default; with one process it does nothing.

    torchrun --nproc_per_node=4 -m minitrain run recipe.py
    minitrain run recipe.py --nproc 4 --plugin ddp:find_unused_parameters=true

A plugin rather than core code because it is one implementation of the ``setup`` pipeline hook
among possible others: its options are validated like any plugin's, and ``--no-plugin ddp``
leaves the model to another engine (FSDP, say) a third-party plugin sets up. It runs ``trylast``,
after the set-up that changes the model itself (device, mixed precision, ``torch.compile``), and
wraps ``trainer.model`` as those left it; ``trainer.module`` stays the recipe's model, so
checkpoints hold the same plain weights whatever the number of processes.
"""

from __future__ import annotations

from pydantic import Field
from torch.nn.parallel import DistributedDataParallel

from minitrain import PluginConfig, hookimpl
from minitrain.engine import distributed


class DataParallel:
    enabled_by_default = True
    role = "critical"  # it decides how the ranks' gradients combine

    class Config(PluginConfig):
        find_unused_parameters: bool = Field(
            False, description="allow parameters that get no gradient in some steps (costs a graph walk per step)"
        )
        static_graph: bool = Field(False, description="the set of used parameters never changes (lets DDP optimise)")
        bucket_cap_mb: float = Field(25.0, gt=0, description="size of the gradient all-reduce buckets")

    def __init__(self, config: Config):
        self.config = config

    @hookimpl(trylast=True)
    def setup(self, trainer) -> None:
        if distributed.world_size() < 2 or isinstance(trainer.model, DistributedDataParallel):
            return  # one process, or a second fit() on the same trainer
        device = trainer.device
        trainer.model = DistributedDataParallel(
            trainer.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.config.find_unused_parameters,
            static_graph=self.config.static_graph,
            bucket_cap_mb=self.config.bucket_cap_mb,
        )
