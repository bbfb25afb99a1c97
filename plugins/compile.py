"""``torch.compile`` for any recipe's model.

    minitrain run recipe.py --plugin compile
    minitrain run recipe.py --plugin compile:mode=max-autotune,fullgraph=true

The model is compiled in place (``nn.Module.compile``), so ``trainer.module`` stays the recipe's
model: checkpoints, ``--resume``, ``--init-from`` and ``minitrain export`` see the same tensor
names with the plugin on or off (no ``_orig_mod.``). It runs after mixed precision has converted
the model and before DDP wraps it. Compilation happens at the first training step (and again at
the first validation, in eval mode); where it fails, the plugin warns once and the run goes on
eager, redoing that step.

With inductor, half-precision intermediates are rounded as eager rounds them
(``emulate_precision_casts``). Without it, inductor keeps some of them in fp32, and the backward
of ``torch.amax`` over a bf16 value (the max-pool head of the CIFAR-10 networks, under bf16
autocast or a bf16 model) compares fp32 values with their bf16 maximum, finds no match and
divides by zero: every gradient is NaN from the first step (PyTorch 2.11 on CUDA, 2.14 on CPU).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from minitrain import PluginConfig, hookimpl
from minitrain.engine.errors import one_line


def compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the compiler rather than from the model's own code."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(exc, (TorchDynamoException, InductorError))


class Compile:
    enabled_by_default = False
    role = "critical"  # it changes how every step is computed

    class Config(PluginConfig):
        mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
        fullgraph: bool = Field(False, description="fail rather than break the graph")
        dynamic: bool | None = Field(None, description="shapes: dynamic, static, or decided by torch (empty)")
        backend: str = Field("inductor", description="torch.compile's backend (inductor, aot_eager, eager, ...)")
        emulate_precision_casts: bool = Field(
            True,
            description="inductor: round bf16/fp16 intermediates as eager does (off: slightly "
            "faster, and NaN gradients through amax in half precision)",
        )

    def __init__(self, config: Config):
        self.config = config
        self.module: torch.nn.Module | None = None
        self.eager = False  # compiling failed: the rest of the run is eager

    @hookimpl
    def setup(self, trainer) -> None:
        if self.module is trainer.module or self.eager:
            return  # a second fit() on the same trainer
        self.module = trainer.module
        compile_in_place(trainer.module, self.config)

    @hookimpl(wrapper=True, tryfirst=True)
    def train_step(self, trainer, batch):
        return (yield from self._or_eager(trainer, "train_step", batch))

    @hookimpl(wrapper=True, tryfirst=True)
    def eval_step(self, trainer, batch):
        return (yield from self._or_eager(trainer, "eval_step", batch))

    def _or_eager(self, trainer, hook: str, batch):
        """The step, as compiled; if compiling it fails, the same step again, eager."""
        try:
            return (yield)
        except Exception as exc:
            if self.eager or not compile_failure(exc):
                raise
            self._fall_back(exc)
        return getattr(trainer.hook, hook)(trainer=trainer, batch=batch)

    def _fall_back(self, exc: Exception) -> None:
        self.eager = True
        assert self.module is not None  # set by setup, before any step
        self.module._compiled_call_impl = None  # what nn.Module.compile set: calls go to forward again
        warnings.warn(f"compile: torch.compile failed ({one_line(exc)}); training goes on eager", stacklevel=2)


def compile_in_place(module: torch.nn.Module, config: Compile.Config) -> None:
    """``module.compile(...)`` with the plugin's options (also for a hand-written loop)."""
    options = None
    if config.backend == "inductor":  # a mode is a set of inductor options; both cannot be given
        from torch._inductor import list_mode_options

        options = {**list_mode_options(config.mode), "emulate_precision_casts": config.emulate_precision_casts}
    module.compile(
        mode=None if options is not None or config.mode == "default" else config.mode,
        options=options,
        fullgraph=config.fullgraph,
        dynamic=config.dynamic,
        backend=config.backend,
    )
