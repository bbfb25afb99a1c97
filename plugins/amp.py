"""Mixed precision: bf16 or fp16 compute, as autocast or as a "pure" half-precision model.

* ``mode=autocast`` wraps ``train_step`` and ``eval_step`` (forward and loss) in
  ``torch.autocast``; weights, gradients and optimizer stay fp32. With fp16 a
  ``torch.amp.GradScaler`` takes over ``backward`` and ``optimizer_step`` so that small gradients
  do not underflow; its state (the current scale) travels in checkpoints.
* ``mode=pure`` converts the model itself to the half type, keeping BatchNorm in fp32, as the
  fastest CIFAR-10 scripts do: no casts per op, half the memory traffic. Inputs are cast to the
  half type on the way in and logits back to fp32 on the way out, so the loss is computed in fp32.
  It suits recipes built for it (SGD; Adam's eps underflows in fp16). There is no gradient
  scaling here: GradScaler cannot unscale fp16 gradients.

``dtype=auto`` picks the fastest type the hardware has: bf16 on a CUDA GPU with native bf16 and on
a CPU with AMX (``amx_bf16``), else fp32, and says which and why in one line. A CPU with
``avx512_bf16`` but no AMX trains in fp32: its bf16 convolutions were slower than fp32 ones on
the 2-core host measured (docs/performance.md). Channels-last is the recipe's choice.

A device that cannot run the requested precision gets one warning and trains in fp32 instead of
failing. Nothing here reads a tensor on the host per step, except what ``GradScaler.step`` itself
does for an optimizer that is not fused (it checks for inf/NaN gradients before stepping).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from minitrain import PluginConfig, hookimpl
from minitrain.engine import distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported(device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
    """Why ``device`` cannot compute in ``dtype`` the ``mode`` way, or None if it can. Tried on a
    tiny matmul, because which device/dtype pairs work varies by backend and PyTorch version."""
    if (
        device.type == "cuda"
        and dtype is torch.bfloat16
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        return f"{torch.cuda.get_device_name(device)} has no native bf16"
    x = torch.ones(4, 4, device=device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mode == "autocast":
                with torch.autocast(device.type, dtype=dtype):
                    y = x @ x
            else:
                y = x.to(dtype) @ x.to(dtype)
    except (RuntimeError, TypeError) as exc:
        return str(exc).splitlines()[0]
    if y.dtype != dtype:
        return str(caught[0].message) if caught else f"{mode} produced {y.dtype}"
    return None


def fastest(device: torch.device) -> tuple[str | None, str]:
    """``("bf16", why)`` where ``device`` has bf16 hardware, else ``(None, why)``: fp32."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{name} has native bf16"
        return None, f"{name} has no native bf16"
    if device.type == "cpu":
        flags = cpu_flags()
        if "amx_bf16" in flags:
            return "bf16", "the CPU has AMX bf16 (amx_bf16)"
        if "avx512_bf16" in flags:
            return None, "the CPU has avx512_bf16 but no AMX, where bf16 convolutions are slower than fp32"
        return None, "the CPU has no bf16 hardware (no amx_bf16)"
    return None, f"no bf16 hardware known for {device.type}"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


class MixedPrecision:
    enabled_by_default = False
    role = "critical"  # it changes the numerics of every step

    class Config(PluginConfig):
        dtype: Literal["bf16", "fp16", "auto"] = "bf16"
        mode: Literal["autocast", "pure"] = "autocast"

    def __init__(self, config: Config):
        self.config = config
        self.ready = False  # set-up done (a second fit() on the same trainer keeps the scaler)
        self.dtype: torch.dtype | None = None  # the half type in use; None: fp32
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict | None = None  # loaded from a checkpoint before set-up

    @hookimpl(tryfirst=True)
    def setup(self, trainer) -> None:
        """Decide once per run what the device can do. Runs before other set-up (compile, DDP) so
        that they see the converted model."""
        if self.ready:
            trainer.shared.grad_scaler, trainer.shared.compute_dtype = self.scaler, self.dtype
            return
        self.ready = True
        name: str = self.config.dtype
        mode = self.config.mode
        if name == "auto":
            chosen, why = fastest(trainer.device)
            if distributed.is_main():
                print(f"amp: dtype=auto chose {f'{chosen} {mode}' if chosen else 'fp32'}: {why}", flush=True)
            if chosen is None:
                return
            name = chosen
        dtype = DTYPES[name]
        reason = unsupported(trainer.device, dtype, mode)
        if reason is not None:
            warnings.warn(
                f"amp: {name} {mode} is not available on {trainer.device} ({reason}); training in fp32",
                stacklevel=2,
            )
            return
        self.dtype = trainer.shared.compute_dtype = dtype
        if mode == "pure":
            to_half(trainer.module, dtype)
        elif dtype is torch.float16:
            self.scaler = torch.amp.GradScaler(trainer.device.type)
            if self._scaler_state:
                self.scaler.load_state_dict(self._scaler_state)
            trainer.shared.grad_scaler = self.scaler  # for plugins that read gradients (clip unscales them first)

    @hookimpl(wrapper=True)
    def train_step(self, trainer):
        with self._autocast(trainer.device):
            return (yield)

    @hookimpl(wrapper=True)
    def eval_step(self, trainer):
        with self._autocast(trainer.device):
            return (yield)

    def _autocast(self, device: torch.device):
        if self.dtype is None or self.config.mode != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    @hookimpl
    def backward(self, loss: torch.Tensor) -> bool | None:
        if self.scaler is None:
            return None
        self.scaler.scale(loss).backward()
        return True

    @hookimpl
    def optimizer_step(self, trainer) -> bool | None:
        """The core default's step, through the scaler (which skips steps with inf/NaN gradients)."""
        if self.scaler is None:
            return None
        self.scaler.step(trainer.optimizer)
        self.scaler.update()
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.scheduler is not None and trainer.scheduler_interval == "step":
            trainer.scheduler.step()
        return True

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "scaler" not in state:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        else:
            self._scaler_state = state["scaler"]


def to_half(model: nn.Module, dtype: torch.dtype) -> None:
    """Convert ``model`` in place to ``dtype`` except its BatchNorm layers (their statistics need
    fp32), and cast floating inputs to ``dtype`` and floating outputs back to fp32. Parameters
    stay the same objects, so an optimizer built on them keeps working."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.float()
    model.register_forward_pre_hook(lambda _, args: tuple(_cast(a, dtype) for a in args))
    model.register_forward_hook(lambda _, __, output: _cast(output, torch.float32))


def _cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
